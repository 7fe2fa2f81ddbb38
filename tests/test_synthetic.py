import json

import pytest

from rosa.cli import main


@pytest.mark.slow
def test_synthetic_quick_shows_rosa_matches_full_and_lora_does_not(tmp_path, capsys):
    assert main(["synthetic", "--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| rosa |" in table and "| lora |" in table

    result = json.loads((tmp_path / "result.json").read_text())
    assert (tmp_path / "synthetic.png").stat().st_size > 10_000
    methods = result["methods"]
    assert set(methods) == {"full", "lora", "rosa", "rosa-top", "rosa-bottom"}
    full, lora, ros = (methods[m] for m in ("full", "lora", "rosa"))
    for r in methods.values():
        assert len(r["val_mse"]) == result["settings"]["epochs"] == len(r["update_rank"])

    assert ros["final_val_mse"] <= 1.10 * full["final_val_mse"]
    assert lora["final_val_mse"] >= 10 * full["final_val_mse"]
    assert ros["final_update_rank"] > 8
    assert max(lora["update_rank"]) <= 8
    assert ros["trainable_params"] == lora["trainable_params"] == 8 * (512 + 32)
    assert len(ros["resample_epochs"]) > 0


def test_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--rank must be >= 1"):
        main(["synthetic", "--quick", "--rank", "0", "--out", str(tmp_path)])
