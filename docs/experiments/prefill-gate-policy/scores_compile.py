"""The fused gate's scores kernel compiled offline for sm_90 (no GPU needed): registers, spills and shared memory
per tile and precision, the figures behind ``gate_fwd.SCORES_TILE``.

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/scores_compile.py \\
        --tiles 128,64,8,2 128,64,8,3 128,32,8,2 128,32,8,3 64,64,8,2 64,64,4,2 64,64,4,3 128,64,4,2 --r 4

Llama-3.1-8B's windowed gate: Dg 128 (gate vectors rotated before the kernel), ``R = block_size // q_step``
windows per block; pointers and strides declared 16-divisible as the launch's are. ptxas (Triton's own) reports
registers and spills; Hopper allows 227 KiB (232448 bytes) of shared memory per block, so a tile over it fails at
launch.

With the gate vectors rotated before the kernel (one full-width dot per key tile, no cos/sin), triton 3.6, R 4:
registers (spill stores / loads in bytes where ptxas reported any) and shared KiB, tf32x3 / tf32 / ieee.

    tile (windows, keys, warps, stages)   tf32x3              tf32           ieee
    128, 64, 8, 2                          196 r, 224 KiB      111 r, 136     32 r + 7856/20088 spill, 96
    128, 64, 8, 3                          200 r, 256 (over)   106 r, 168     32 r + 7792/20436 spill, 128
    128, 32, 8, 2                          194 r, 176          63 r, 100      40 r + 5700/7572 spill, 80
    128, 32, 8, 3                          189 r, 192          60 r, 116      32 r + 7052/9224 spill, 96
    64, 64, 8, 2                           136 r, 160          48 r, 100      48 r + 3872/5680 spill, 64
    64, 64, 4, 2                           196 r, 160          102 r, 100     32 r + 8420/20620 spill, 64
    64, 64, 4, 3                           200 r, 192          102 r, 132     32 r + 8220/20796 spill, 96
    128, 64, 4, 2                          255 r + 184/184 spill, 224   226 r, 136   32 r + 15124/43692 spill, 96

Session 16 transposed the kernel (key tile x windows, its own TF32 split; tile (windows, keys, warps, stages) as
before): (64, 64, 4, 2), the tile timed fastest, 255 registers + 8 bytes of spill, 100 KiB at tf32x3 (79 registers
at tf32); (128, 64, 8, 2) 242 registers, 168 KiB; (64, 128, 8, 2) 255 + 4 bytes of spill, 136 KiB. The table above
and the next paragraph are the kernel before.

Before session 16, ``gate_fwd.SCORES_TILE`` was (128, 64, 8, 2): the largest that fits without spills at tf32x3
and tf32 (224 of 227 KiB). The same tile at R 1 (the paper's gate): tf32x3 249 registers, 224 KiB; tf32 124,
160 KiB; at R 16: 189 / 64 registers; no spills. Before (rotation inside the kernel, two half-width dots),
(128, 64, 8, 2) needed 256 KiB and the default was (128, 32, 8, 2) at 192 KiB, 222 registers.
"""

from __future__ import annotations

import argparse

from benchmarks.sm90 import compile_sm90
from seerattn.ops._triton import gate_fwd

POINTERS = ("QG", "KG", "Out")
NOT_DIVISIBLE = ("HQ", "n_row_tiles")  # head count, tile count: any value


def compile_stats(windows: int, block_j: int, warps: int, stages: int, precision: str, r: int) -> dict:
    consts = dict(R=r, DG_P=128, BLOCK_I=max(1, windows // r), BLOCK_J=block_j, PRECISION=precision)
    stats = compile_sm90(gate_fwd._gate_scores_kernel, consts, POINTERS, NOT_DIVISIBLE, warps, stages, ("sqrt_dg",))
    return {"tile": [windows, block_j, warps, stages], "precision": precision, "R": r, **stats}


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
