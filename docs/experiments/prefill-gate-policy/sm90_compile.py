"""Compile one Triton kernel offline for Hopper (sm_90, no GPU needed) and read what ptxas reports: the shared
helper of ``proj_compile.py`` and ``scores_compile.py`` in this folder.

Pointers are declared fp32 and every integer argument 16-divisible (as the launches' strides are) except the
ones named as free; Hopper allows 227 KiB (232448 bytes) of shared memory per block, so a tile over it fails at
launch.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER_SHARED = 232448


def compile_sm90(
    fn, consts: dict, pointers: tuple[str, ...], free_ints: tuple[str, ...], warps: int, stages: int,
    floats: tuple[str, ...] = (),
) -> dict:  # fmt: skip
    """``fn`` (a ``@triton.jit`` kernel) with ``consts`` -> ``ptxas`` (registers / spill lines), ``shared`` bytes,
    ``fits`` (shared <= Hopper's limit) and ``mma`` (wgmma instructions in the PTX)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32" if name in pointers else "i32"
            if name not in free_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 64),
        options={"num_warps": warps, "num_stages": stages},
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True,
            check=True,
        )  # fmt: skip
    info = " ".join(
        line.split(":", 1)[-1].strip() for line in out.stderr.splitlines() if "registers" in line or "spill" in line
    )
    shared = kernel.metadata.shared
    return {"ptxas": info, "shared": shared, "fits": shared <= HOPPER_SHARED,
            "mma": kernel.asm["ptx"].count("wgmma.mma_async")}  # fmt: skip
