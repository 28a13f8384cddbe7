"""``seerattn env``: versions, GPU, interpreter mode and which op implementations can run here."""

from __future__ import annotations

import json

from ..env import environment


def _run(args) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"{key:<{width}}  {value}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("env", help="print versions, GPUs and available implementations")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
