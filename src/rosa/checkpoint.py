"""Checkpoints of a ROSA training run: exact resume, atomic replacement, no pickle.

A checkpoint is a directory holding:

* ``rosa.json``: format version, the ``RosaConfig``, each ROSA layer's metadata (name, type, rank,
  selection, seed, singular-value placement, resample count: the resample count fixes the layer's
  next subspace draw), the model class (and Hugging Face config), the index of the model state and
  a SHA-256 per file.
* ``model.safetensors``: every parameter and persistent buffer (``W_res`` base weights, factors,
  heads ...). Tied weights are stored once; ``rosa.json`` records the other names.
* ``training_state.json`` + ``training_state.safetensors``: optimizer, LR scheduler and
  ``ResampleSchedule`` state, the torch / numpy / python RNG states and the caller's ``extra``;
  tensors go to safetensors, everything else to JSON.

Saving writes a temporary directory beside the target and renames it into place; an existing
checkpoint is renamed aside first and deleted last, so a crash at any moment leaves a complete
checkpoint (loading renames an orphaned aside copy back). One writer per checkpoint directory.
Loading reads and checks everything before it changes the model, optimizer or anything else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RosaConfig
from .model import CONFIG_ATTR, rosa_layers

FORMAT_VERSION = 1
MANIFEST = "rosa.json"
MODEL_FILE = "model.safetensors"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
DATA_FILES = (MODEL_FILE, STATE_JSON, STATE_TENSORS)

PathLike = Union[str, os.PathLike]

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS}
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, or does not fit what it is loaded into."""


# -- public API ----------------------------------------------------------------------------------
def save_checkpoint(
    directory: PathLike,
    model: nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    schedule: Any = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write a checkpoint of ``model`` (and the given training state) to ``directory``, atomically.

    ``extra`` is any JSON-like dict (tensors allowed), e.g. ``{"step": 100}``; ``load_checkpoint``
    returns it. An existing checkpoint at ``directory`` is replaced; a directory that is not a
    checkpoint is never replaced. Returns the checkpoint path.
    """
    directory = Path(directory)
    _refuse_foreign(directory)
    model_tensors = _TensorTable()
    state_tensors = _TensorTable()
    manifest = _manifest(model, _encode(model.state_dict(), "", model_tensors))
    training = _encode(_training_state(optimizer, scheduler, schedule, extra), "", state_tensors)

    def write(tmp: Path) -> None:
        save_file(model_tensors.tensors, tmp / MODEL_FILE)
        save_file(state_tensors.tensors, tmp / STATE_TENSORS)
        _write_json(tmp / STATE_JSON, training)
        manifest["files"] = {name: _sha256(tmp / name) for name in DATA_FILES}
        _write_json(tmp / MANIFEST, manifest)

    _write_atomically(directory, write)
    return directory


def load_checkpoint(
    directory: PathLike,
    model: nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    schedule: Any = None,
    *,
    restore_rng: bool = True,
) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` (wrapped as when saved).

    Also restores ``optimizer``, ``scheduler`` and ``schedule`` when given, and the RNG states unless
    ``restore_rng=False``. Returns the ``extra`` dict saved with it (``{}`` if none). Raises
    :class:`CheckpointError` (a ``ValueError``) naming every difference when the checkpoint is
    incomplete, corrupted or from another model; nothing is changed then.
    """
    directory = _recover(Path(directory))
    manifest = _read_manifest(directory)
    model_state = _decode(manifest["model"], _read_tensors(directory / MODEL_FILE))
    training = _decode(_read_json(directory / STATE_JSON), _read_tensors(directory / STATE_TENSORS))

    problems = _model_problems(manifest, model_state, model)
    problems += _training_problems(training, optimizer, scheduler, schedule)
    if problems:
        raise CheckpointError(_problem_message(directory, problems))

    model.load_state_dict(model_state)
    layers = rosa_layers(model)
    for info in manifest["layers"]:
        layers[info["name"]].resample_count = info["resample_count"]
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (schedule, "schedule")):
        if obj is not None:
            obj.load_state_dict(training[key]["state"])
    if restore_rng:
        _set_rng_state(training["rng"])
    return training["extra"] or {}


def checkpoint_metadata(directory: PathLike) -> dict:
    """What a checkpoint says about its model, without loading tensors.

    Keys: ``config`` (a ``RosaConfig`` or ``None``), ``layers`` (ROSA layer metadata),
    ``model_class`` (``module.QualName``), ``hf_config`` (Hugging Face config dict or ``None``).
    """
    manifest = _read_manifest(_recover(Path(directory)))
    config = manifest["config"]
    return {
        "config": RosaConfig.from_dict(config) if config is not None else None,
        "layers": manifest["layers"],
        "model_class": manifest["model_class"],
        "hf_config": manifest["hf_config"],
    }


