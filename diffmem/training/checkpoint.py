"""Checkpoints and snapshots on disk.

Both are plain torch.save files of dicts holding only tensors, numbers, strings, lists,
tuples and None, so they load with torch.load(weights_only=True): opening a checkpoint
never runs code from it (EDM's pickled networks do).

Every write goes to a temporary file beside the target and is moved into place with
os.replace, which is atomic on POSIX: a crash or a full disk mid-write leaves the previous
file intact and no partial one.
"""
from __future__ import annotations

import json
import os
import pathlib
import secrets
from typing import Any, Callable

import torch

CHECKPOINT_FORMAT = "diffmem-training-checkpoint"
SNAPSHOT_FORMAT = "diffmem-snapshot"
FORMAT_VERSION = 1


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> pathlib.Path:
    """Call write(file) on a temporary file beside `path`, then move it into place."""
    path = pathlib.Path(path)
    # A unique name in the target's folder (os.replace cannot cross file systems), created
    # exclusively; unlike mkstemp it gets the usual umask permissions, not 0600.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, mode.replace("w", "x")) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a partial temporary file behind.
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created; the original error is the one to report
        raise
    return path


def save_atomic(obj: Any, path: str | os.PathLike) -> pathlib.Path:
    """torch.save(obj) to `path`, atomically."""
    return write_atomic(path, lambda file: torch.save(obj, file), "wb")


def write_json_atomic(obj: Any, path: str | os.PathLike) -> pathlib.Path:
    """JSON (indented, sorted keys as given) to `path`, atomically."""
    return write_atomic(path, lambda file: file.write(json.dumps(obj, indent=2) + "\n"), "w")


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint or snapshot, loaded without unpickling arbitrary objects."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    state = load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a diffmem training checkpoint")
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)} has checkpoint version {state.get('version')}, expected {FORMAT_VERSION}")
    return state


def load_snapshot(path: str | os.PathLike) -> dict:
    state = load(path)
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a diffmem snapshot")
    return state


def snapshot_name(nimg: int) -> str:
    """The reference's naming, by whole kimg of training: snapshot-002500.pt."""
    return f"snapshot-{nimg // 1000:06d}.pt"
