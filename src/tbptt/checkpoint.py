"""Atomic checkpoints of a whole training run: weights, optimizer, scheduler, RNG, the streams.

A checkpoint is written to a temporary file beside its target and renamed over it, so a crash
during a save leaves the previous checkpoint whole. Non-finite weights are never saved.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from .files import PathLike, atomic_write

FORMAT = "tbptt-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not belong to this model and schedule."""


def rng_state() -> dict[str, Any]:
    """The random generators' states (torch CPU, CUDA when present, Python's)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def finite(tree: Any) -> bool:
    """Whether every floating tensor in a nesting of dicts, lists and tuples is finite."""
    if isinstance(tree, torch.Tensor):
        return bool(torch.isfinite(tree).all()) if tree.is_floating_point() else True
    if isinstance(tree, dict):
        return all(finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(finite(v) for v in tree)
    return True


def save(payload: dict[str, Any], path: PathLike) -> Path:
    """Write ``payload`` atomically to ``path``; refuses non-finite model weights."""
    path = Path(path)
    if not finite(payload.get("model", {})):
        raise CheckpointError(f"refusing to save non-finite weights to {path}; the previous checkpoint is kept")
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def load(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save``; a clear ``CheckpointError`` if it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), None)
        if refused is None:
            raise CheckpointError(
                f"{path} is not a readable checkpoint (UnpicklingError); it may be truncated or corrupt: "
                "resume from an earlier checkpoint or start afresh"
            ) from exc
        # a class of the user's (a state as a NamedTuple, say) that safe loading will not rebuild
        raise CheckpointError(
            f"{path} holds a type that safe loading refuses ({refused}); allow it with "
            "torch.serialization.add_safe_globals([TheClass]) before resuming"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}); it may be truncated "
            "or corrupt: resume from an earlier checkpoint or start afresh"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tbptt checkpoint (no '{FORMAT}' tag)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}; this tbptt reads {VERSION}")
    return data


def check_model(saved: dict[str, torch.Tensor], model: torch.nn.Module, path: Optional[PathLike] = None) -> None:
    """Raise a ``CheckpointError`` naming what differs if ``saved`` does not fit ``model``."""
    mine = model.state_dict()
    missing = sorted(set(mine) - set(saved))
    extra = sorted(set(saved) - set(mine))
    shapes = [f"{k}: saved {tuple(saved[k].shape)}, model {tuple(mine[k].shape)}"
              for k in sorted(set(mine) & set(saved)) if tuple(saved[k].shape) != tuple(mine[k].shape)]
    if missing or extra or shapes:
        where = f" in {path}" if path is not None else ""
        raise CheckpointError(
            f"the checkpoint{where} does not fit this model: missing {missing}, unexpected {extra}, "
            f"shape mismatches {shapes}"
        )
