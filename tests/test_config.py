import pytest
import torch
from torch import nn

import rosa
from rosa import subspace
from rosa.config import LayerSpec, matches


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("rank", 0, "rank"),
        ("rank", -3, "rank"),
        ("rank", 0.0, "(0, 1]"),
        ("rank", 1.5, "(0, 1]"),
        ("rank", True, "rank"),
        ("rank", "8", "rank"),
        ("selection", "middle", "random, block, top, bottom"),
        ("dropout", 1.0, "[0, 1)"),
        ("dropout", -0.1, "[0, 1)"),
        ("seed", -1, "seed"),
        ("seed", 1.5, "seed"),
        ("train_bias", "yes", "train_bias"),
        ("target_modules", "([", "regex"),
        ("target_modules", ["query", ""], "target_modules"),
        ("target_modules", 3, "target_modules"),
        ("exclude_modules", [1], "exclude_modules"),
        ("modules_to_save", {"a": 1}, "modules_to_save"),
        ("factor_dtype", "float64", "factor_dtype"),
        ("residual_dtype", "bfloat16", "None (the base weight's dtype) or 'float32'"),
        ("singular_values", "sqrt", "split, down, up"),
    ],
)
def test_invalid_field_raises_naming_field_and_value(field, value, fragment):
    with pytest.raises(ValueError) as info:
        rosa.RosaConfig(**{field: value})
    message = str(info.value)
    assert f"RosaConfig.{field}" in message
    assert repr(value) in message
    assert fragment in message


def test_valid_configs():
    assert rosa.RosaConfig(rank=1).rank == 1
    assert rosa.RosaConfig(rank=1.0).rank == 1.0
    assert rosa.RosaConfig(rank=0.25, selection="bottom", dropout=0.1).dropout == 0.1
    assert rosa.RosaConfig(factor_dtype="float32").factor_torch_dtype is torch.float32
    cfg = rosa.RosaConfig(rank=4, target_modules=["q"], factor_dtype=torch.bfloat16)
    again = rosa.RosaConfig.from_dict(cfg.to_dict())
    assert again.factor_torch_dtype is torch.bfloat16
    assert (again.rank, again.target_modules, again.selection) == (4, ["q"], "random")
    residual = rosa.RosaConfig.from_dict(rosa.RosaConfig(residual_dtype=torch.float32).to_dict())
    assert residual.residual_dtype == "float32" and residual.residual_torch_dtype is torch.float32


def test_invalid_field_set_after_construction_is_caught_by_wrap_without_touching_model():
    model = nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = rosa.RosaConfig(rank=2)
    cfg.selection = "sideways"
    with pytest.raises(ValueError, match="selection"):
        rosa.wrap(model, cfg)
    assert isinstance(model[0], nn.Linear)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pattern_matching_forms():
    name = "encoder.layer.0.attention.self.query"
    assert matches(name, ["query"])
    assert matches(name, [name])
    assert matches(name, ["self.query"])
    assert not matches(name, ["uery"])
    assert matches(name, r".*layer\.0\..*query")
    assert not matches(name, r"layer\.0")  # regex strings match the full name
    assert not matches(name, None)


def test_layer_spec_carries_the_per_layer_settings_with_dtypes_resolved():
    cfg = rosa.RosaConfig(rank=0.5, selection="top", seed=3, dropout=0.1, factor_dtype="float32",
                          residual_dtype="float32", svd="randomized", singular_values="down",
                          target_modules=["0"], train_bias=True)
    spec = cfg.layer_spec()
    assert spec == LayerSpec(rank=0.5, selection="top", seed=3, dropout=0.1, factor_dtype=torch.float32,
                             residual_dtype=torch.float32, svd="randomized", singular_values="down")
    assert rosa.RosaConfig().layer_spec() == LayerSpec(rank=8)  # the config's defaults are the spec's
    assert spec.to_dict()["factor_dtype"] == "float32"
    model = rosa.wrap(nn.Sequential(nn.Linear(8, 8)), cfg)
    assert model[0].spec == spec and model[0].rank == 4
    assert (model[0].selection, model[0].seed, model[0].singular_values) == ("top", 3, "down")


def test_selection_error_lists_the_options_from_the_subspace_module():
    with pytest.raises(ValueError, match=", ".join(subspace.SELECTIONS)):
        rosa.RosaConfig(selection="middle")
    with pytest.raises(ValueError, match=", ".join(subspace.SELECTIONS)):
        subspace.select_indices(4, 2, "middle", torch.Generator())
