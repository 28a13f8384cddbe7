"""The gate's projection + RoPE kernel (``gate_fwd._project_kernel``, branch wip/gate-proj) compiled offline for
sm_90 (no GPU needed): registers, spills and shared memory per tile and precision, the figures behind
``gate_fwd.PROJ_TILE``.

    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/proj_compile.py \\
        --tiles 128,32,8,3 128,32,8,2 128,64,8,2 64,32,4,3 128,16,8,3

Llama-3.1-8B's windowed gate: Dg 128 (two [BLOCK_M, 64] accumulators), RoPE on; pointers and strides declared
16-divisible as the launch's are. Tile = (gate vectors per program, channels per step, warps, stages).
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
POINTERS = ("X", "W", "C", "S", "Out")
NOT_DIVISIBLE = ("N", "HQ", "G", "HALF")


def compile_stats(block_m: int, block_k: int, warps: int, stages: int, precision: str, rope: bool = True) -> dict:
    fn = gate_fwd._project_kernel
    consts = dict(C_STEP=1, ROPE=rope, HALF_P=64, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=precision)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
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
    return {"tile": [block_m, block_k, warps, stages], "precision": precision, "ptxas": info, "shared": shared,
            "fits": shared <= HOPPER_SHARED, "mma": kernel.asm["ptx"].count("wgmma.mma_async")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", nargs="+", default=[",".join(map(str, gate_fwd.PROJ_TILE))])
    p.add_argument("--precisions", nargs="+", default=["tf32x3"], choices=gate_fwd.PRECISIONS)
    args = p.parse_args()
    for tile in args.tiles:
        block_m, block_k, warps, stages = (int(x) for x in tile.split(","))
        for precision in args.precisions:
            print(compile_stats(block_m, block_k, warps, stages, precision), flush=True)


if __name__ == "__main__":
    main()
