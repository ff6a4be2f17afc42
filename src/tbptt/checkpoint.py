"""Atomic, verified checkpoints of a whole training run: weights, optimizer, scheduler, RNG, the
streams.

A checkpoint is written to a temporary file beside its target and renamed over it, so a crash
during a save leaves the previous checkpoint whole. Non-finite weights are never saved. The file is
the ``torch.save`` archive followed by a trailer, ``TBPTT-CHECKPOINT 2 sha256 <digest> <length>``,
checked on every load before anything is read from the archive: a flipped bit, a truncated or
padded copy or a file that is not a checkpoint is a ``CheckpointError``, never a silently
different run. (``torch.load`` itself reads the file too; it ignores the trailer.)
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import IO, Any, Optional

import torch

from .files import PathLike, atomic_write
from .saved import CheckpointError as CheckpointError
from .saved import Fields, bad, tensor, tensor_dict

FORMAT = "tbptt-checkpoint"
VERSION = 2
_TRAILER = re.compile(rb"\nTBPTT-CHECKPOINT 2 sha256 ([0-9a-f]{64}) ([0-9]{20})\n\Z")
_TRAILER_SIZE = len(b"\nTBPTT-CHECKPOINT 2 sha256 %s %020d\n" % (b"0" * 64, 0))
_CHUNK = 1 << 22  # bytes hashed at a time when verifying


def rng_state() -> dict[str, Any]:
    """The random generators' states (torch CPU, CUDA when present, Python's)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def check_rng_state(saved: Any) -> None:
    """Raise a ``CheckpointError`` naming the field unless ``saved`` is what ``rng_state()`` returns."""
    f = Fields(saved, "rng")
    state = f.tensor("torch", torch.uint8)
    if tuple(state.shape) != tuple(torch.get_rng_state().shape):
        raise bad("rng.torch", f"a torch generator state of {torch.get_rng_state().numel()} bytes", state)
    python = f.raw("python")
    try:
        random.Random().setstate(python)
    except (TypeError, ValueError) as exc:
        raise bad("rng.python", "a Python generator state (random.getstate())", python) from exc
    if "cuda" in saved:
        for i, t in enumerate(f.list("cuda")):
            tensor(t, f"rng.cuda[{i}]", torch.uint8)


def set_rng_state(saved: Any) -> None:
    """Restore ``rng_state()``, once checked (``check_rng_state``)."""
    check_rng_state(saved)
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


class _Hashing:
    """A binary file that hashes and counts what is written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write(payload: dict[str, Any], f: IO[bytes]) -> None:
    body = _Hashing(f)
    torch.save({"format": FORMAT, "version": VERSION, **payload}, body)
    f.write(b"\nTBPTT-CHECKPOINT 2 sha256 %s %020d\n" % (body.hash.hexdigest().encode(), body.size))


def save(payload: dict[str, Any], path: PathLike) -> Path:
    """Write ``payload`` atomically to ``path`` with its content hash; refuses non-finite model weights."""
    path = Path(path)
    if not finite(payload.get("model", {})):
        raise CheckpointError(f"refusing to save non-finite weights to {path}; the previous checkpoint is kept")
    return atomic_write(path, lambda f: _write(payload, f))


def _verify(path: Path, f: IO[bytes]) -> None:
    """Check the archive in the open file ``f`` against its trailer (length and SHA-256)."""
    again = "; resume from an earlier checkpoint or start afresh"
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - _TRAILER_SIZE))
    trailer = _TRAILER.search(f.read(_TRAILER_SIZE))
    if trailer is None:
        f.seek(0)
        if f.read(4) == b"PK\x03\x04":
            raise CheckpointError(f"{path} is a torch.save archive without a tbptt {VERSION} trailer: not a tbptt "
                                  "checkpoint, one of an earlier version (without a content hash; not read), or one "
                                  f"truncated or corrupt at its end{again}")
        raise CheckpointError(f"{path} is not a readable checkpoint (its trailer is missing or damaged); it may be "
                              f"truncated or corrupt{again}")
    length = int(trailer.group(2))
    if length != size - _TRAILER_SIZE:
        raise CheckpointError(f"{path} is corrupt: it holds {size - _TRAILER_SIZE} bytes where {length} were written "
                              f"(truncated or padded){again}")
    digest = hashlib.sha256()
    f.seek(0)
    while length > 0:
        chunk = f.read(min(_CHUNK, length))
        if not chunk:
            break
        digest.update(chunk)
        length -= len(chunk)
    if digest.hexdigest().encode() != trailer.group(1):
        raise CheckpointError(f"{path} is corrupt: its content does not match the SHA-256 written with it (a "
                              f"changed byte: bit rot, a bad copy or an edit){again}")
    f.seek(0)


def load(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save``, its content hash verified; a clear ``CheckpointError`` if
    it is not one, or if any byte of it changed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint")
    with open(path, "rb") as f:  # verified and read through one open file: a rename meanwhile changes nothing
        _verify(path, f)
        data = _read(path, f)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tbptt checkpoint (no '{FORMAT}' tag)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}; this tbptt reads {VERSION}")
    return data


def _read(path: Path, f: IO[bytes]) -> Any:
    """The archive's content, read safely (``weights_only``: no code runs from a checkpoint)."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), None)
        if refused is None:
            raise CheckpointError(f"{path} is not a readable checkpoint (UnpicklingError: {exc})") from exc
        # a class of the user's (a state as a NamedTuple, say) that safe loading will not rebuild
        raise CheckpointError(
            f"{path} holds a type that safe loading refuses ({refused}); allow it with "
            "torch.serialization.add_safe_globals([TheClass]) before resuming"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def check_model(saved: Any, model: torch.nn.Module, path: Optional[PathLike] = None, field: str = "model") -> None:
    """Raise a ``CheckpointError`` naming what differs if ``saved`` (checkpoint field ``field``) is
    not finite weights that fit ``model``."""
    saved = tensor_dict(saved, field, finite=True)
    mine = model.state_dict()
    missing = sorted(set(mine) - set(saved))
    extra = sorted(set(saved) - set(mine))
    shapes = [f"{k}: saved {tuple(saved[k].shape)}, model {tuple(mine[k].shape)}"
              for k in sorted(set(mine) & set(saved)) if tuple(saved[k].shape) != tuple(mine[k].shape)]
    if missing or extra or shapes:
        where = f" in {path}" if path is not None else ""
        raise CheckpointError(
            f"the checkpoint{where} does not fit this model ({field}): missing {missing}, unexpected {extra}, "
            f"shape mismatches {shapes}"
        )
