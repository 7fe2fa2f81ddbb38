"""`RosaConfig`: what to adapt and how, validated before any model is touched."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Union

import torch

from .subspace import SELECTIONS, SINGULAR_VALUE_PLACEMENTS, SVD_METHODS

Patterns = Union[None, str, Sequence[str]]


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"RosaConfig.{name}={value!r} is invalid: {allowed}.")


def _plain(value: Any) -> Any:
    """``value`` as JSON takes it: a dtype by its name, a tuple as a list."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return list(value) if isinstance(value, tuple) else value


def _dtype_options(*dtypes: torch.dtype) -> dict:
    """What a dtype field accepts, mapped to its ``torch.dtype``: ``None``, each dtype and its name."""
    return {None: None, **{_plain(d): d for d in dtypes}, **{d: d for d in dtypes}}


def dtype_names(options: dict) -> tuple[str, ...]:
    """The dtype names a dtype field (``FACTOR_DTYPES``, ``RESIDUAL_DTYPES``) accepts."""
    return tuple(k for k in options if isinstance(k, str))


def _dtype_help(options: dict) -> str:
    return "use None (the base weight's dtype) or " + " / ".join(map(repr, dtype_names(options)))


FACTOR_DTYPES = _dtype_options(torch.float32, torch.bfloat16, torch.float16)
RESIDUAL_DTYPES = _dtype_options(torch.float32)


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is adapted: the per-layer settings of :class:`RosaConfig` (see there), dtypes resolved.

    ``rank`` is as given (an int, or a float fraction each layer resolves against its own shape);
    a ``None`` dtype follows the base weight. :meth:`RosaConfig.layer_spec` builds it.
    """

    rank: Union[int, float]
    selection: str = "random"
    seed: int = 0
    dropout: float = 0.0
    factor_dtype: Optional[torch.dtype] = None
    residual_dtype: Optional[torch.dtype] = None
    svd: str = "full"
    singular_values: str = "split"

    def to_dict(self) -> dict:
        """A JSON-serializable copy of the fields (dtypes by name)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass
class RosaConfig:
    """Configuration of a ROSA adaptation.

    rank: trainable rank R per layer; an int >= 1, or a float in (0, 1] meaning that fraction
        of min(out_features, in_features) (rounded, at least 1).
    target_modules: which layers to adapt: a list of exact module names or name suffixes
        (``"query"`` matches ``encoder.layer.0.attention.self.query``), or one regex string
        matched against full names. ``None`` = the architecture preset, else every supported layer.
    exclude_modules: layers never adapted, same pattern forms as ``target_modules``.
    selection: which singular vectors become trainable: ``random`` (uniform subset, the paper's
        method), ``block`` (R consecutive singular vectors from a random start, as the paper
        authors' reference code draws its random subspaces), ``top`` (largest singular values) or
        ``bottom`` (smallest).
    dropout: dropout probability on the adapter input, in [0, 1).
    seed: seeds every subspace draw; a layer's draw depends only on (seed, name, resample count).
    train_bias: also train the biases of adapted layers.
    modules_to_save: modules trained fully (e.g. a classifier head), same pattern forms. ``None``
        (default): nothing, except on a Hugging Face ``*ForSequenceClassification`` or
        ``*ForTokenClassification`` model, whose new head (``classifier``/``score``) and BERT-style
        pooler are trained (as PEFT's task types do; a warning names them). ``[]``: nothing.
    factor_dtype: dtype of the trainable factors (``None`` = the base weight's dtype), e.g.
        ``"float32"`` factors over bfloat16 base weights.
    svd: how wrap and resample compute singular vectors. ``full`` (default): the exact SVD.
        ``randomized``: a randomized range finder that computes only the leading R triplets, much
        faster on large layers; they are approximate, but the residual ``W - up @ down`` stays
        exact, so the layer's function is still preserved. It applies to ``selection="top"`` with
        R <= min(out, in)/4 - 10; ``random`` and ``bottom`` need trailing singular vectors, so they
        (and larger ranks) use the exact SVD whatever this says.
    singular_values: where the chosen singular values go: ``split`` (default: ``sqrt(s)`` on each
        factor), ``down`` (all of ``s`` on ``down``, ``up`` keeps the orthonormal singular vectors;
        what the paper authors' reference code does) or ``up`` (the mirror image). The factors' product, and so the layer's function, is the same; what differs
        is how fast each chosen direction trains (with ``split`` its update scales with ``sqrt(s_i)``).
    residual_dtype: dtype of each adapted layer's frozen residual ``W_res``. ``None`` (default) keeps
        the base weight's dtype; ``"float32"`` stores it in float32 under a bfloat16/float16 model.
        Every resample folds the factors into the weight in float32 and rounds the new residual
        into this dtype, so a low-precision residual drifts with each resample: with no training,
        the merged weight measured about 1.0e-3*sqrt(N) relative off after N resamples for
        bfloat16 and 1.3e-4*sqrt(N) for float16 (float32: 2e-7 after 100). A float32 residual
        stays at float32 rounding (2e-7 after 100 resamples) whatever the base dtype. It costs 2
        more bytes per adapted weight entry (those layers' weights take twice their bfloat16
        memory) and their frozen matmul runs in float32. The default keeps the memory and speed the
        model was loaded in: 1% after 100 resamples of a bfloat16 model is below what its training
        changes, and ``"float32"`` is there for many resamples when memory allows. ``rosa.merge``
        returns weights in the base dtype.
    """

    rank: Union[int, float] = 8
    target_modules: Patterns = None
    exclude_modules: Patterns = None
    selection: str = LayerSpec.selection
    dropout: float = LayerSpec.dropout
    seed: int = LayerSpec.seed
    train_bias: bool = False
    modules_to_save: Patterns = None
    factor_dtype: Union[None, str, torch.dtype] = LayerSpec.factor_dtype
    svd: str = LayerSpec.svd
    singular_values: str = LayerSpec.singular_values
    residual_dtype: Union[None, str, torch.dtype] = LayerSpec.residual_dtype

    def __post_init__(self) -> None:
        self.validate()
        if self.svd == "randomized" and self.selection != "top":
            warnings.warn(
                f"RosaConfig.svd='randomized' has no effect with selection={self.selection!r}: it computes only the "
                "leading singular vectors, so only selection='top' uses it; the exact SVD runs instead",
                stacklevel=4,  # the caller of the dataclass __init__
            )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, its value and what is allowed."""
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise _invalid("rank", rank, "use an int >= 1 or a float in (0, 1]")
        if isinstance(rank, int) and rank < 1:
            raise _invalid("rank", rank, "an int rank must be >= 1")
        if isinstance(rank, float) and not 0.0 < rank <= 1.0:
            raise _invalid("rank", rank, "a float rank is a fraction and must be in (0, 1]")
        if self.selection not in SELECTIONS:
            raise _invalid("selection", self.selection, f"choose one of {', '.join(SELECTIONS)}")
        if self.singular_values not in SINGULAR_VALUE_PLACEMENTS:
            raise _invalid("singular_values", self.singular_values,
                           f"choose one of {', '.join(SINGULAR_VALUE_PLACEMENTS)}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise _invalid("dropout", dropout, "use a probability in [0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise _invalid("seed", self.seed, "use an int >= 0")
        if not isinstance(self.train_bias, bool):
            raise _invalid("train_bias", self.train_bias, "use True or False")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            _check_patterns(name, getattr(self, name))
        if self.factor_dtype not in FACTOR_DTYPES:
            raise _invalid("factor_dtype", self.factor_dtype, _dtype_help(FACTOR_DTYPES))
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise _invalid("residual_dtype", self.residual_dtype, _dtype_help(RESIDUAL_DTYPES))
        if self.svd not in SVD_METHODS:
            raise _invalid("svd", self.svd, f"choose one of {', '.join(SVD_METHODS)}")

    @property
    def factor_torch_dtype(self) -> Optional[torch.dtype]:
        """The factors' dtype as a ``torch.dtype`` (``None`` = follow the base weight)."""
        return FACTOR_DTYPES[self.factor_dtype]

    @property
    def residual_torch_dtype(self) -> Optional[torch.dtype]:
        """The residual's dtype as a ``torch.dtype`` (``None`` = follow the base weight)."""
        return RESIDUAL_DTYPES[self.residual_dtype]

    def layer_spec(self) -> LayerSpec:
        """The settings every adapted layer gets, dtypes resolved."""
        settings = {f.name: getattr(self, f.name) for f in fields(LayerSpec)}
        return LayerSpec(**{**settings, "factor_dtype": self.factor_torch_dtype,
                            "residual_dtype": self.residual_torch_dtype})

    def to_dict(self) -> dict:
        """A JSON-serializable copy of the fields."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "RosaConfig":
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def _check_patterns(name: str, value: Patterns) -> None:
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise _invalid(name, value, f"a string is a regex and this one does not compile ({err})") from None
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _invalid(name, value, "use None, a regex string, or a list of non-empty module names/suffixes")


def matches(name: str, patterns: Patterns) -> bool:
    """Whether module ``name`` matches ``patterns`` (regex string, or exact names / suffixes)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)
