"""Time of each part of one layer's fused prefill gate and policy: the pooling, projection and scores kernels
(:mod:`seerattn.ops._triton.gate_fwd`), the softmax, and the density selection kernel, with the HBM time of the
bytes each part must move (read once, written once) beside it.

Llama-3.1-8B heads (Hq 32, Hkv 8, D 128), the testbed's gate (Q windows of 16 pooled avg / max / min, K blocks of 64
pooled the same, Dg 128, RoPE), random bf16 q / k as transformers hands them ([B, T, H, D] memory), random gate
weights; ``triton.testing.do_bench`` medians. ``--pool-tiles`` / ``--proj-tiles`` / ``--scores-tiles`` time the
parts at other tiles too (the first of each list is the library's default when not given). ``--gate paper`` times
the paper's gate instead (``GateConfig()``: Q pooled avg over whole blocks, R = 1 window a block, no Q projection: the
pooled Q rotated by the RoPE kernel is the query).

    python -m benchmarks.gate_parts --seqlens 32768,131072 --json runs/gate_parts.json
    python -m benchmarks.gate_parts --seqlens 32768 --pool-tiles 8,4 32,8 4,2 --proj-tiles 128,32,8,3 64,32,4,3
    python -m benchmarks.gate_parts --parts select    # the selection (and softmax) alone
"""

from __future__ import annotations

import argparse
import functools

import torch

from seerattn import SparsityPolicy, mask_from_scores
from seerattn.gate import AttnGate, GateConfig
from seerattn.ops._triton import gate_fwd
from seerattn.record import write_record

from .decode import time_ms

# the testbed's windowed gate, and the paper's (GateConfig's default: Q pooled avg over whole blocks, no Q projection)
GATES = {"testbed": GateConfig(q_pooling=("avg", "max", "min"), q_subblock=16), "paper": GateConfig()}
HBM_GBS = 4800.0  # H200 HBM3e peak, GB/s: the floor column
PARTS = ("pool", "proj", "scores", "gate", "select")  # "select" also times the softmax


