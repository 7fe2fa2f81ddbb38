"""Checkpoints of a ROSA training run: exact resume, atomic replacement, every corruption detected, no pickle.

A checkpoint is a directory holding exactly these files:

* ``rosa.json`` (the manifest): format version, the ``RosaConfig``, each ROSA layer's metadata
  (name, type, rank, selection, seed, singular-value placement, resample count: the resample count
  fixes the layer's next subspace draw), the model class (and Hugging Face config), the index of
  the model state, the SHA-256 of ``training_state.json``, the SHA-256 of every tensor (its dtype,
  shape and bytes) keyed by its name (``0.up``; a training-state tensor by its path, as in
  ``optimizer.state.state.0.exp_avg``), and ``digest``: the SHA-256 of all of the above as canonical
  JSON (sorted keys, no spaces).
* ``model.safetensors``: every entry of ``model.state_dict()`` (``W_res`` base weights, factors,
  heads, buffers ...). Tied weights are stored once; the index records the other names.
* ``training_state.json`` + ``training_state.safetensors``: optimizer, LR scheduler and
  ``ResampleSchedule`` state, the torch / numpy / python RNG states and the caller's ``extra``;
  tensors go to safetensors, everything else to JSON.

Guaranteed:

* Integrity. Loading verifies the manifest's digest, the SHA-256 of the exact JSON bytes it parses
  and of every tensor it loads, under the tensor's name, before it changes the model, optimizer or
  anything else. A flipped bit, a truncated or missing file, an edited manifest or swapped index
  entries raise :class:`CheckpointError` and change nothing. (The digests detect damage, not a
  forger who rewrites them.)
* Crash safety. Saving writes a temporary directory ``.NAME.rosa-tmp-<random>`` beside the target
  and renames it into place; an existing checkpoint is renamed aside (``.NAME.rosa-aside``) first
  and deleted last, so a crash at any moment leaves a complete checkpoint (the next load or save
  renames an orphaned aside copy back, and a save deletes its own target's stale temporaries, no
  one else's).
* Concurrent saves. A save holds an exclusive lock on ``.NAME.rosa-lock`` beside the target
  (``fcntl.flock``, released when its process dies, the file removed after use): saves of the same
  checkpoint wait for each other and the last one stays; saves of different checkpoints in one
  folder never touch each other's files. Where the file system refuses locks (or off POSIX) saves
  warn and go unlocked: one writer per checkpoint then.
* Nothing poisoned, nothing foreign replaced. A save refuses (``NonFiniteError``) a state holding
  NaN or Inf in any floating tensor unless ``allow_non_finite=True``, and refuses
  (``CheckpointError``) to replace a directory that holds anything besides a checkpoint's own
  files. Both checks, like every other refusal, come before any file is touched.

Not guaranteed: a load that overlaps a save of the same checkpoint may fail with ``CheckpointError``
(it never loads a mix of the two; load again); Python numbers (``extra={"best": float("inf")}``,
scheduler state) are stored as they are, unchecked; files are not encrypted or signed.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RosaConfig
from .errors import raise_if_non_finite
from .model import CONFIG_ATTR, rosa_layers
from .ranks import update_digest

try:
    import fcntl
except ImportError:  # not POSIX: saves go unlocked (see the module docstring)
    fcntl = None

FORMAT_VERSION = 2
MANIFEST = "rosa.json"
MODEL_FILE = "model.safetensors"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
DATA_FILES = (MODEL_FILE, STATE_JSON, STATE_TENSORS)
# The fields of each layer's LayerSpec stored in the manifest, and checked against the model on load.
STORED_SETTINGS = ("selection", "seed", "singular_values")
TEMP_MARKER, ASIDE_MARKER, LOCK_MARKER = ".rosa-tmp-", ".rosa-aside", ".rosa-lock"
_TEMP_TOKEN = re.compile(r"[0-9a-f]{16}")  # secrets.token_hex(8)

PathLike = Union[str, os.PathLike]

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS}
_MAX_LISTED = 10
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # file systems without flock


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
    *,
    allow_non_finite: bool = False,
) -> Path:
    """Write a checkpoint of ``model`` (and the given training state) to ``directory``, atomically.

    ``extra`` is any JSON-like dict (tensors allowed), e.g. ``{"step": 100}``; ``load_checkpoint``
    returns it. An existing checkpoint at ``directory`` is replaced. Refused, with nothing written:
    a state holding NaN or Inf in a floating tensor (``NonFiniteError``, unless
    ``allow_non_finite=True``), and a ``directory`` that holds anything but a checkpoint's own files
    (``CheckpointError``). Returns the checkpoint path.
    """
    directory = Path(directory)
    model_tensors = _TensorTable()
    state_tensors = _TensorTable()
    model_index = _encode(model.state_dict(), "", model_tensors)
    training = _encode(_training_state(optimizer, scheduler, schedule, extra), "", state_tensors)
    if not allow_non_finite:
        raise_if_non_finite(
            [(f"model.{name}", t) for name, t in model_tensors.tensors.items()] + list(state_tensors.tensors.items()),
            "rosa.save_checkpoint",
            f"The checkpoint at {str(directory)!r} was left as it was: load it to go back to the last good state "
            "(and lower the learning rate), or pass allow_non_finite=True to save this state anyway.",
        )
    training_json = _json_bytes(training)
    manifest = _manifest(model, model_index)
    manifest["files"] = {STATE_JSON: hashlib.sha256(training_json).hexdigest()}
    manifest["tensors"] = {MODEL_FILE: model_tensors.digests, STATE_TENSORS: state_tensors.digests}
    manifest = json.loads(json.dumps(manifest))  # as a load will read it (tuples become lists ...)
    manifest["digest"] = _manifest_digest(manifest)

    def write(tmp: Path) -> None:
        save_file(model_tensors.tensors, tmp / MODEL_FILE)
        save_file(state_tensors.tensors, tmp / STATE_TENSORS)
        (tmp / STATE_JSON).write_bytes(training_json)
        (tmp / MANIFEST).write_bytes(_json_bytes(manifest))

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
    training = _read_training(directory, manifest)
    model_state = _read_state(directory, MODEL_FILE, manifest["model"], manifest)

    problems = _model_problems(manifest, model_state, model)
    problems += _training_problems(training, optimizer, scheduler, schedule)
    if problems:
        raise CheckpointError(_problem_message(directory, problems))

    model.load_state_dict(model_state)  # the resample counts are buffers: they come with the state dict
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
    return _read_training(directory, _read_manifest(directory))["extra"] or {}


def is_checkpoint(directory: PathLike) -> bool:
    """Whether ``directory`` holds a checkpoint written by :func:`save_checkpoint`."""
    return (Path(directory) / MANIFEST).is_file()


# -- what gets stored ----------------------------------------------------------------------------
def layer_metadata(model: nn.Module) -> list[dict]:
    """Name, type, rank, selection, seed and singular-value placement of every ROSA layer of ``model``.

    The resample counts are not here: they are buffers of the layers, stored with the other tensors.
    """
    return [
        {
            "name": name,
            "type": type(layer).__name__,
            "base_type": type(layer.base).__name__,
            "rank": layer.rank,
            **{setting: getattr(layer.spec, setting) for setting in STORED_SETTINGS},
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
    """Tensors collected while encoding, each stored once (safetensors refuses shared storage).

    ``digests`` holds the SHA-256 of the tensor at every path, a tensor stored once but reached by
    several paths (tied weights) included.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.digests: dict[str, str] = {}
        self._keys: dict[tuple, str] = {}
        self._storages: set[int] = set()

    def add(self, key: str, tensor: torch.Tensor) -> str:
        """Store ``tensor`` under ``key`` unless the same tensor is stored already; returns its key."""
        ident = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if ident in self._keys:
            stored = self._keys[ident]
            self.digests[key] = self.digests[stored]
            return stored
        value = tensor.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in self._storages and value.numel():
            value = value.clone()
        self._storages.add(value.untyped_storage().data_ptr())
        self._keys[ident] = key
        self.tensors[key] = value
        self.digests[key] = _tensor_sha256(value)
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


