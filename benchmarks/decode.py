"""Per-step decode attention of one layer: sparse decode kernel vs SDPA decode vs FlexAttention decode (issue 17).

    python3 -m benchmarks.decode --json runs/decode.json            # H200: batch 1/4/16, 8k/32k/128k, 2k/4k/8k
    python3 -m benchmarks.decode --page 16 --json runs/decode_p16.json  # ours / seer on a paged cache of 16-token pages
    python3 -m benchmarks.decode --smoke --json /tmp/decode.json    # tiny shapes on the CPU: checks that it runs

One new query token per sequence against a full KV cache of ``context`` tokens (Llama-3.1-8B attention
shapes from ``benchmarks.shapes``: Hq 32, Hkv 8, D 128; bf16; 64-token blocks). The selection is the same
for every provider: per (sequence, KV head) the first block, the current (last) block and random other
blocks up to ``budget / block`` blocks (timing does not depend on which blocks). Providers, timed in one
run so that their ratios are measured together:

- ``sdpa``: ``scaled_dot_product_attention`` over the whole cache (flash backend, ``enable_gqa``): dense decode;
- ``ours``: :func:`seerattn.ops.sparse_decode_attention` (Triton split-KV kernel + LSE merge) on the selection;
- ``ours-starts``: ``ours`` on a left-padded batch: ``cache_starts`` put sequence b's first token at
  ``(7 * b) % block`` of its row (mid-block starts; ``cache_seqlens`` shortened to match, so at most ``block - 1``
  fewer keys a sequence), the kernel compiled with the per-sequence offset (what the HF step runs for
  left-padded prompts); its ratio to ``ours`` in the same run is the cost of the starts (contiguous cache only:
  refused with ``--page``);
- ``seer``: the sparse attention of one decode step of a layer: :meth:`DecodeGate.scores` (the gate query:
  projection, norm, RoPE; its logits against the K-compression cache), :func:`select_decode_blocks` (token
  budget), then ``ours``. Left out: :meth:`GateKeyCache.append`, which a decode step runs every step (it folds
  the new K row into the partial block's running pools and computes a gate key for every sequence, kept only
  where the row completes a block; timing it would grow the cache between repetitions), the model's Q/K/V
  projections and RoPE, and the KV-cache write;
- ``seer-fused``: ``seer`` with the gate logits and the budget selection fused into one Triton launch
  (:func:`select_decode_blocks_fused`; the gate query stays eager), then ``ours``; its row records
  ``max_abs_diff_vs_seer``, its output's largest difference from ``seer``'s (the same blocks, listed in another
  order);
- ``seer-bound``: ``seer-fused`` with ``DecodePolicy(bound_slots=2)`` (two of the budget's slots to the blocks of
  highest Quest bound): the step's :meth:`BlockBounds.update` (one block of K rows read per sequence), the bound
  over every completed block (:func:`bound_block_picks`, its Triton kernel as the HF step runs it beside the fused
  selection) and the fused selection with the picks forced; its ratio
  to ``seer-fused`` in the same run is the bound's cost;
- ``flex``: compiled FlexAttention (decode path) with a block mask holding the same selection (heads repeated
  over each group; the selected blocks are full blocks, so no ``mask_mod`` runs on the GPU).

With ``--page N``, ``ours`` and ``seer`` read K/V from a paged cache ``[P, N, Hkv, D]`` through a block table
(each sequence's pages at random places in the pool, as in an engine after some churn; N a power of two that
divides the block size or a multiple of it, as :func:`sparse_decode_attention` accepts; ``context`` a multiple of
N), and the ``ours`` row records ``max_abs_diff_vs_contiguous``, its output's largest difference from the same
call on the contiguous cache (a cross-check). ``sdpa`` and ``flex`` always read the contiguous cache (the same
values): their rows are the same dense and FlexAttention baselines as without ``--page``. The paged copy doubles the
K/V memory of a case (batch 64 at 128k: 2 x 34 GB, plus one 17 GB transpose while copying). Default: contiguous.

Each provider is timed with ``triton.testing.do_bench`` (median, L2 flushed between reps: at batch 1 and 8k the
whole KV cache of a layer would otherwise sit in L2) and, with ``--cuda-graph``, replayed from a CUDA graph
(launch overhead removed). Rows: ms, ms_graph, GB/s of K/V actually read, speedup over sdpa and over flex in
the same run, and the largest difference of each output from ``ours`` (a cross-check). A provider that fails
records its error in its row. The run record is written with :func:`seerattn.record.write_record`
(kind ``bench-decode``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from benchmarks.shapes import ATTENTION
from seerattn.decode_policy import DecodePolicy, bound_block_picks, select_decode_blocks, select_decode_blocks_fused
from seerattn.gate import BlockBounds, DecodeGate, DecodeGateConfig, GateKeyCache
from seerattn.ops import sparse_decode_attention
from seerattn.record import write_record

logger = logging.getLogger("benchmarks.decode")

PROVIDERS = ("sdpa", "ours", "ours-starts", "seer", "seer-fused", "seer-bound", "flex")
SMOKE = dict(shape=(4, 2, 16), batches="1,2", contexts="256", budgets="64,128", block=16)


def rotary_fn(theta: float = 500000.0):
    """An HF-style rotary callable ``(x, position_ids [B, N]) -> (cos, sin) [B, N, Dg]`` (speed only)."""

    def rotary(x, position_ids):
        dg = x.shape[-1]
        inv = 1.0 / theta ** (torch.arange(0, dg, 2, device=x.device, dtype=torch.float32) / dg)
        f = position_ids.float().unsqueeze(-1) * inv
        emb = torch.cat((f, f), -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    return rotary


def random_selection(b: int, hkv: int, context: int, block: int, slots: int, gen: torch.Generator) -> torch.Tensor:
    """int32 [B, Hkv, K]: block 0, the last block and random others, K = min(slots, blocks)."""
    nb = context // block
    k = min(slots, nb)
    middle = torch.rand(b, hkv, max(nb - 2, 0), generator=gen).argsort(-1)[..., : max(k - 2, 0)] + 1
    ends = torch.tensor([0, nb - 1][: min(k, 2)]).expand(b, hkv, -1)
    return torch.cat([ends, middle], -1).to(torch.int32)


def paged_cache(k: torch.Tensor, v: torch.Tensor, page: int, gen: torch.Generator):
    """k, v [B, Hkv, T, D] (T % page == 0) copied into a pool of pages [B * T / page, page, Hkv, D], each page at a
    random place, and the block_table int32 [B, T / page] that finds them."""
    b, hkv, t, d = k.shape
    n = t // page
    perm = torch.randperm(b * n, generator=gen, device=k.device)
    pools = []
    for x in (k, v):
        pool = torch.empty(b * n, page, hkv, d, dtype=x.dtype, device=x.device)
        pool[perm] = x.transpose(1, 2).reshape(b * n, page, hkv, d)
        pools.append(pool)
    return pools[0], pools[1], perm.view(b, n).to(torch.int32)


def time_ms(fn, cuda: bool, reps: int, graph: bool = False) -> float:
    """Median ms of ``fn()``: do_bench on the GPU (optionally replaying a CUDA graph), perf_counter on the CPU."""
    if not cuda:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    if not graph:
        return do_bench(fn, warmup=25, rep=reps, return_mode="median")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (compilation, tuning) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=25, rep=reps, return_mode="median")


def flex_decode(q, k, v, idx, block: int, cuda: bool):
    """A FlexAttention decode call on the selection ``idx`` [B, Hkv, K] (returns a zero-argument callable)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    sel = idx.long().sort(-1).values.repeat_interleave(g, 1).unsqueeze(2)  # [B, Hq, 1, K], ascending
    nb = t // block
    kv_idx = torch.nn.functional.pad(sel, (0, nb - sel.shape[-1])).to(torch.int32).contiguous()
    num = torch.full((b, hq, 1), sel.shape[-1], dtype=torch.int32, device=q.device)
    zero_num = torch.zeros_like(num)
    if cuda:
        # Selected blocks as *full* blocks: the kernel runs no mask_mod on them.
        mask = BlockMask.from_kv_blocks(
            zero_num, torch.zeros_like(kv_idx), num, kv_idx, BLOCK_SIZE=(128, block), seq_lengths=(1, t)
        )
        # a fresh compile per case: past torch's recompile limit (8 shapes of one compiled function) dynamo
        # silently runs flex_attention unfused (88 ms at batch 16 / 128k, H200, tree of 3fc8061)
        torch.compiler.reset()
        fn = torch.compile(flex_attention, dynamic=False)
    else:
        # The eager path ignores block lists and evaluates mask_mod everywhere: look the block up.
        dense = torch.zeros(b, hq, nb, dtype=torch.bool, device=q.device).scatter_(-1, sel.squeeze(2), True)

        def mask_mod(bi, h, q_idx, kv_idx_):
            return dense[bi, h, kv_idx_ // block]

        mask = BlockMask.from_kv_blocks(num, kv_idx, BLOCK_SIZE=(128, block), mask_mod=mask_mod, seq_lengths=(1, t))
        fn = flex_attention
    q4 = q.unsqueeze(2)
    return lambda: fn(q4, k, v, block_mask=mask, enable_gqa=True).squeeze(2)


def sdpa_decode(q, k, v, cuda: bool):
    """(callable, how GQA is run): SDPA over the whole cache, flash backend on the GPU. ``enable_gqa`` first;
    should the flash backend refuse it, K/V repeated over the group (recorded in the row, not hidden)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q4 = q.unsqueeze(2)
    backend = SDPBackend.FLASH_ATTENTION if cuda else SDPBackend.MATH

    def call(kk, vv, gqa):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q4, kk, vv, enable_gqa=gqa).squeeze(2)

    try:
        call(k, v, True)
        return (lambda: call(k, v, True)), "enable_gqa"
    except RuntimeError as err:
        logger.warning("SDPA refused enable_gqa (%s): K/V repeated over the group", err)
        g = q.shape[1] // k.shape[1]
        kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return (lambda: call(kx, vx, False)), f"repeated K/V ({type(err).__name__})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3.1-8b", help=f"attention shape, one of {sorted(ATTENTION)}")
    p.add_argument("--batches", help="comma list (default 1,4,16)")
    p.add_argument("--contexts", help="comma list of cache lengths (default 8192,32768,131072)")
    p.add_argument("--budgets", help="comma list of token budgets (default 2048,4096,8192)")
    p.add_argument("--block-size", type=int, help="tokens per key block (default 64)")
    p.add_argument("--providers", help=f"comma list of {PROVIDERS} (default: all; with --page all but ours-starts)")
    p.add_argument("--page", type=int, help="tokens per page: ours / seer on a paged cache (default: contiguous)")
    p.add_argument("--cuda-graph", action="store_true", help="also time each provider replayed from a CUDA graph")
    p.add_argument("--reps", type=int, default=100, help="do_bench repetition time (ms); smoke: calls")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks that every provider runs)")
    p.add_argument("--json", help="write the run record here")
    args = p.parse_args(argv)
    if args.page is not None and args.page < 1:
        p.error(f"--page must be a positive number of tokens, got {args.page}")
    paged_default = [x for x in PROVIDERS if x != "ours-starts"]
    providers = args.providers.split(",") if args.providers else list(PROVIDERS if args.page is None else paged_default)
    if args.page is not None and "ours-starts" in providers:
        p.error("ours-starts runs on a contiguous cache only (cache_starts); leave it out with --page")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        p.error(f"unknown providers {sorted(unknown)}; accepted: {PROVIDERS}")
    if args.smoke:
        device, dtype, (hq, hkv, d) = "cpu", torch.float32, SMOKE["shape"]
        batches, contexts, budgets = args.batches or SMOKE["batches"], args.contexts or SMOKE["contexts"], args.budgets
        budgets, block, args.reps = budgets or SMOKE["budgets"], args.block_size or SMOKE["block"], min(args.reps, 2)
        # The Triton kernel runs on the CPU only in the interpreter; otherwise the smoke run times the reference.
        from seerattn.ops._triton.config import interpreting

        impl = "triton" if interpreting() else "reference"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.decode needs a CUDA GPU (or --smoke)")
        device, dtype, (hq, hkv, d) = "cuda", torch.bfloat16, ATTENTION[args.model]
        batches, contexts, budgets = args.batches or "1,4,16", args.contexts or "8192,32768,131072", args.budgets
        budgets, block, impl = budgets or "2048,4096,8192", args.block_size or 64, "triton"
    cuda = device == "cuda"
    if args.page is not None and any(int(c) % args.page for c in contexts.split(",")):
        p.error(f"--page {args.page} must divide every context ({contexts}): the paged copy fills whole pages")
    gen = torch.Generator().manual_seed(0)
    gate = DecodeGate(hq, hkv, d, DecodeGateConfig(block_size=block)).to(device)
    rows = []
    for ctx in (int(x) for x in contexts.split(",")):
        for b in (int(x) for x in batches.split(",")):
            shape = (b, ctx, hq, hkv, d, block)
            rows += bench_case(
                shape, [int(x) for x in budgets.split(",")], providers, gate, dtype, device, impl, gen, args
            )
            if cuda:
                torch.cuda.empty_cache()
    add_ratios(rows)
    for r in rows:
        logger.info("%s", r)
        desc = f"B={r['batch']:>3} ctx={r['context']:>7} budget={r.get('budget', '-')!s:>5} {r['provider']:<10}"
        print(desc, f"{r['ms']:.4f} ms" if "ms" in r else r.get("error"), flush=True)
    if args.json:
        extra = {"gpu": torch.cuda.get_device_name()} if cuda else {}
        model = {"attention": args.model if not args.smoke else "smoke", "Hq": hq, "Hkv": hkv, "D": d}
        write_record(args.json, "bench-decode", rows, {**vars(args), "device": device, "impl": impl}, model, extra)
    return 0


def bench_case(shape, budgets, providers, gate, dtype, device, impl, gen, args) -> list[dict]:
    """Rows of one (batch, context): sdpa once, then ours / seer / flex for every budget."""
    b, ctx, hq, hkv, d, block = shape
    cuda = device == "cuda"
    rotary = rotary_fn()
    dev_gen = torch.Generator(device=device).manual_seed(ctx * 1000 + b)  # 128k x 16 caches: drawn on the GPU
    q, k, v = (
        torch.randn(*s, generator=dev_gen, device=device, dtype=dtype)
        for s in ((b, hq, d), (b, hkv, ctx, d), (b, hkv, ctx, d))
    )
    lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    cache = GateKeyCache(gate, b, max_tokens=ctx)
    cache.prefill(k, lens, rotary)
    bounds = BlockBounds(k, block, ctx)  # seer-bound: the min / max of each block's keys
    bounds.refresh(k)
    positions = (lens - 1).long()
    starts = ((7 * torch.arange(b, device=device)) % block).to(torch.int32)  # ours-starts: mid-block first tokens
    # ours / seer read these: the contiguous cache, or its paged copy (--page; None: contiguous)
    kc, vc, table = (k, v, None) if args.page is None else paged_cache(k, v, args.page, dev_gen)
    base = {"batch": b, "context": ctx, "Hq": hq, "Hkv": hkv, "D": d, "block": block, "dtype": str(dtype)}
    base["page"] = args.page
    rows = []
    if "sdpa" in providers:
        dense_bytes = 2 * b * hkv * ctx * d * k.element_size()
        fn, gqa = sdpa_decode(q, k, v, cuda)
        rows.append({**run_provider("sdpa", fn, base, dense_bytes, cuda, args), "sdpa_gqa": gqa})
    for budget in budgets:
        idx = random_selection(b, hkv, ctx, block, budget // block, gen).to(device)
        kept = idx.shape[-1] * block
        row = {**base, "budget": budget, "kept_tokens": kept}
        nbytes = 2 * b * hkv * kept * d * k.element_size()
        policy = DecodePolicy("budget", budget)
        bound_policy = DecodePolicy("budget", budget, bound_slots=2)

        def ours(idx=idx):
            return sparse_decode_attention(q, kc, vc, lens, idx, block, block_table=table, impl=impl)

        def ours_starts(idx=idx):
            return sparse_decode_attention(q, k, v, lens - starts, idx, block, impl=impl, cache_starts=starts)

        def seer(policy=policy):
            logits = gate.scores(q, cache.keys, positions, rotary)
            sel = select_decode_blocks(logits, lens, policy, block, ctx // block)
            return sparse_decode_attention(q, kc, vc, lens, sel, block, block_table=table, impl=impl)

        def seer_fused(policy=policy):  # what the HF decode step runs (seerattn.hf.integration._decode_selection)
            qg = gate.decode_query(q, positions, rotary)
            sel = select_decode_blocks_fused(qg, cache.keys, lens, policy, block)
            return sparse_decode_attention(q, kc, vc, lens, sel, block, block_table=table, impl=impl)

        def seer_bound(policy=bound_policy):
            bounds.update(k, lens)  # rewrites each sequence's last completed block (static: the same values)
            picks = bound_block_picks(q.unsqueeze(2), bounds.kmin, bounds.kmax, lens.view(-1, 1), 2, block, "triton")
            qg = gate.decode_query(q, positions, rotary)
            sel = select_decode_blocks_fused(qg, cache.keys, lens, policy, block, picks[:, :, 0])
            return sparse_decode_attention(q, kc, vc, lens, sel, block, block_table=table, impl=impl)

        fns = {
            "ours": ours,
            "ours-starts": ours_starts,
            "seer": seer,
            "seer-fused": seer_fused,
            "seer-bound": seer_bound,
        }
        if "flex" in providers:
            try:
                fns["flex"] = flex_decode(q, k, v, idx, block, cuda)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                rows.append({**row, "provider": "flex", "error": f"{type(err).__name__}: {err}"})
        with torch.no_grad():
            ref = ours()
        for name in [p for p in PROVIDERS if p in fns and p in providers]:
            r = run_provider(name, fns[name], row, nbytes, cuda, args)
            if name == "flex" and "error" not in r:
                with torch.no_grad():
                    r["max_abs_diff_vs_ours"] = (fns[name]().float() - ref.float()).abs().max().item()
            if name == "seer-fused" and "error" not in r:
                with torch.no_grad():
                    r["max_abs_diff_vs_seer"] = (seer_fused().float() - seer().float()).abs().max().item()
            if name == "ours" and table is not None and "error" not in r:
                with torch.no_grad():
                    contiguous = sparse_decode_attention(q, k, v, lens, idx, block, impl=impl)
                r["max_abs_diff_vs_contiguous"] = (ref.float() - contiguous.float()).abs().max().item()
            rows.append(r)
    return rows


def run_provider(name: str, fn, row: dict, nbytes: int, cuda: bool, args) -> dict:
    """Time one provider; a failure is recorded in its row (never hidden)."""
    out = {**row, "provider": name, "kv_bytes": nbytes}
    try:
        with torch.no_grad():
            out["ms"] = time_ms(fn, cuda, args.reps)
            out["gb_per_s"] = nbytes / out["ms"] / 1e6
            if args.cuda_graph and cuda:
                out["ms_graph"] = time_ms(fn, cuda, args.reps, graph=True)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        logger.warning("%s failed on %s: %s", name, row, err)
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_sdpa / speedup_vs_flex (and the graph-replay versions) of each row, from the same run; the
    ``ours-starts`` rows also speedup_vs_ours."""
    by = {}
    for r in rows:
        by[(r["batch"], r["context"], r.get("budget"), r["provider"])] = r
    for r in rows:
        if "ms" not in r or r["provider"] == "sdpa":
            continue
        peers = (("sdpa", None), ("flex", r.get("budget")))
        if r["provider"] == "ours-starts":  # the cost of the per-sequence starts: ~1.0 when they are free
            peers += (("ours", r.get("budget")),)
        for peer, key in peers:
            other = by.get((r["batch"], r["context"], key, peer))
            if other is None or "ms" not in other or other is r:
                continue
            r[f"speedup_vs_{peer}"] = other["ms"] / r["ms"]
            if "ms_graph" in r and "ms_graph" in other:
                r[f"speedup_vs_{peer}_graph"] = other["ms_graph"] / r["ms_graph"]


if __name__ == "__main__":
    raise SystemExit(main())
