"""The fused gate's scores-kernel precision on the GPU: time per layer and error, per ``input_precision``.

    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/gate_precision.py --json runs/gate_precision.json
    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/gate_precision.py --json runs/gate_tiles.json \
        --tiles 128,64,8,2 128,32,8,3 128,32,8,2 64,64,8,2 64,64,4,3

``--tiles``: each row once per scores-kernel tile ``windows,key_blocks,warps,stages`` (``gate_fwd.SCORES_TILE``,
trees from the window-tiled kernel on); a tile that does not fit the GPU's shared memory is recorded with the
error. Without it, the tree's own tile (``"tile": null`` on a tree without ``SCORES_TILE``).

Time: the whole fused gate (pooling, projection, scores) of one layer, Llama-3.1-8B heads (Hq 32, Hkv 8,
D 128), the testbed's ``windows`` gate (Q windows of 16 pooled avg/max/min, K blocks of 64), random bf16
q/k and random gate weights, ``triton.testing.do_bench`` median, at 32k and 128k. Error: 8 query heads at
32k (the GPU test's case), each precision's logits against the fp64 eager gate (relative L2 over finite
entries) beside the eager fp32 gate's, and the share of (head, row) whose kept blocks at density 0.1
(``mask_from_scores`` on the softmax) differ from those of the eager fp32 gate.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from seerattn import SparsityPolicy, mask_from_scores
from seerattn.gate import AttnGate, GateConfig
from seerattn.ops._triton import gate_fwd

CFG = GateConfig(q_pooling=("avg", "max", "min"), q_subblock=16)


def rope(positions: torch.Tensor, dim: int):
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = positions.double()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos()[None].cuda(), emb.sin()[None].cuda()


def case(hq: int, hkv: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = AttnGate(hq, hkv, 128, CFG)
    with torch.no_grad():
        gate.k_proj.copy_(torch.randn(gate.k_proj.shape, generator=g) / 128**0.5)
        gate.q_proj.copy_(torch.randn(gate.q_proj.shape, generator=g) / 128**0.5)
    q = torch.randn(1, t, hq, 128, generator=g).to(torch.bfloat16).transpose(1, 2).cuda()
    k = torch.randn(1, t, hkv, 128, generator=g).to(torch.bfloat16).transpose(1, 2).cuda()
    cos, sin = rope(torch.arange(-(-t // CFG.q_step)) * CFG.q_step, gate.gate_dim)
    return gate.cuda(), q, k, cos, sin


def with_precision(precision: str):
    """The gate's Triton path with the scores kernel at ``precision`` (gate_ops imports it at each call)."""
    return functools.partial(_REAL, precision=precision)


_REAL = gate_fwd.gate_logits_fwd


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def kept(logits: torch.Tensor, t: int) -> torch.Tensor:
    mask = mask_from_scores(logits.softmax(-1), SparsityPolicy("density", 0.1), t, 64)
    return mask.to_dense()


def parse_tile(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"a tile is windows,key_blocks,warps,stages (4 integers), got {text!r}")
    return tuple(int(p) for p in parts)


def tiles_to_run(tiles: list[tuple[int, int, int, int]] | None) -> list[tuple[int, int, int, int] | None]:
    """The tiles to set in turn (None: leave the tree's own)."""
    if tiles is None:
        return [None]
    if not hasattr(gate_fwd, "SCORES_TILE"):
        raise SystemExit("--tiles needs gate_fwd.SCORES_TILE (the window-tiled scores kernel); this tree has none")
    return tiles


def current_tile() -> list[int] | None:
    return list(gate_fwd.SCORES_TILE) if hasattr(gate_fwd, "SCORES_TILE") else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--tiles", nargs="+", type=parse_tile, help="scores-kernel tiles windows,key_blocks,warps,stages")
    args = p.parse_args()
    tiles = tiles_to_run(args.tiles)
    rows = []
    with torch.no_grad():
        for t in (32768, 131072):
            gate, q, k, cos, sin = case(32, 8, t)
            c32, s32 = cos.float(), sin.float()
            for tile in tiles:
                if tile is not None:
                    gate_fwd.SCORES_TILE = tile
                for prec in gate_fwd.PRECISIONS:
                    row = {"t": t, "tile": current_tile(), "precision": prec}
                    gate_fwd.gate_logits_fwd = with_precision(prec)
                    run = functools.partial(gate, q, k, c32, s32, impl="triton")
                    try:
                        row["gate_ms"] = do_bench(run, warmup=5, rep=50, return_mode="median")
                    except OutOfResources as e:  # the tile does not fit this GPU
                        row["error"] = str(e)
                    gate_fwd.gate_logits_fwd = _REAL
                    rows.append(row)
                    print(row, flush=True)
            del gate, q, k
        t = 32768
        gate, q, k, cos, sin = case(8, 2, t, seed=1)
        c32, s32 = cos.float(), sin.float()
        eager = gate(q, k, c32, s32, impl="eager")
        oracle = gate.double()(q.double(), k.double(), cos, sin, impl="eager")
        gate.float()
        fin = torch.isfinite(oracle)
        base = kept(eager, t)
        for tile in tiles:
            if tile is not None:
                gate_fwd.SCORES_TILE = tile
            for prec in gate_fwd.PRECISIONS:
                row = {"t": t, "heads": 8, "tile": current_tile(), "precision": prec}
                gate_fwd.gate_logits_fwd = with_precision(prec)
                try:
                    got = gate(q, k, c32, s32, impl="triton")
                except OutOfResources as e:  # the tile does not fit this GPU
                    got, row["error"] = None, str(e)
                gate_fwd.gate_logits_fwd = _REAL
                if got is not None:
                    row["rel_err"] = rel(got[fin], oracle[fin])
                    row["eager_fp32_rel_err"] = rel(eager[fin], oracle[fin])
                    row["rows_with_other_blocks"] = (kept(got, t) != base).any(-1).double().mean().item()
                rows.append(row)
                print(row, flush=True)
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