def _decode(value: Any, tensors: dict[str, torch.Tensor], digests: dict[str, str], source: Path) -> Any:
    """Inverse of :func:`_encode`; every tensor must match the SHA-256 ``digests`` holds for its path."""

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, list):
            return [walk(v, _join(path, i)) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if _TENSOR in value:
            tensor = tensors.get(value[_TENSOR])
            if tensor is None:
                raise _corrupted(source, f"it lacks tensor {value[_TENSOR]!r}")
            if digests.get(path) != _tensor_sha256(tensor):
                raise _corrupted(source, f"the tensor for {path!r} differs from its SHA-256 in {MANIFEST}")
            return tensor
        if _TUPLE in value:
            return tuple(walk(v, _join(path, i)) for i, v in enumerate(value[_TUPLE]))
        if _ITEMS in value:
            items = [(walk(k, path), v) for k, v in value[_ITEMS]]
            return {k: walk(v, _join(path, k)) for k, v in items}
        return {k: walk(v, _join(path, k)) for k, v in value.items()}

    return walk(value, "")


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
        for field in ("type", "base_type", "rank", *STORED_SETTINGS):
            theirs, mine = saved_layers[name][field], current_layers[name][field]
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
def _parse_json(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupted(path, f"not valid JSON: {err}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _missing(path) from None


def _missing(path: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint file {str(path)!r} is missing; the checkpoint is incomplete")


def _corrupted(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {str(path)!r} is corrupted ({what}); nothing was loaded")


def _read_manifest(directory: Path) -> dict:
    """The verified manifest of ``directory``: this format, its digest intact."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint at {str(directory)!r} (not a directory)")
    path = directory / MANIFEST
    manifest = _parse_json(path, _read_bytes(path))
    if not isinstance(manifest, dict):
        raise _corrupted(path, "not a JSON object")
    if "digest" in manifest and manifest["digest"] != _manifest_digest(manifest):
        raise _corrupted(path, "its content differs from its digest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        fix = ("upgrade rosa-peft" if newer else
               "it was written by an older rosa-peft, without the digests this one verifies: resume it with "
               "that release, or start the run again")
        raise CheckpointError(
            f"checkpoint {str(directory)!r} has format_version {version!r}; this rosa-peft reads version "
            f"{FORMAT_VERSION} ({fix})"
        )
    if "digest" not in manifest:
        raise _corrupted(path, "its digest is missing")
    return manifest


def _read_training(directory: Path, manifest: dict) -> dict:
    """The verified training state (optimizer, scheduler, schedule, RNG, extra) of ``directory``."""
    path = directory / STATE_JSON
    data = _read_bytes(path)
    if hashlib.sha256(data).hexdigest() != manifest["files"][STATE_JSON]:
        raise _corrupted(path, f"its SHA-256 differs from {MANIFEST}")
    return _read_state(directory, STATE_TENSORS, _parse_json(path, data), manifest)


def _read_state(directory: Path, name: str, encoded: Any, manifest: dict) -> Any:
    """``encoded`` decoded with the tensors of ``directory/name``, each checked against the manifest."""
    path = directory / name
    if not path.is_file():
        raise _missing(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise _corrupted(path, f"unreadable: {err}") from None
    return _decode(encoded, tensors, manifest["tensors"][name], path)


# -- integrity -----------------------------------------------------------------------------------
def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest without its ``digest``, as canonical JSON."""
    body = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    update_digest(digest, tensor)
    return digest.hexdigest()


# -- atomic directory replacement ----------------------------------------------------------------
def _sibling(directory: Path, marker: str) -> Path:
    """``.NAME<marker>`` beside ``directory``: its aside copy, lock file or a temporary directory."""
    return directory.with_name(f".{directory.name}{marker}")


def _is_own_temp(directory: Path, path: Path) -> bool:
    prefix = f".{directory.name}{TEMP_MARKER}"
    return path.name.startswith(prefix) and _TEMP_TOKEN.fullmatch(path.name[len(prefix):]) is not None


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``directory``'s checkpoint, waiting while another process holds it."""
    path = _sibling(directory, LOCK_MARKER)
    fd = _lock(path)
    try:
        yield
    finally:
        _unlink(path)  # while still locked: a waiter on this file sees it gone and locks a fresh one
        if fd is not None:
            os.close(fd)


def _lock(path: Path) -> Optional[int]:
    """An open descriptor of the lock file ``path``, exclusively locked; ``None`` where locks are unsupported."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "fcntl is not available")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException as err:
            os.close(fd)
            if not (isinstance(err, OSError) and err.errno in _NO_LOCKS):
                raise
            warnings.warn(f"cannot lock {str(path)!r} ({err}); saving unlocked: make sure only one process at a "
                          "time saves this checkpoint", RuntimeWarning, stacklevel=6)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the previous holder removed this file: lock the one now at the path


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _recover(directory: Path) -> Path:
    """Move an orphaned aside copy back when a crash interrupted a replacement; returns ``directory``."""
    if directory.exists() or not _sibling(directory, ASIDE_MARKER).is_dir():
        return directory
    with _locked(directory):
        _recover_locked(directory)
    return directory


def _recover_locked(directory: Path) -> None:
    aside = _sibling(directory, ASIDE_MARKER)
    if not directory.exists() and aside.is_dir():
        os.rename(aside, directory)
        _fsync_dir(directory.parent)


def _refuse_to_replace(directory: Path) -> None:
    """Raise ``CheckpointError`` unless ``directory`` is absent, empty or holds only a checkpoint's own files."""
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{str(directory)!r} is a file; choose a directory path for the checkpoint")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not is_checkpoint(directory):
        raise CheckpointError(
            f"{str(directory)!r} exists and is not a ROSA checkpoint; refusing to replace it. "
            "Choose a new or empty directory."
        )
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                     if p.name not in (MANIFEST, *DATA_FILES))
    if foreign:
        raise CheckpointError(
            f"checkpoint {str(directory)!r} also holds {_listed(foreign)}, which saving would delete; refusing to "
            "replace it. Move them out of the checkpoint directory, or save to another directory."
        )


def _remove_stale_temps(directory: Path) -> None:
    """Delete temporary directories left by crashed saves of this checkpoint (only this one's)."""
    for path in directory.parent.iterdir():
        if _is_own_temp(directory, path):
            shutil.rmtree(path, ignore_errors=True)


def _write_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a temporary directory, then swap it in for ``directory``, holding its lock.

    At every instant either the old or the new checkpoint is complete, at ``directory`` or at its
    aside path (``_recover`` moves that back).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        _recover_locked(directory)
        _refuse_to_replace(directory)
        _remove_stale_temps(directory)
        tmp = _sibling(directory, TEMP_MARKER + secrets.token_hex(8))
        tmp.mkdir()
        try:
            write(tmp)
            for path in tmp.iterdir():
                _fsync_file(path)
            _fsync_dir(tmp)
            _swap_in(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, directory: Path) -> None:
    aside = _sibling(directory, ASIDE_MARKER)
    if directory.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(directory, aside)
    os.rename(tmp, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