def checkpoint_extra(directory: PathLike) -> dict:
    """The ``extra`` dict saved with a checkpoint, read (and verified) without loading anything into a model.

    Raises ``FileNotFoundError`` when there is no checkpoint, :class:`CheckpointError` when it is damaged.
    """
    directory = _recover(Path(directory))
    _read_manifest(directory)  # complete and intact (hashes)
    training = _decode(_read_json(directory / STATE_JSON), _read_tensors(directory / STATE_TENSORS))
    return training["extra"] or {}


def is_checkpoint(directory: PathLike) -> bool:
    """Whether ``directory`` holds a checkpoint written by :func:`save_checkpoint`."""
    return (Path(directory) / MANIFEST).is_file()


# -- what gets stored ----------------------------------------------------------------------------
def layer_metadata(model: nn.Module) -> list[dict]:
    """Name, type, rank, selection, seed, singular-value placement and resample count of every ROSA layer of ``model``."""
    return [
        {
            "name": name,
            "type": type(layer).__name__,
            "base_type": type(layer.base).__name__,
            "rank": layer.rank,
            "selection": layer.selection,
            "seed": layer.seed,
            "singular_values": layer.singular_values,
            "resample_count": layer.resample_count,
        }
        for name, layer in rosa_layers(model).items()
    ]


def _manifest(model: nn.Module, model_index: dict) -> dict:
    config = getattr(model, CONFIG_ATTR, None)
    hf_config = getattr(model, "config", None)
    return {
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "config": config.to_dict() if isinstance(config, RosaConfig) else None,
        "layers": layer_metadata(model),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "hf_config": json.loads(hf_config.to_json_string(use_diff=False)) if hasattr(hf_config, "to_json_string") else None,
        "model": model_index,
    }


def _stateful(obj: Any) -> Optional[dict]:
    if obj is None:
        return None
    return {"class": type(obj).__name__, "state": obj.state_dict()}


def _training_state(optimizer: Any, scheduler: Any, schedule: Any, extra: Optional[dict]) -> dict:
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    return {
        "optimizer": _stateful(optimizer),
        "scheduler": _stateful(scheduler),
        "schedule": _stateful(schedule),
        "extra": extra,
        "rng": _rng_state(),
    }


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


# -- nested state <-> JSON + flat tensors --------------------------------------------------------
class _TensorTable:
    """Tensors collected while encoding, each stored once (safetensors refuses shared storage)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[tuple, str] = {}
        self._storages: set[int] = set()

    def add(self, key: str, tensor: torch.Tensor) -> str:
        """Store ``tensor`` under ``key`` unless the same tensor is stored already; returns its key."""
        ident = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if ident in self._keys:
            return self._keys[ident]
        value = tensor.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in self._storages and value.numel():
            value = value.clone()
        self._storages.add(value.untyped_storage().data_ptr())
        self._keys[ident] = key
        self.tensors[key] = value
        return key


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(value: Any, path: str, table: _TensorTable) -> Any:
    """``value`` as JSON data, its tensors moved into ``table`` (keys are their paths)."""
    if isinstance(value, torch.Tensor):
        return {_TENSOR: table.add(path, value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, _join(path, i), table) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not _MARKERS & set(value):
            return {k: _encode(v, _join(path, k), table) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, path, table), _encode(v, _join(path, k), table)] for k, v in value.items()]}
    raise TypeError(
        f"cannot store a {type(value).__name__} at {path or 'the top level'!r} in a checkpoint; "
        "state may hold tensors, numbers, strings, None, and lists/tuples/dicts of them"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        key = value[_TENSOR]
        if key not in tensors:
            raise CheckpointError(f"checkpoint refers to tensor {key!r}, which its safetensors file lacks")
        return tensors[key]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


# -- checks before loading -----------------------------------------------------------------------
def _listed(names: list[str]) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    return ", ".join(repr(n) for n in names[:_MAX_LISTED]) + more


def _key_problems(what: str, saved: list[str], current: list[str]) -> list[str]:
    problems = []
    saved_set, current_set = set(saved), set(current)
    only_saved = [n for n in saved if n not in current_set]
    only_current = [n for n in current if n not in saved_set]
    if only_saved:
        problems.append(f"{what} only in the checkpoint: {_listed(only_saved)}")
    if only_current:
        problems.append(f"{what} only in the model: {_listed(only_current)}")
    return problems


def _model_problems(manifest: dict, saved: dict, model: nn.Module) -> list[str]:
    """Every way the saved layers and tensors differ from ``model``'s (empty when they fit)."""
    saved_layers = {info["name"]: info for info in manifest["layers"]}
    current_layers = {info["name"]: info for info in layer_metadata(model)}
    problems = _key_problems("ROSA layers", list(saved_layers), list(current_layers))
    for name in saved_layers.keys() & current_layers.keys():
        saved_layer = {"singular_values": "split", **saved_layers[name]}  # older checkpoints: always the split
        for field in ("type", "base_type", "rank", "selection", "seed", "singular_values"):
            theirs, mine = saved_layer[field], current_layers[name][field]
            if theirs != mine:
                problems.append(f"ROSA layer {name!r}: {field} is {theirs!r} in the checkpoint, {mine!r} in the model")
    current = model.state_dict()
    problems += _key_problems("tensors", list(saved), list(current))
    for name in saved.keys() & current.keys():
        theirs, mine = saved[name], current[name]
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            problems.append(
                f"tensor {name!r}: {theirs.dtype} {list(theirs.shape)} in the checkpoint, "
                f"{mine.dtype} {list(mine.shape)} in the model"
            )
    return problems