def case(t: int, hq: int, hkv: int, cfg: GateConfig, seed: int = 0, device: str = "cuda",
         dtype: torch.dtype = torch.bfloat16):  # fmt: skip
    """(gate, q [1, Hq, T, 128], k [1, Hkv, T, 128], cos, sin) on ``device``, as the sparse prefill hands them."""
    g = torch.Generator().manual_seed(seed)
    gate = AttnGate(hq, hkv, 128, cfg)
    with torch.no_grad():
        for w in (gate.k_proj, gate.q_proj) if gate.has_q_proj else (gate.k_proj,):
            w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
    q = torch.randn(1, t, hq, 128, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(1, t, hkv, 128, generator=g).to(device, dtype).transpose(1, 2)
    pos = torch.arange(-(-t // cfg.q_step), device=device, dtype=torch.float32) * cfg.q_step
    inv = 1.0 / 10000 ** (torch.arange(0, gate.gate_dim, 2, device=device, dtype=torch.float32) / gate.gate_dim)
    ang = torch.cat([pos[:, None] * inv] * 2, -1)[None]
    return gate.to(device), q, k, ang.cos(), ang.sin()


def parse_tiles(text: list[str] | None) -> list[tuple]:
    """Tiles given as comma lists."""
    return [tuple(int(v) for v in t.split(",")) for t in text or []]


def tiles(text: list[str] | None, default: tuple) -> list[tuple]:
    """The default tile first, then the others given as comma lists."""
    return [default] + [t for t in parse_tiles(text) if t != default]


def time_eager_and_replayed(record, part: str, fn, bench, nbytes: int) -> None:
    """``part`` launched eagerly, then replayed from a CUDA graph (``<part>_graph``, GPU only): its GPU time without
    the host's launch work, which bounds the eager timing of the small policy launches. A capture that fails is
    recorded with its error (the eager row stands)."""
    record(part, None, bench(fn), nbytes)
    if not bench.keywords["cuda"]:
        return
    try:
        ms = bench(fn, graph=True)
    except RuntimeError as err:  # e.g. an operation the capture does not allow
        print(f"{part}_graph: not captured ({err})")
        record(f"{part}_graph", None, float("nan"), 0, error=str(err))
        return
    record(f"{part}_graph", None, ms, nbytes)


def nbytes_of(x) -> int:
    """Bytes of a tensor, or of the tensors of split rows or vectors (fp16 halves, fp32 inverse scales)."""
    parts = x if isinstance(x, tuple) else (x,)
    return sum(y.numel() * y.element_size() for y in parts if isinstance(y, torch.Tensor))


def joined(x) -> torch.Tensor:
    """The fp32 values a split pair (fp16 halves [..., 2 * Dg], inverse scales [...]) holds; a tensor as it is."""
    if not isinstance(x, tuple):
        return x
    halves, inv = x
    d = halves.shape[-1] // 2
    return (halves[..., :d].float() + halves[..., d:].float()) * inv[..., None]


def time_parts(t: int, args, record) -> None:
    """Times every part at prompt length ``t``; ``record(part, tile, ms, bytes)`` keeps each."""
    cuda = not args.smoke
    bench = functools.partial(time_ms, cuda=cuda, reps=args.reps)
    prec = gate_fwd.DEFAULT_PRECISION
    cfg = GATES[args.gate]
    r = cfg.block_size // cfg.q_step
    # the smoke run: fp16 (the interpreter computes bf16 wrongly), the CPU
    gate, q, k, cos, sin = case(t, args.hq, args.hkv, cfg, device="cuda" if cuda else "cpu",
                                dtype=torch.bfloat16 if cuda else torch.float16)  # fmt: skip
    ns, nb = -(-t // cfg.q_step), -(-t // cfg.block_size)
    kw, qw, warps = gate_fwd.POOL_PAIR_TILE
    wk = gate.k_proj.detach()
    wq = gate.q_proj.detach() if gate.has_q_proj else None  # the paper's gate: the pooled Q, rotated, is the query
    # at tf32x3 the projected inputs are pooled split (fp16 halves and inverse scales: a 16-bit input's max / min
    # channels without lo halves); the paper's gate's Q is the query itself, fp32
    k_split, q_split = prec == "tf32x3", prec == "tf32x3" and wq is not None
    qp = gate_fwd._pool(q, cfg.q_step, cfg.q_pooling, (qw, warps), q_split)
    kp = gate_fwd._pool(k, cfg.block_size, cfg.k_pooling, (kw, warps), k_split)
    q_bytes = q.numel() * 2 + nbytes_of(qp)  # read, written
    k_bytes = k.numel() * 2 + nbytes_of(kp)
    timed = set(args.parts.split(","))
    if "pool" in timed:
        # each job alone at the pair's tile, then at the other tiles asked for
        for q_tile, k_tile in [((qw, warps), (kw, warps))] + [(x, x) for x in parse_tiles(args.pool_tiles)]:
            # the same windows in the same token order whatever the tile: the same bits
            got = gate_fwd._pool(q, cfg.q_step, cfg.q_pooling, q_tile, q_split)
            if q_split:
                same = torch.equal(got.halves, qp.halves) and torch.equal(got.inv, qp.inv)
            else:
                same = torch.equal(got, qp)
            if not same:
                raise SystemExit(f"pooling tile {q_tile} differs from the default's output")
            pool_q = functools.partial(gate_fwd._pool, q, cfg.q_step, cfg.q_pooling, q_tile, q_split)
            pool_k = functools.partial(gate_fwd._pool, k, cfg.block_size, cfg.k_pooling, k_tile, k_split)
            record("pool_q", q_tile, bench(pool_q), q_bytes)
            record("pool_k", k_tile, bench(pool_k), k_bytes)
        record("pool_pair", gate_fwd.POOL_PAIR_TILE,
               bench(lambda: gate_fwd._pool(k, cfg.block_size, cfg.k_pooling, (kw, warps), k_split,
                                            second=(q, cfg.q_step, cfg.q_pooling, qw, q_split))),
               q_bytes + k_bytes)  # fmt: skip
    if "proj" in timed:
        # the pooled rows read (split: the same bytes and a scale a row), the weights, the gate vectors written
        pq_bytes = q_bytes - q.numel() * 2 + ((wq.numel() if wq is not None else 0) + args.hq * ns * 128) * 4
        pk_bytes = k_bytes - k.numel() * 2 + (wk.numel() + args.hq * nb * 128) * 4
        default = gate_fwd.PROJ_SPLIT_TILE if k_split else gate_fwd.PROJ_TILE
        for tile in tiles(args.proj_tiles, default):
            if wq is not None:
                proj_q = functools.partial(gate_fwd._project, qp, wq, cos, sin, 1, prec, tile)
                record("proj_q", tile, bench(proj_q), pq_bytes)
            record("proj_k", tile, bench(lambda tile=tile: gate_fwd._project(kp, wk, cos, sin, r, prec, tile)),
                   pk_bytes)  # fmt: skip
        if wq is not None:
            # one TF32 product on fp32 rows: how much of the projection is arithmetic (a probe, not the default)
            qp32 = gate_fwd._pool(q, cfg.q_step, cfg.q_pooling, (qw, warps))
            record("proj_q_tf32", None, bench(lambda: gate_fwd._project(qp32, wq, cos, sin, 1, "tf32")), pq_bytes)
            record("proj_pair", default,
                   bench(lambda: gate_fwd._project(kp, wk, cos, sin, r, prec, second=(qp, wq, 1))),
                   pq_bytes + pk_bytes)  # fmt: skip
    if "scores" in timed:
        if wq is not None:
            qg = gate_fwd._project(qp, wq, cos, sin, 1, prec)
        else:
            qg = qp.clone()
            gate_fwd._rope_(qg, cos, sin, 1)
        kg = gate_fwd._project(kp, wk, cos, sin, r, prec)
        nbytes = nbytes_of(qg) + nbytes_of(kg) + args.hq * nb * nb * 4
        for tile in tiles(args.scores_tiles, gate_fwd.SCORES_TILE):
            record("scores", tile, bench(lambda tile=tile: gate_fwd._scores(qg, kg, r, prec, tile)), nbytes)
        # one TF32 product on the fp32 vectors the split halves hold (a probe, not the default)
        qg32, kg32 = joined(qg), joined(kg)
        record("scores_tf32", None, bench(lambda: gate_fwd._scores(qg32, kg32, r, "tf32")), nbytes)
    with torch.no_grad():
        call = functools.partial(gate, q, k, cos, sin, impl="triton")
        if "gate" in timed:
            nbytes = (q.numel() + k.numel()) * 2 + args.hq * nb * nb * 4
            time_eager_and_replayed(record, "gate", call, bench, nbytes)
        logits = call()
    if "select" not in timed:
        return
    record("softmax", None, bench(lambda: logits.softmax(-1)), 2 * logits.numel() * 4)
    probs = logits.softmax(-1)
    pol = SparsityPolicy("density", args.density)
    for name, scores in (("select", probs), ("select_logits", logits)):
        # the causal half of the scores read, the padded lists written
        call = functools.partial(mask_from_scores, scores, pol, t, cfg.block_size)
        time_eager_and_replayed(record, name, call, bench, scores.numel() * 4 // 2 + scores.numel() * 4)
    a, b = (mask_from_scores(s, pol, t, cfg.block_size) for s in (probs, logits))
    differ = int(((a.kv_indices != b.kv_indices).any(-1) | (a.kv_num_blocks != b.kv_num_blocks)).sum())
    print(f"T={t:>7} (head, row) pairs whose mask differs, probabilities vs logits: {differ} of {args.hq * nb}")
    record("rows_differ_probs_logits", None, float(differ), 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", default="32768,131072", help="comma list of prompt lengths")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--gate", choices=tuple(GATES), default="testbed", help="the gate architecture timed")
    p.add_argument("--density", type=float, default=0.1, help="the selection's density (row allocation)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of the parts to time, of {PARTS}")
    p.add_argument("--pool-tiles", nargs="*", help="more pooling tiles, for each job alone: windows,warps")
    p.add_argument("--proj-tiles", nargs="*", help="more projection tiles: rows,channels,warps,stages")
    p.add_argument("--scores-tiles", nargs="*", help="more scores tiles: windows,key_blocks,warps,stages")
    p.add_argument("--reps", type=int, default=100, help="do_bench's rep (ms of repetitions)")
    p.add_argument("--smoke", action="store_true", help="the CPU under the Triton interpreter, tiny shapes (it runs)")
    p.add_argument("--json", help="write the run record here")
    args = p.parse_args(argv)
    if not set(args.parts.split(",")) <= set(PARTS):
        p.error(f"--parts takes a comma list of {PARTS}; got {args.parts!r}")
    if args.smoke:
        from seerattn.ops._triton.config import interpreting

        if not interpreting():
            raise SystemExit("--smoke runs the kernels on the CPU: set TRITON_INTERPRET=1 before starting Python")
        args.seqlens, args.hq, args.hkv, args.reps = "200", 4, 2, 1
        args.pool_tiles = args.proj_tiles = args.scores_tiles = None
    elif not torch.cuda.is_available():
        raise SystemExit("gate_parts times CUDA kernels; no CUDA device is visible (--smoke: the CPU interpreter)")
    rows = []
    for t in (int(x) for x in args.seqlens.split(",")):

        def record(part, tile, ms, nbytes, t=t, error=None):
            floor = nbytes / HBM_GBS / 1e6
            row = {"seq_len": t, "part": part, "tile": tile, "ms": ms, "bytes": nbytes, "hbm_floor_ms": floor}
            rows.append(row if error is None else {**row, "error": error})
            if nbytes:
                print(f"T={t:>7} {part:<14} {str(tile):<18} {ms:8.4f} ms  HBM floor {floor:7.4f} ({floor / ms:5.1%})")

        time_parts(t, args, record)
        if not args.smoke:
            torch.cuda.empty_cache()
    if args.json:
        write_record(args.json, "bench-gate-parts", rows, {**vars(args), "gate_config": GATES[args.gate].to_dict()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
