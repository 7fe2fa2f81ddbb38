import json
import os
import stat

from rosa.experiments.reporting import format_table, write_json


def test_write_json_is_readable_by_others_and_leaves_no_temp_file(tmp_path):
    path = write_json(tmp_path / "sub" / "result.json", {"a": [1, 2.5]})
    assert json.loads(path.read_text()) == {"a": [1, 2.5]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_format_table():
    table = format_table([{"m": "rosa", "n": 1234, "x": 0.123456}, {"m": "lora"}], ["m", "n", "x"])
    assert table.splitlines() == ["| m | n | x |", "|---|---|---|", "| rosa | 1,234 | 0.1235 |", "| lora |  |  |"]
