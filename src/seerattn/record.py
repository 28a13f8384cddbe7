"""The one kind of run record that distillation, fine-tuning, evaluation and the benchmarks write.

A record is a JSON object::

    {"kind": "ppl" | "passkey" | "distill" | "finetune" | "bench-attention" | ...,
     "created": ISO-8601 UTC time,
     "environment": versions, GPUs and git commit (:func:`environment`),
     "config": the resolved configuration of the run,
     "model": what was run on (id/path, shape, adapter), may be empty,
     "results": the run's metrics or rows}

Non-finite floats become ``null`` (NaN) or ``"inf"`` / ``"-inf"`` so that the file is strict JSON. Files are
written atomically (temporary file, then rename), so a kill never leaves a torn record.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = [
    "environment",
    "git_commit",
    "jsonable",
    "read_jsonl",
    "read_record",
    "write_json_atomic",
    "write_record",
]

logger = logging.getLogger(__name__)


def git_commit(root: str | Path | None = None) -> str | None:
    """The commit of the checkout at ``root`` (default: this package's source tree), ``+dirty`` when the
    tracked files differ from it; ``SEERATTN_COMMIT`` overrides (machines without ``.git``); None when unknown."""
    if os.environ.get("SEERATTN_COMMIT"):
        return os.environ["SEERATTN_COMMIT"]
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return head + ("+dirty" if dirty else "")


def environment() -> dict:
    """:func:`seerattn.env.environment` plus the git commit."""
    from .env import environment as env

    return {**env(), "commit": git_commit()}


def jsonable(x: Any) -> Any:
    """``x`` with non-finite floats replaced (see the module docstring), tuples as lists, paths as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def write_record(
    path: str | Path,
    kind: str,
    results: Any,
    config: dict | None = None,
    model: dict | None = None,
    environment_extra: dict | None = None,
) -> Path:
    """Write a run record (module docstring) to ``path``; ``environment_extra`` adds run facts such as the
    world size or the device to the environment block."""
    record = {
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {**environment(), **(environment_extra or {})},
        "config": config or {},
        "model": model or {},
        "results": results,
    }
    return write_json_atomic(path, record)


def read_record(path: str | Path) -> dict:
    """A record written by :func:`write_record`; raises ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    missing = {"kind", "created", "environment", "config", "model", "results"} - set(record)
    if not isinstance(record, dict) or missing:
        raise ValueError(f"{path} is not a seerattn run record (missing {sorted(missing)})")
    return record


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file such as a run's ``metrics.jsonl``, one per non-blank line.

    A log is appended to line by line, so a kill during a write leaves a torn *last* line: it is
    dropped with a warning (the rows before it are whole). A line that does not parse anywhere else,
    or one that is not an object, is damage that a kill cannot cause: ValueError naming the file and line.
    """
    path = Path(path)
    numbered = [(i + 1, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    rows = []
    for n, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == numbered[-1][0]:
                logger.warning("%s: dropping the torn last line %d (%s): %.80r", path, n, e.msg, line)
                break
            raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}); only the last line may be torn") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n} holds a JSON {type(row).__name__}, expected an object")
        rows.append(row)
    return rows
