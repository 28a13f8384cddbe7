"""The fused gate's scores kernel compiled offline for sm_90 (no GPU needed): registers, spills and shared memory
per tile and precision, the figures behind ``gate_fwd.SCORES_TILE``.

    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/scores_compile.py \\
        --tiles 128,32,8,2 128,64,8,1 64,64,8,2 --precisions tf32x3 ieee --r 4

Llama-3.1-8B's windowed gate: Dg 128 (HALF_P 64), RoPE, ``R = block_size // q_step`` windows per block; pointers
and strides declared 16-divisible as the launch's are. ptxas (Triton's own) reports registers and spills; Hopper
allows 227 KiB (232448 bytes) of shared memory per block, so a tile over it fails at launch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seerattn.ops._triton import gate_fwd

HOPPER_SHARED = 232448
POINTERS = ("QG", "KG", "Cos", "Sin", "Out")
NOT_DIVISIBLE = ("stride_cb", "HQ", "n_row_tiles")  # batch stride 0, head count, tile count: any value


def compile_stats(windows: int, block_j: int, warps: int, stages: int, precision: str, r: int) -> dict:
    fn = gate_fwd._gate_scores_kernel
    consts = dict(R=r, HALF_P=64, BLOCK_I=max(1, windows // r), BLOCK_J=block_j, ROPE=True, PRECISION=precision)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name == "sqrt_dg":
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32" if name in POINTERS else "i32"
            if name not in NOT_DIVISIBLE:
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
            [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    info = " ".join(
        line.split(":", 1)[-1].strip() for line in out.stderr.splitlines() if "registers" in line or "spill" in line
    )
    shared = kernel.metadata.shared
    return {"tile": [windows, block_j, warps, stages], "precision": precision, "R": r, "ptxas": info,
            "shared": shared, "fits": shared <= HOPPER_SHARED}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", nargs="+", default=[",".join(map(str, gate_fwd.SCORES_TILE))])
    p.add_argument("--precisions", nargs="+", default=list(gate_fwd.PRECISIONS), choices=gate_fwd.PRECISIONS)
    p.add_argument("--r", type=int, default=4)
    args = p.parse_args()
    for tile in args.tiles:
        windows, block_j, warps, stages = (int(x) for x in tile.split(","))
        for precision in args.precisions:
            print(compile_stats(windows, block_j, warps, stages, precision, args.r), flush=True)


if __name__ == "__main__":
    main()
