"""A description of the environment (versions, GPUs, usable op implementations), saved next to
every run's outputs and printed by ``seerattn env``."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def environment() -> dict:
    """A JSON-serialisable description of this environment (also saved next to run outputs)."""
    import torch

    from . import __version__

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    from .ops import fa4

    cuda = torch.cuda.is_available()
    impls = {"reference": True, "triton": cuda and version("triton") is not None, "flex": cuda}
    impls["fa4"] = cuda and fa4.installed()  # the GPU family and each call's shape are checked per call
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
        "flash_attn_4": fa4.version(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "triton_interpret": interpret,
        "impls": impls,
    }
