import json
import os
import stat

import peft
import torch
import transformers

from rosa.experiments.reporting import format_table, library_version, machine_info, write_json


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


def test_machine_info_records_the_library_versions_that_can_change_a_run():
    info = machine_info()
    assert (info["torch"], info["transformers"], info["peft"]) == (
        torch.__version__, transformers.__version__, peft.__version__)
    assert library_version("no-such-distribution-rosa") is None
