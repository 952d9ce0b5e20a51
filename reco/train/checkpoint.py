"""Training checkpoints: one .safetensors file holding everything needed to resume bit-exactly.

Tensors (safetensors; each contiguous, on CPU, sharing no memory):

    model.<name>                  the model's state_dict
    optim.state.<i>.<key>         the optimizer's per-parameter state (exp_avg, step, ...)
    scheduler.<...>, extra.<...>  tensors found inside the scheduler state or `extra`, if any
    rng.torch                     torch.get_rng_state(), uint8
    rng.cuda.<i>                  torch.cuda.get_rng_state(i) for each visible GPU (if CUDA is on)

Metadata (safetensors metadata is str -> str; values here are JSON):

    format = "reco-checkpoint", version = "1", step, config, extra,
    optim.state / optim.param_groups / scheduler: the structure of those state dicts, with each
        tensor replaced by {"__tensor__": "<tensor name>"}, tuples by {"__tuple__": [...]} and
        dicts with non-str keys (the optimizer's param indices) by {"__items__": [[k, v], ...]},
        so load_state_dict gets back exactly what state_dict gave
    rng.numpy, rng.python: np.random.get_state() and random.getstate() as lists

Files are written atomically (temp file in the same folder, fsync, os.replace, fsync folder): a
crash leaves the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from ..memory.files import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "reco-checkpoint"
CHECKPOINT_VERSION = 1
# step-00001234.safetensors; more digits once step >= 10**8 (the pattern allows them).
_CHECKPOINT_NAME = re.compile(r"step-(\d{8,})\.safetensors")
_TAGS = ("__tensor__", "__tuple__", "__items__")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """directory / step-<step, 8 digits zero-padded>.safetensors."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(directory) / f"step-{step:08d}.safetensors"


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The step-<step>.safetensors file in directory with the highest step, or None if there is
    none (or no such directory). Temp files of interrupted writes do not match the pattern."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in directory.iterdir():
        m = _CHECKPOINT_NAME.fullmatch(p.name)
        if m and p.is_file():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, p)
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------
# Encoding nested state (dicts / lists / tuples / scalars / tensors) as JSON plus tensors


