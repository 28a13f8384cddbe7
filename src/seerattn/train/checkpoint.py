"""Atomic training checkpoints: ``<run>/checkpoints/step_NNNNNNN/state.pt``.

A checkpoint is written into a hidden temporary folder, flushed to disk, and renamed into place:
the rename is atomic, so a folder named ``step_*`` is always complete and a kill at any moment
leaves either the previous set of checkpoints or the new one (plus a ``.tmp-*`` folder that the
next save removes). The newest ``step_*`` folder is the one to resume from; no pointer file is
needed. Files are read back with ``torch.load(weights_only=True)`` (no pickled code runs).

A checkpoint damaged later (a truncated copy, a disk error, a file overwritten by hand) is not
trusted: :func:`load_checkpoint` refuses it with an error naming the file, and
:func:`latest_valid_checkpoint` (what ``--resume`` uses) falls back to the newest readable one,
with a warning for each newer one it skips.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "capture_rng",
    "latest_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, folder)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as checkpoint ``step`` atomically, then keep only the ``keep`` newest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved by an earlier launch that was killed afterwards
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    logger.info("checkpoint %s", final)
    return final


def load_checkpoint(
    folder: str | Path, map_location: str | torch.device = "cpu", required: Iterable[str] = ("step",)
) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint` in ``folder``, checked.

    Raises ValueError naming the file when it is not a readable torch archive (truncated, empty,
    overwritten), holds anything but tensors and plain containers (refused, never unpickled), is
    not a dict, lacks one of the ``required`` keys, or holds a ``step`` other than its folder's.
    """
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {folder} has no {STATE_FILE}")
    # torch.save writes a zip archive whose directory sits at the end: a truncated or overwritten
    # file fails this check before torch.load reports an internal reader error.
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"checkpoint {path} is damaged: not a complete torch archive ({path.stat().st_size} bytes; "
            "truncated or overwritten?)"
        )
    try:
        # mmap: tensors stay file-backed until copied into the model and optimizer, so N ranks resuming
        # on one host share the page cache instead of each holding the whole state (96 GB for an 8B run).
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        # ``from None``: torch's message suggests weights_only=False, i.e. running the file's code.
        raise ValueError(
            f"checkpoint {path} holds objects other than tensors and plain containers; seerattn checkpoints "
            "never do, so the file is refused (it is not unpickled)"
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"checkpoint {path} is damaged: {type(e).__name__} {first[:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; a checkpoint holds {sorted(required)}")
    if "step" in state:
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"checkpoint {path} holds step {step!r}, expected an int >= 0")
        m = _STEP_DIR.match(folder.name)
        if m and int(m.group(1)) != step:
            raise ValueError(f"checkpoint {path} holds step {step} but its folder is {folder.name}")
    return state


def latest_valid_checkpoint(
    root: str | Path, required: Iterable[str] = ("step",), map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """``(folder, state)`` of the newest checkpoint under ``root`` that :func:`load_checkpoint` accepts.

    Each newer ``step_*`` folder that it rejects is logged as a warning (and left in place: the next
    save of that step replaces it). None when ``root`` holds no ``step_*`` folder; ValueError, listing
    why, when it holds some but none is readable (resuming from nothing would silently restart).
    """
    root = Path(root)
    folders = sorted(
        (int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ()) if (m := _STEP_DIR.match(p.name))
    )
    reasons = []
    for _, folder in reversed(folders):
        try:
            return folder, load_checkpoint(folder, map_location, required)
        except ValueError as e:
            logger.warning("skipping checkpoint %s: %s", folder, e)
            reasons.append(str(e))
    if reasons:
        raise ValueError(f"no readable checkpoint under {root}: " + "; ".join(reasons))
    return None


def capture_rng() -> dict[str, Any]:
    """Every RNG state that could influence training (python, numpy, torch CPU and CUDA)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            logger.warning(
                "checkpoint has %d CUDA RNG states, this machine %d GPUs: CUDA RNG not restored",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
        else:
            torch.cuda.set_rng_state_all(state["cuda"])
