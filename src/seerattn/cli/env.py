"""``seerattn env``: versions, GPU, interpreter mode and which op implementations can run here."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform


def environment() -> dict:
    """A JSON-serialisable description of this environment (also saved next to run outputs)."""
    import torch

    from .. import __version__

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    impls = {"reference": True, "triton": cuda and version("triton") is not None, "flex": cuda}
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret and version("triton") is not None:
        impls["triton"] = "interpreter (CPU, fp32/fp16 only)"
    return {
        "seerattn": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "triton_interpret": interpret,
        "impls": impls,
    }


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
