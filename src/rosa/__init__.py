"""rosa-peft: ROSA (Random Subspace Adaptation) fine-tuning for PyTorch and Hugging Face models."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import LayerSpec, RosaConfig
from .errors import NonFiniteError
from .layers import RosaConv2d, RosaEmbedding, RosaLayer, RosaLinear
from .model import merge, merged_state_dict, parameter_report, print_trainable_parameters, resample, rosa_layers, wrap
from .optimizer_state import reset_optimizer_state
from .schedule import ResampleSchedule, rewarmup_factor

__version__ = "0.2.0"

__all__ = [
    "LayerSpec",
    "NonFiniteError",
    "RosaConfig",
    "RosaConv2d",
    "RosaEmbedding",
    "RosaLayer",
    "RosaLinear",
    "ResampleSchedule",
    "load_checkpoint",
    "merge",
    "merged_state_dict",
    "parameter_report",
    "print_trainable_parameters",
    "resample",
    "reset_optimizer_state",
    "rewarmup_factor",
    "rosa_layers",
    "save_checkpoint",
    "wrap",
]
