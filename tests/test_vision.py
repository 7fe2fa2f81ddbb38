"""`rosa vision`: the digits transfer experiment runs end to end and its data split is sound."""

import json

import torch

from rosa.cli import main
from rosa.experiments.vision import SOURCE_CLASSES, TARGET_CLASSES, command_line, load_digits, split_classes


def test_quick_run_writes_results_with_sensible_accuracies(tmp_path):
    assert main(["vision", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert (tmp_path / "vision.png").stat().st_size > 10_000
    assert "| rosa |" in (tmp_path / "summary.md").read_text()

    methods = result["methods"]
    assert set(methods) == {"full", "lora", "rosa", "head"}
    assert result["pretrain_accuracy_mean"] > 0.8
    assert methods["full"]["accuracy_mean"] > 0.5
    assert methods["rosa"]["accuracy_mean"] > 0.5
    assert methods["rosa"]["trainable_params"] == methods["lora"]["trainable_params"]
    assert methods["head"]["trainable_params"] < methods["rosa"]["trainable_params"] < methods["full"]["trainable_params"]
    epochs, seeds = result["settings"]["epochs"], result["settings"]["seeds"]
    assert all(len(m["curve_mean"]) == epochs + 1 and len(m["accuracy_per_seed"]) == seeds for m in methods.values())
    assert command_line(result["settings"]).startswith("rosa vision --seeds 2 ")


def test_split_is_fixed_per_seed_disjoint_and_relabelled():
    images, digits = load_digits()
    assert images.shape == (1797, 1, 8, 8) and 0.0 <= images.min() and images.max() <= 1.0
    a = split_classes(images, digits, TARGET_CLASSES, 20, seed=3)
    b = split_classes(images, digits, TARGET_CLASSES, 20, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert torch.bincount(a.y_train).tolist() == [20] * 5
    assert len(a.y_train) + len(a.y_test) == int(sum((digits == d).sum() for d in TARGET_CLASSES))
    train_rows = {tuple(x.flatten().tolist()) for x in a.x_train}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in a.x_test)
    source = split_classes(images, digits, SOURCE_CLASSES, 20, seed=3)
    assert not torch.equal(source.x_train, a.x_train)