def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """obj as JSON-able data; each tensor goes into `tensors` under `name` (its dotted path) and is
    replaced by a reference to it."""
    if isinstance(obj, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two tensors would be saved under the name {name!r}")
        # A copy on CPU, contiguous: safetensors refuses tensors that share memory (tied weights,
        # views) and the copy must not change when training goes on.
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(t in obj for t in _TAGS):
            return {k: _encode(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        for k in obj:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"{name}: cannot save a dict key {k!r} ({type(k).__name__})")
        return {"__items__": [[k, _encode(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    raise TypeError(f"{name}: cannot save a value of type {type(obj).__name__}: {obj!r}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of _encode."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((tag, value),) = obj.items()
            if tag == "__tensor__":
                return tensors[value]
            if tag == "__tuple__":
                return tuple(_decode(v, tensors) for v in value)
            if tag == "__items__":
                return {k: _decode(v, tensors) for k, v in value}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    step: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Writes model, optimizer, scheduler, RNG states, step, config (JSON-able, e.g. to_dict of
    the config dataclass) and extra (JSON-able data and tensors) to one .safetensors file,
    atomically. Creates the parent folder if needed. Call it on one rank only."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {
        "format": CHECKPOINT_FORMAT,
        "version": str(CHECKPOINT_VERSION),
        "step": str(int(step)),
    }
    try:
        meta["config"] = json.dumps(config)
    except TypeError as e:
        raise TypeError(f"config must be JSON-serializable (use to_dict(cfg)): {e}") from e
    meta["extra"] = json.dumps(_encode(extra or {}, "extra", tensors))

    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):  # e.g. a module's get_extra_state()
            raise TypeError(f"model state {name!r} is a {type(value).__name__}, not a tensor")
        _encode(value, f"model.{name}", tensors)

    if optimizer is not None:
        sd = optimizer.state_dict()
        meta["optim.state"] = json.dumps(_encode(sd["state"], "optim.state", tensors))
        meta["optim.param_groups"] = json.dumps(
            _encode(sd["param_groups"], "optim.param_groups", tensors)
        )
    if scheduler is not None:
        meta["scheduler"] = json.dumps(_encode(scheduler.state_dict(), "scheduler", tensors))

    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state.cpu()
    # The legacy global numpy RNG is the one other code seeds and draws from (np.random.seed).
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    meta["rng.numpy"] = json.dumps([name, keys.tolist(), int(pos), int(has_gauss), cached])
    version, internal, gauss_next = random.getstate()
    meta["rng.python"] = json.dumps([version, list(internal), gauss_next])

    # One file, written atomically (a dot name latest_checkpoint does not match, fsync, rename).
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restores what save_checkpoint wrote into model (strict), optimizer and scheduler (if given)
    and the torch/CUDA/numpy/Python RNG states (if restore_rng). Build the optimizer and
    scheduler as for a fresh run, then call this. Returns {"step": int, "config": dict,
    "extra": dict}.

    Raises FileNotFoundError for a missing file and ValueError (naming the path) for a file that
    is not a reco checkpoint, a model whose parameter names or shapes differ (naming the first
    differing key), or an optimizer/scheduler asked for but not saved.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path} is not a reco checkpoint (no format={CHECKPOINT_FORMAT})")
            if meta.get("version") != str(CHECKPOINT_VERSION):
                raise ValueError(
                    f"{path}: unsupported reco checkpoint version {meta.get('version')!r} "
                    f"(this reco reads version {CHECKPOINT_VERSION})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # SafetensorError / OSError for a file that is not safetensors
        raise ValueError(
            f"{path} is not a reco checkpoint (cannot read it as safetensors: {e})"
        ) from e

    def moved(ts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if torch.device(map_location) == torch.device("cpu"):
            return ts
        return {k: v.to(map_location) for k, v in ts.items()}

    # The model: compare names and shapes first, for an error naming the first differing key.
    saved = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in saved:
            raise ValueError(f"{path}: model key {key!r} is not in the checkpoint")
        if tuple(saved[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{path}: model key {key!r} has shape {tuple(saved[key].shape)} in the checkpoint "
                f"but {tuple(value.shape)} in the model"
            )
    for key in saved:
        if key not in expected:
            raise ValueError(f"{path}: checkpoint key {key!r} is not in the model")
    model.load_state_dict(moved(saved), strict=True)

    others = moved({k: v for k, v in tensors.items() if not k.startswith(("model.", "rng."))})
    if optimizer is not None:
        if "optim.state" not in meta:
            raise ValueError(f"{path}: the checkpoint holds no optimizer state")
        state = {
            "state": _decode(json.loads(meta["optim.state"]), others),
            "param_groups": _decode(json.loads(meta["optim.param_groups"]), others),
        }
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: the optimizer state does not fit this optimizer: {e}") from e
    if scheduler is not None:
        if "scheduler" not in meta:
            raise ValueError(f"{path}: the checkpoint holds no scheduler state")
        scheduler.load_state_dict(_decode(json.loads(meta["scheduler"]), others))

    if restore_rng:
        _restore_rng(tensors, meta, path)

    return {
        "step": int(meta["step"]),
        "config": json.loads(meta["config"]),
        "extra": _decode(json.loads(meta["extra"]), others),
    }


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith("rng.cuda.")}
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(cuda):
            warnings.warn(
                f"{path}: saved CUDA RNG states of {len(cuda)} GPUs, {count} visible now; "
                f"restoring the first {min(count, len(cuda))}",
                stacklevel=3,
            )
        for i, state in cuda.items():
            if i < count:
                torch.cuda.set_rng_state(state, i)
    name, keys, pos, has_gauss, cached = json.loads(meta["rng.numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss_next = json.loads(meta["rng.python"])
    random.setstate((version, tuple(internal), gauss_next))