def _optimizer_problems(saved: dict, optimizer: Any) -> list[str]:
    saved_groups = [len(g["params"]) for g in saved["state"]["param_groups"]]
    current_groups = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
    if saved_groups != current_groups:
        return [
            f"optimizer parameter groups hold {saved_groups} parameters in the checkpoint, "
            f"{current_groups} in this optimizer (build it over the same trainable parameters)"
        ]
    return []


def _schedule_problems(saved: dict, schedule: Any) -> list[str]:
    try:
        copy.deepcopy(schedule).load_state_dict(saved["state"])
    except (ValueError, KeyError, TypeError) as err:
        return [f"schedule state does not fit: {err}"]
    return []


def _training_problems(training: dict, optimizer: Any, scheduler: Any, schedule: Any) -> list[str]:
    problems = []
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (schedule, "schedule")):
        if obj is None:
            continue
        saved = training[key]
        if saved is None:
            problems.append(f"no {key} state in the checkpoint (it was saved without {key}=); pass {key}=None")
        elif saved["class"] != type(obj).__name__:
            problems.append(f"{key} is a {saved['class']} in the checkpoint, a {type(obj).__name__} here")
        elif key == "optimizer":
            problems += _optimizer_problems(saved, obj)
        elif key == "schedule":
            problems += _schedule_problems(saved, obj)
    return problems


def _problem_message(directory: Path, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return (
        f"checkpoint {str(directory)!r} does not fit what it is loaded into; nothing was changed:\n{lines}\n"
        "Build and rosa.wrap the model (and optimizer, scheduler, schedule) exactly as for the saved run; "
        "rosa.checkpoint.checkpoint_metadata(dir) shows the saved RosaConfig and layers."
    )


# -- reading -------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupted (not valid JSON: {err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupted or unreadable ({err})") from None


def _read_manifest(directory: Path) -> dict:
    """The checked manifest of ``directory``: right format, every data file present and intact."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint at {str(directory)!r} (not a directory)")
    manifest = _read_json(directory / MANIFEST)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(directory)!r} has format_version {version!r}; this rosa-peft reads version "
            f"{FORMAT_VERSION} (upgrade rosa-peft, or re-save the checkpoint)"
        )
    for name in DATA_FILES:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {str(path)!r} is missing; the checkpoint is incomplete")
        if _sha256(path) != manifest["files"][name]:
            raise CheckpointError(f"checkpoint file {str(path)!r} is corrupted (its SHA-256 differs from rosa.json)")
    return manifest


# -- atomic directory replacement ----------------------------------------------------------------
def _aside_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _temp_prefix(directory: Path) -> str:
    return f".{directory.name}."


def _recover(directory: Path) -> Path:
    """Move an orphaned aside copy back when a crash interrupted a replacement; returns ``directory``."""
    aside = _aside_path(directory)
    if not directory.exists() and aside.is_dir():
        os.rename(aside, directory)
        _fsync_dir(directory.parent)
    return directory


def _refuse_foreign(directory: Path) -> None:
    if directory.is_dir() and any(directory.iterdir()) and not is_checkpoint(directory):
        raise CheckpointError(
            f"{str(directory)!r} exists and is not a ROSA checkpoint; refusing to replace it. "
            "Choose a new or empty directory."
        )
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{str(directory)!r} is a file; choose a directory path for the checkpoint")


def _remove_stale_temps(directory: Path) -> None:
    """Delete temporary directories left by crashed saves of this checkpoint."""
    for path in directory.parent.glob(f"{_temp_prefix(directory)}*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def _write_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a temporary directory, then swap it in for ``directory``.

    At every instant either the old or the new checkpoint is complete, at ``directory`` or at its
    aside path (``_recover`` moves that back).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover(directory)
    _remove_stale_temps(directory)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(directory), suffix=".tmp", dir=directory.parent))
    try:
        write(tmp)
        for path in tmp.iterdir():
            _fsync_file(path)
        _fsync_dir(tmp)
        _swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, directory: Path) -> None:
    aside = _aside_path(directory)
    if directory.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(directory, aside)
    os.rename(tmp, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
