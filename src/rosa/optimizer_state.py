"""The optimizer state of the ROSA factors: finding the optimizer under wrappers, checking it, clearing it."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn


def base_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer under wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while hasattr(getattr(optimizer, "optimizer", None), "state"):
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer(optimizer: Any, params: Iterable[nn.Parameter]) -> None:
    """Raise unless ``optimizer`` is an optimizer (accelerate's wrapper included) that holds some of ``params``.

    ``TypeError`` for an object that is no optimizer; ``ValueError`` when it holds none of ``params``
    (the ROSA factors), e.g. because it was built before ``rosa.wrap``.
    """
    inner = base_optimizer(optimizer)
    if not (hasattr(inner, "param_groups") and hasattr(inner, "state")):
        raise TypeError(
            f"expected a torch.optim.Optimizer (or a wrapper of one, such as accelerate's AcceleratedOptimizer) "
            f"whose state holds the ROSA factors, got {type(optimizer).__name__}"
        )
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    if not any(id(p) in held for p in params):
        raise ValueError(
            "the optimizer holds none of the ROSA factors (up/down), so it would not train them; build the "
            "optimizer after rosa.wrap(model, config), e.g. over [p for p in model.parameters() if p.requires_grad]"
        )


def reset_optimizer_state(optimizer: Any, params: Iterable[nn.Parameter]) -> int:
    """Drop the optimizer state (moments, step counts) of ``params``; returns how many had state."""
    state = base_optimizer(optimizer).state
    return sum(state.pop(p, None) is not None for p in params)
