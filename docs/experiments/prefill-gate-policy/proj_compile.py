"""The gate's projection + RoPE kernel (``gate_fwd._project_kernel``, branch wip/gate-proj) compiled offline for
sm_90 (no GPU needed): registers, spills and shared memory per tile and precision, the figures behind
``gate_fwd.PROJ_TILE``.

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/proj_compile.py \\
        --tiles 128,32,8,3 128,32,8,2 128,64,8,2 64,32,4,3 128,16,8,3

Llama-3.1-8B's windowed gate: Dg 128 (two [BLOCK_M, 64] accumulators), RoPE on; pointers and strides declared
16-divisible as the launch's are. Tile = (gate vectors per program, channels per step, warps, stages).
"""

from __future__ import annotations

import argparse

from benchmarks.sm90 import compile_sm90
from seerattn.ops._triton import gate_fwd

POINTERS = ("XA", "WA", "OutA", "XB", "WB", "OutB", "C", "S")
# since session 16 the kernel takes two jobs (K's and Q's) and picks one's pointers and sizes per program
NOT_DIVISIBLE = ("N_A", "N_B", "HQ", "G_A", "G_B", "HALF", "TILES_A", "TILES_B", "PROGS_A", "C_STEP_A", "C_STEP_B")


def compile_stats(block_m: int, block_k: int, warps: int, stages: int, precision: str, rope: bool = True) -> dict:
    consts = dict(ROPE=rope, HALF_P=64, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=precision)
    stats = compile_sm90(gate_fwd._project_kernel, consts, POINTERS, NOT_DIVISIBLE, warps, stages)
    return {"tile": [block_m, block_k, warps, stages], "precision": precision, **stats}


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
