"""Attention benchmark: our Triton kernels vs SDPA (FlashAttention-2 and cuDNN backends) vs
FlexAttention and FlashAttention-4 on the same block mask.

    PYTHONPATH=src python -m benchmarks.attention --models llama3.1-8b --seqlens 32768 \
        --densities 1.0,0.1 --masks structured,random --block-sizes 64,128 --mask-heads hkv,hq \
        --scores --json results.json

Every row is timed in the same process with ``triton.testing.do_bench`` (median, L2 flushed between
repetitions) on random bf16 inputs (B = 1). TFLOP/s count only the computed causal pairs:
``4 * D * Hq * pairs`` with ``pairs = sum over kept blocks of the (query, key) pairs at or below the
diagonal``, and ``T (T + 1) / 2`` per head for dense causal attention. Speedups are ratios of times
measured in this run: vs SDPA-FA2 and SDPA-cuDNN dense causal (same model and T) and vs
FlexAttention on the same mask. Masks come from the library's density policy
(:func:`seerattn.mask_from_scores`) over synthetic block scores: ``structured`` rows rank 16
vertical columns per head first, then the local band by distance, so at 10 % a row keeps sink +
verticals + a local window (the shape SeerAttention's gates produce); ``random`` = uniform scores.
Sink and diagonal are always kept.

Provider ``fa4`` (FlashAttention-4, the optional ``flash-attn-4`` package): dense causal attention
(``flash_attn.cute.flash_attn_func``, K/V with Hkv heads, inputs in its [B, T, H, D] layout made
outside the timed region; row ``op=dense``, provider ``fa4``) and block-sparse attention on the same
mask (``impl="fa4"``: the FlexAttention mask of the ``flex`` row with the FLASH backend, converted
outside the timed region). ``vs_fa4`` is FA4's time on the same mask (or dense) over the row's. Where
FA4 is not installed or does not take the case (``seerattn.ops.fa4.unsupported``: block sizes, and
for the backward 128 only on sm_90), the row records why in ``error`` with no time: never dropped.

``--backward`` times forward + backward instead (``out = attn(q, k, v); out.backward(dout)``, inputs
requiring grad, the mask and FlexAttention's block mask built outside the timed region), against
SDPA-FA2 and SDPA-cuDNN dense causal forward + backward, FA4 dense causal forward + backward, and
FlexAttention and FA4 forward + backward on the same mask (where FlexAttention's backward does not
compile, the row records the error type instead of a time); it also times the backward alone
(``autograd.grad`` on a kept graph) of our kernel at 100 % against SDPA-FA2's. The backward counts
2.5x the forward's FLOPs (5 matmuls to the forward's 2): ``10 * D * Hq * pairs`` alone,
``14 * D * Hq * pairs`` forward + backward.

The JSON is a run record (:func:`seerattn.record.write_record`, kind ``bench-attention``) holding the
environment, arguments, every row and the chosen kernel configs; the table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time

import torch

from benchmarks.shapes import ATTENTION as MODELS

logger = logging.getLogger("benchmarks.attention")


def environment() -> dict:
    """GPU, kernel-library versions (the record adds seerattn's environment and the commit)."""
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
    }


def synthetic_mask(h: int, t: int, bs: int, density: float, kind: str, seed: int):
    """Density-policy mask [1, h, NB, NB] over synthetic scores (see the module docstring)."""
    from seerattn import SparsityPolicy, mask_from_scores

    nb = math.ceil(t / bs)
    g = torch.Generator(device="cuda").manual_seed(seed)
    noise = torch.rand(1, h, nb, nb, device="cuda", generator=g)
    if kind == "random":
        scores = noise
    elif kind == "structured":
        # Ranking per row: 16 vertical columns per head first, then the local band by distance
        # (noise only breaks near ties), so the budget goes to sink + verticals + a local window.
        i = torch.arange(nb, device="cuda")
        local = torch.exp(-(i.view(-1, 1) - i.view(1, -1)).clamp_min(0).float() / nb)
        cols = torch.randint(0, nb, (1, h, 16), device="cuda", generator=g)
        vertical = torch.zeros(1, h, nb, device="cuda").scatter_(-1, cols, 2.0).unsqueeze(-2)
        scores = local + vertical + 0.01 * noise
    else:
        raise ValueError(f"mask kind must be 'structured' or 'random', got {kind!r}")
    if density >= 1.0:
        return mask_from_scores(scores, SparsityPolicy("dense"), t, bs)
    return mask_from_scores(scores, SparsityPolicy("density", density), t, bs)


def computed_pairs(mask, num_q_heads: int) -> int:
    """Causal (query, key) pairs inside kept blocks, summed over query heads."""
    dense = mask.expand_heads(num_q_heads).to_dense()[0]  # [Hq, NB, NB]
    nb, bs, t = dense.shape[-1], mask.block_size, mask.seq_len
    rows = torch.full((nb,), bs, dtype=torch.float64, device=dense.device)
    rows[-1] = t - (nb - 1) * bs
    lower = dense.tril(-1).sum(-1).double()  # [Hq, NB] kept blocks left of the diagonal
    diag = dense.diagonal(dim1=-2, dim2=-1).double()
    return int((lower * rows * bs + diag * rows * (rows + 1) / 2).sum().item())


def bench(fn, warmup=25, rep=100) -> float:
    """Median ms of ``fn``; NaN (with the error logged and kept in the JSON) when it cannot run."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except (RuntimeError, OutOfResources, ValueError) as err:
        logger.error("measurement failed: %s: %s", type(err).__name__, err)
        FAILURES.append(f"{type(err).__name__}: {err}"[:500])
        return math.nan


FAILURES: list[str] = []


def sdpa_dense(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[1] // k.shape[1]
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # outside the timed region
    be = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True)

    return run


def fa4_refusal(bs: int | None, d: int, grad: bool) -> str | None:
    """Why the fa4 provider cannot run (block-sparse at block ``bs``, dense with ``bs`` None), or None."""
    from seerattn.ops import fa4

    if bs is None:  # dense causal: the package and the GPU family are all that matter here
        return None if fa4.installed() else fa4.unsupported(torch.device("cuda"), 128, d, torch.bfloat16)
    return fa4.unsupported(torch.device("cuda"), bs, d, torch.bfloat16, grad=grad)


def fa4_dense(q, k, v):
    """FA4's dense causal attention on [B, T, H, D] tensors (its layout), K/V with Hkv heads: the output."""
    from flash_attn.cute import flash_attn_func

    res = flash_attn_func(q, k, v, causal=True)
    return res[0] if isinstance(res, tuple) else res  # (out, lse) in 4.0.0b36


def bench_fa4(fn, what: str, warmup=25, rep=100) -> tuple[float, str | None]:
    """Median ms of ``fn`` of the optional FA4 provider, or (NaN, the error): its compile or launch
    failure (any exception type, CuTe DSL's included) is a result to record, not the end of the run."""
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median")), None
    except Exception as err:  # noqa: BLE001  (see the docstring)
        msg = f"{type(err).__name__}: {str(err)[:300]}"
        logger.error("fa4 %s: %s", what, msg)
        FAILURES.append(f"fa4 {what}: {msg}")
        torch._dynamo.reset()
        return math.nan, msg


def to_bthd(*xs, grad: bool = False):
    """[B, H, T, D] -> contiguous [B, T, H, D] copies (leaves requiring grad with ``grad``)."""
    return [x.detach().transpose(1, 2).contiguous().requires_grad_(grad) for x in xs]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama3.1-8b", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--seqlens", default="32768", help="comma list, e.g. 8192,16384,32768,65536,131072")
    p.add_argument("--densities", default="1.0,0.5,0.3,0.1,0.05", help="target fractions of causal blocks")
    p.add_argument("--masks", default="structured", help="structured,random")
    p.add_argument("--block-sizes", default="64")
    p.add_argument("--mask-heads", default="hkv", help="hkv (one decision per GQA group), hq (per query head)")
    p.add_argument("--providers", default="ours,fa2,cudnn,flex,fa4", help="comma list of %(default)s")
    p.add_argument("--scores", action="store_true", help="also time attention_with_block_scores")
    p.add_argument(
        "--sweep", action="store_true", help="also time every candidate kernel config (with --backward: of each pass)"
    )
    p.add_argument("--union-off", action="store_true", help="also time per-Hq masks with 64-row tiles")
    p.add_argument("--backward", action="store_true", help="time forward + backward (and the backward alone)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--json", default=None, help="write results here")
    return p.parse_args(argv)


def _csv(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x]


def run_shape(args, model: str, t: int, record) -> None:
    """Every requested measurement for one (model, T); ``record(**row)`` collects rows."""
    from seerattn.ops._triton import block_scores as bsk
    from seerattn.ops._triton import config as kcfg
    from seerattn.ops._triton import sparse_fwd as spk
    from seerattn.ops._triton import sparse_fwd_ws as spk_ws
    from seerattn.ops.flex import flex_attention_call, to_flex_block_mask

    providers = _csv(args.providers)
    hq, hkv, d = MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(t)
    q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv))
    scale = 1.0 / math.sqrt(d)
    dense_pairs = hq * t * (t + 1) // 2
    base = dict(model=model, hq=hq, hkv=hkv, d=d, t=t)
    dense_ms: dict[str, float] = {}

    def ratios(row: dict, flex_ms: float = math.nan, fa4_ms: float = math.nan) -> dict:
        row["vs_fa2"] = dense_ms.get("fa2", math.nan) / row["ms"]
        row["vs_cudnn"] = dense_ms.get("cudnn", math.nan) / row["ms"]
        if row["provider"] != "flex":
            row["vs_flex"] = flex_ms / row["ms"]
        if row["provider"] != "fa4":
            row["vs_fa4"] = fa4_ms / row["ms"]
        return row

    for be in ("fa2", "cudnn"):
        if be not in providers:
            continue
        dense_ms[be] = bench(sdpa_dense(q, k, v, be), rep=args.rep)
        record(**base, op="dense", provider=f"sdpa-{be}", ms=dense_ms[be],
               tflops=4 * d * dense_pairs / dense_ms[be] / 1e9, density=1.0)  # fmt: skip
    if "fa4" in providers:
        why = fa4_refusal(None, d, grad=False)
        dense_ms["fa4"] = math.nan
        if why is None:
            qt, kt, vt = to_bthd(q, k, v)
            dense_ms["fa4"], why = bench_fa4(functools.partial(fa4_dense, qt, kt, vt), f"dense T={t}", rep=args.rep)
            del qt, kt, vt
        row = dict(**base, op="dense", provider="fa4", ms=dense_ms["fa4"],
                   tflops=4 * d * dense_pairs / dense_ms["fa4"] / 1e9, density=1.0)  # fmt: skip
        record(**row, **({"error": why} if why else {}))

    if args.scores and "ours" in providers:
        for bs in _csv(args.block_sizes, int):
            for store in (True, False):
                for cfg in [None, *(kcfg.block_scores_configs(bs, d) if args.sweep else [])]:
                    fn = functools.partial(
                        bsk.attention_with_block_scores_fwd,
                        q,
                        k,
                        v,
                        bs,
                        scale,
                        store_scores=store,
                        config=cfg,
                    )
                    ms = bench(fn, rep=args.rep)
                    name = "ours" if cfg is None else f"ours[{cfg.short()}]"
                    op = "scores" if store else "dense-ours"
                    tflops = 4 * d * dense_pairs / ms / 1e9
                    row = dict(**base, op=op, bs=bs, provider=name, ms=ms, tflops=tflops, density=1.0)
                    record(**ratios(row, fa4_ms=dense_ms.get("fa4", math.nan)))

    for bs in _csv(args.block_sizes, int):
        for mh in _csv(args.mask_heads):
            h = hq if mh == "hq" else hkv
            for kind in _csv(args.masks):
                for density in _csv(args.densities, float):
                    if density >= 1.0 and kind != _csv(args.masks)[0]:
                        continue  # all blocks kept: the mask kind does not matter
                    mask = synthetic_mask(h, t, bs, density, kind, seed=t + bs)
                    pairs = computed_pairs(mask, hq)
                    common = dict(
                        **base, op="sparse", bs=bs, mask_heads=mh, mask=kind, target_density=density,
                        density=mask.density(), pair_fraction=pairs / dense_pairs,
                    )  # fmt: skip
                    found: list[dict] = []
                    flex_ms = fa4_ms = math.nan
                    fm = to_flex_block_mask(mask, hq) if {"flex", "fa4"} & set(providers) else None  # untimed
                    if "flex" in providers:
                        flex_ms = bench(functools.partial(flex_attention_call, q, k, v, fm, scale, False), rep=args.rep)
                        found.append(dict(**common, provider="flex", ms=flex_ms, tflops=4 * d * pairs / flex_ms / 1e9))
                    if "fa4" in providers:
                        why = fa4_refusal(bs, d, grad=False)
                        if why is None:
                            fa4_ms, why = bench_fa4(
                                functools.partial(flex_attention_call, q, k, v, fm, scale, False, "FLASH"),
                                f"sparse T={t} bs={bs}",
                                rep=args.rep,
                            )
                        row = dict(**common, provider="fa4", ms=fa4_ms, tflops=4 * d * pairs / fa4_ms / 1e9)
                        found.append(row | ({"error": why} if why else {}))
                    if "ours" in providers:
                        cands: list = [None]
                        if args.sweep:
                            ws = spk_ws.supported(q, k, v, bs, h, False) is None  # the Hopper Gluon forward
                            cands += kcfg.sparse_configs(bs, hq // h, d, ws)
                        if args.union_off and mh == "hq" and bs < 128:
                            cands += [
                                kcfg.KernelConfig(bs, bs, 1, 4, 3),
                                kcfg.KernelConfig(bs, 2 * bs, 1, 4, 3),
                            ]
                        for cfg in cands:
                            fn = functools.partial(
                                spk.block_sparse_attention_fwd,
                                q, k, v, mask.kv_num_blocks, mask.kv_indices, bs, scale, None, False, cfg,
                                mask_source=mask.source, mask_memo=mask.memo,  # as block_sparse_attention
                            )  # fmt: skip
                            ms = bench(fn, rep=args.rep)
                            name = "ours" if cfg is None else f"ours[{cfg.short()}]"
                            found.append(dict(**common, provider=name, ms=ms, tflops=4 * d * pairs / ms / 1e9))
                    for row in found:
                        record(**ratios(row, flex_ms, fa4_ms))


def _fwd_bwd(attn, q, k, v, dout):
    """One forward + backward of ``attn(q, k, v)`` (grads of the leaves are reset, not accumulated)."""

    def run():
        for x in (q, k, v):
            x.grad = None
        attn(q, k, v).backward(dout)

    return run


def _bwd_only(attn, q, k, v, dout):
    """The backward alone: the forward runs once, its graph is kept and differentiated repeatedly."""
    out = attn(q, k, v)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def sweep_backward(args, q, k, v, dout, mask, scale, common: dict) -> list[dict]:
    """Rows ``op="bwd"`` for every dK/dV candidate (dQ at its default) and every dQ candidate (dK/dV at
    its default): one kernel forced at a time, so the rows show which candidate each pass prefers. The
    dK/dV candidates include the atomic-dQ ones (``.../atomic-dQ``: no dQ pass, so the dQ default is
    not used): their rows are the whole backward too, comparable with the split rows."""
    from seerattn.ops._triton import config as kcfg
    from seerattn.ops._triton.sparse_bwd import block_sparse_attention_bwd
    from seerattn.ops._triton.sparse_fwd import block_sparse_attention_fwd

    bs, hq, d = mask.block_size, q.shape[1], q.shape[-1]
    with torch.no_grad():
        out, lse = block_sparse_attention_fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, bs, scale)
    lists = (mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
    c1s, c2s = kcfg.dkdv_configs(bs, d), kcfg.dq_configs(bs, hq // mask.num_heads, d)
    rows = []
    for which, cands in (("dkdv", c1s), ("dq", c2s)):
        for cfg in cands:
            forced = (
                {"dkdv_config": cfg, "dq_config": c2s[0]}
                if which == "dkdv"
                else {"dkdv_config": c1s[0], "dq_config": cfg}
            )
            fn = functools.partial(
                block_sparse_attention_bwd,
                q.detach(),
                k.detach(),
                v.detach(),
                out,
                lse,
                dout,
                *lists,
                bs,
                scale,
                **forced,
            )
            ms = bench(fn, rep=args.rep)
            rows.append(
                common
                | dict(
                    op="bwd",
                    provider=f"ours[{which} {cfg.short()}]",
                    ms=ms,
                    tflops=10 * d * computed_pairs(mask, hq) / ms / 1e9,
                )
            )
    return rows


def run_shape_backward(args, model: str, t: int, record) -> None:
    """Forward + backward rows for one (model, T) (see the module docstring)."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from seerattn.ops import block_sparse_attention
    from seerattn.ops.flex import flex_attention_call, to_flex_block_mask

    providers = _csv(args.providers)
    hq, hkv, d = MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(t)
    q, k, v, dout = (
        torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv, hq)
    )
    for x in (q, k, v):
        x.requires_grad_(True)
    scale = 1.0 / math.sqrt(d)
    dense_pairs = hq * t * (t + 1) // 2
    base = dict(model=model, hq=hq, hkv=hkv, d=d, t=t)
    dense_ms: dict[str, float] = {}

    def tflops(pairs: int, ms: float, op: str) -> float:
        return (14 if op == "fwd+bwd" else 10) * d * pairs / ms / 1e9

    def sdpa(backend):
        be = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

        def attn(q, k, v):
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        return attn

    # SDPA gets K/V expanded to Hq heads as leaves (the expansion and the reduction of its gradient
    # over each group stay outside the timed region, as in the forward benchmark).
    kx, vx = (x.detach().repeat_interleave(hq // hkv, 1).requires_grad_(True) for x in (k, v))
    for be in ("fa2", "cudnn"):
        if be in providers:
            dense_ms[be] = bench(_fwd_bwd(sdpa(be), q, kx, vx, dout), rep=args.rep)
            record(**base, op="fwd+bwd", provider=f"sdpa-{be}", ms=dense_ms[be],
                   tflops=tflops(dense_pairs, dense_ms[be], "fwd+bwd"), density=1.0)  # fmt: skip
    if "fa4" in providers:
        why = fa4_refusal(None, d, grad=True)
        dense_ms["fa4"] = math.nan
        if why is None:  # FA4's own layout, leaves outside the timed region (K/V with Hkv heads)
            qt, kt, vt, dt = to_bthd(q, k, v, dout, grad=True)
            dense_ms["fa4"], why = bench_fa4(_fwd_bwd(fa4_dense, qt, kt, vt, dt.detach()), f"dense fwd+bwd T={t}",
                                             rep=args.rep)  # fmt: skip
            del qt, kt, vt, dt
        row = dict(**base, op="fwd+bwd", provider="fa4", ms=dense_ms["fa4"],
                   tflops=tflops(dense_pairs, dense_ms["fa4"], "fwd+bwd"), density=1.0)  # fmt: skip
        record(**row, **({"error": why} if why else {}))
    fa2_bwd = math.nan
    if "fa2" in providers:
        fa2_bwd = bench(_bwd_only(sdpa("fa2"), q, kx, vx, dout), rep=args.rep)
        record(**base, op="bwd", provider="sdpa-fa2", ms=fa2_bwd, tflops=tflops(dense_pairs, fa2_bwd, "bwd"),
               density=1.0)  # fmt: skip

    def ratios(row: dict, flex_ms: float = math.nan, fa4_ms: float = math.nan) -> dict:
        if row["op"] == "bwd":  # the backward alone is compared with SDPA-FA2's backward alone
            row["vs_fa2"] = fa2_bwd / row["ms"]
            return row
        row["vs_fa2"] = dense_ms.get("fa2", math.nan) / row["ms"]
        row["vs_cudnn"] = dense_ms.get("cudnn", math.nan) / row["ms"]
        if row["provider"] != "flex":
            row["vs_flex"] = flex_ms / row["ms"]
        if row["provider"] != "fa4":
            row["vs_fa4"] = fa4_ms / row["ms"]
        return row

    flex_failed: dict[int, str] = {}
    for bs in _csv(args.block_sizes, int):
        for mh in _csv(args.mask_heads):
            h = hq if mh == "hq" else hkv
            for kind in _csv(args.masks):
                for density in _csv(args.densities, float):
                    if density >= 1.0 and kind != _csv(args.masks)[0]:
                        continue
                    mask = synthetic_mask(h, t, bs, density, kind, seed=t + bs)
                    mask.q_indices  # noqa: B018  (the transposed lists are built once per mask, outside the timing)
                    pairs = computed_pairs(mask, hq)
                    common = dict(
                        **base, op="fwd+bwd", bs=bs, mask_heads=mh, mask=kind, target_density=density,
                        density=mask.density(), pair_fraction=pairs / dense_pairs,
                    )  # fmt: skip
                    flex_ms = math.nan
                    rows = []
                    if "flex" in providers and bs in flex_failed:  # one compile attempt per block size
                        rows.append(
                            dict(**common, provider="flex", ms=math.nan, tflops=math.nan, error=flex_failed[bs])
                        )
                    elif "flex" in providers:
                        fm = to_flex_block_mask(mask, hq, for_backward=True)
                        flex = lambda q, k, v, fm=fm: flex_attention_call(q, k, v, fm, scale, False)[0]
                        try:
                            flex_ms = float(
                                triton.testing.do_bench(_fwd_bwd(flex, q, k, v, dout), warmup=25, rep=args.rep,
                                                        return_mode="median")
                            )  # fmt: skip
                            rows.append(
                                dict(**common, provider="flex", ms=flex_ms, tflops=tflops(pairs, flex_ms, "fwd+bwd"))
                            )
                        except Exception as err:  # noqa: BLE001  (any compile failure is a result to record)
                            msg = f"does not compile: {type(err).__name__}"
                            logger.error("flex fwd+bwd at block %d: %s: %s", bs, msg, str(err)[:300])
                            FAILURES.append(f"flex fwd+bwd bs {bs}: {type(err).__name__}: {str(err)[:300]}")
                            rows.append(dict(**common, provider="flex", ms=math.nan, tflops=math.nan, error=msg))
                            flex_failed[bs] = msg
                            torch._dynamo.reset()
                    fa4_ms = math.nan
                    if "fa4" in providers:
                        why = fa4_refusal(bs, d, grad=True)
                        if why is None:
                            fm4 = to_flex_block_mask(mask, hq, for_backward=True)
                            fa4 = lambda q, k, v, fm=fm4: flex_attention_call(q, k, v, fm, scale, False, "FLASH")[0]
                            what = f"fwd+bwd T={t} bs={bs}"
                            fa4_ms, why = bench_fa4(_fwd_bwd(fa4, q, k, v, dout), what, rep=args.rep)
                        row = dict(**common, provider="fa4", ms=fa4_ms, tflops=tflops(pairs, fa4_ms, "fwd+bwd"))
                        rows.append(row | ({"error": why} if why else {}))
                    if "ours" in providers:
                        ours = lambda q, k, v, mask=mask: block_sparse_attention(q, k, v, mask, impl="triton")
                        ms = bench(_fwd_bwd(ours, q, k, v, dout), rep=args.rep)
                        rows.append(dict(**common, provider="ours", ms=ms, tflops=tflops(pairs, ms, "fwd+bwd")))
                        if args.sweep:  # the backward alone with each dK/dV and each dQ candidate
                            rows += sweep_backward(args, q, k, v, dout, mask, scale, common)
                        if density >= 1.0:
                            ms_b = bench(_bwd_only(ours, q, k, v, dout), rep=args.rep)
                            rows.append(
                                common | dict(op="bwd", provider="ours", ms=ms_b, tflops=tflops(pairs, ms_b, "bwd"))
                            )
                    for row in rows:
                        record(**ratios(row, flex_ms, fa4_ms))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from seerattn.ops._triton import config as kcfg

    env = environment()
    rows: list[dict] = []
    t_start = time.time()

    def record(**row):
        rows.append(row)
        logger.info(json.dumps(row))
        if args.json:  # partial results survive a timeout
            dump(args.json, env, args, rows, kcfg.tuning_log(), time.time() - t_start)

    for model in _csv(args.models):
        for t in _csv(args.seqlens, int):
            (run_shape_backward if args.backward else run_shape)(args, model, t, record)
            torch.cuda.empty_cache()
    if args.json:
        dump(args.json, env, args, rows, kcfg.tuning_log(), time.time() - t_start)
    print_table(rows, env)
    return 0


def dump(path: str, env: dict, args, rows: list[dict], tuning: dict, wall: float) -> None:
    from seerattn.record import write_record

    results = {"rows": rows, "tuning": tuning, "failures": FAILURES, "wall_s": wall}
    write_record(path, "bench-attention", results, config=vars(args), environment_extra=env)


def _fmt(row: dict, key: str) -> str:
    x = row.get(key)
    return f"{x:6.2f}" if isinstance(x, float) and not math.isnan(x) else "     -"


def print_table(rows: list[dict], env: dict) -> None:
    from seerattn.record import git_commit

    print(f"\n# {env['gpu']} | torch {torch.__version__} | triton {env['triton']} | commit {git_commit()}")
    print(
        f"{'model':12} {'T':>6} {'op':10} {'bs':>3} {'mh':>3} {'mask':10} {'dens':>5} {'provider':30} "
        f"{'ms':>8} {'TF/s':>6} {'xFA2':>6} {'xcuDNN':>6} {'xflex':>6} {'xFA4':>6}"
    )
    for r in rows:
        print(
            f"{r['model']:12} {r['t']:>6} {r['op']:10} {r.get('bs', '-')!s:>3} {r.get('mask_heads', '-'):>3} "
            f"{r.get('mask', '-'):10} {r['density']:5.3f} {r['provider']:30} {r['ms']:8.3f} "
            f"{r['tflops']:6.0f} "
            f"{_fmt(r, 'vs_fa2')} {_fmt(r, 'vs_cudnn')} {_fmt(r, 'vs_flex')} {_fmt(r, 'vs_fa4')}"
            + (f"  {r['error']}" if r.get("error") else "")
        )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
