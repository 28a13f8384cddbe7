"""Session 22 probes of the prefill gate's two largest parts, each against the library's kernel in one process.

1. Pooling program order: the library's pooling launch runs a (batch, head)'s windows on consecutive programs (head
   slowest), so the programs in flight read a few heads' 256-byte rows of each token ([B, T, H, D] memory, 8 KiB a
   token at Hq 32); ``pool_hf`` runs the heads fastest (the programs in flight read whole token rows). Same
   arithmetic, so the same bits (checked).
2. Projection with pre-split operands: the library's projection runs ``tl.dot(..., "tf32x3")`` on a 32-row mma.sync
   tile, so every program re-reads and re-splits its head's whole weight matrix (Q: 2048 programs x 192 KB at 32k,
   from L2). ``proj_split`` takes the weights already split (hi = TF32 rounding, lo = the fp32 remainder: what the
   kernel's split computes, once per weight instead of once per program) and runs three TF32 dots on 64- or 128-row
   tiles; ``--asplit`` also gives it the pooled rows pre-split (an upper bound for a pooling kernel that writes them
   split). ``ORDER`` 0: the small products from zero, then the big one onto the accumulator plus them (tl.dot's
   tf32x3 decomposition); 1: the step's three products from zero, added to the accumulator in fp32.
   Error: relative L2 against the fp64 projection (+ RoPE), beside the library kernel's.

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session22/gate_variants.py --json out.json
    TRITON_INTERPRET=1 PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session22/gate_variants.py --smoke
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from benchmarks.gate_parts import GATES, case
from seerattn.ops._triton import gate_fwd
from seerattn.ops._triton.gate_fwd import _pool_windows, _split_tf32


@triton.jit
def _pool_kernel_hf(
    XA, OutA, sxb_a, sxh_a, sxt_a, sob_a, soh_a, son_a, NP_A, H_A, TILES_A, PROGS_A,
    XB, OutB, sxb_b, sxh_b, sxt_b, sob_b, soh_b, son_b, NP_B, H_B, TILES_B,
    T,
    STEP_A: tl.constexpr, BLOCK_W_A: tl.constexpr, NPOOL_A: tl.constexpr,
    PA0: tl.constexpr, PA1: tl.constexpr, PA2: tl.constexpr,
    STEP_B: tl.constexpr, BLOCK_W_B: tl.constexpr, NPOOL_B: tl.constexpr,
    PB0: tl.constexpr, PB1: tl.constexpr, PB2: tl.constexpr,
    D: tl.constexpr,
):  # fmt: skip
    """gate_fwd._pool_kernel with the (batch, head) fastest: consecutive programs pool one window tile of every head."""
    pid = tl.program_id(0)
    if pid < PROGS_A:
        bh_a = PROGS_A // TILES_A
        _pool_windows(XA, OutA, sxb_a, sxh_a, sxt_a, sob_a, soh_a, son_a, T, NP_A, H_A, pid % bh_a, pid // bh_a,
                      STEP_A, D, BLOCK_W_A, NPOOL_A, PA0, PA1, PA2)  # fmt: skip
    else:
        pid -= PROGS_A
        bh_b = (tl.num_programs(0) - PROGS_A) // TILES_B
        _pool_windows(XB, OutB, sxb_b, sxh_b, sxt_b, sob_b, soh_b, son_b, T, NP_B, H_B, pid % bh_b, pid // bh_b,
                      STEP_B, D, BLOCK_W_B, NPOOL_B, PB0, PB1, PB2)  # fmt: skip


def pool_hf(k, q, cfg, tile):
    """gate_fwd._pool(k, ..., second=(q, ...)) through :func:`_pool_kernel_hf`."""
    kw, qw, warps = tile
    out_a, args_a, const_a, progs_a = gate_fwd._pool_job(k, cfg.block_size, cfg.k_pooling, kw)
    out_b, args_b, const_b, progs_b = gate_fwd._pool_job(q, cfg.q_step, cfg.q_pooling, qw)
    _pool_kernel_hf[(progs_a + progs_b,)](
        *args_a, progs_a, *args_b, k.shape[2], *const_a, *const_b, D=k.shape[3], num_warps=warps
    )
    return out_a, out_b


@triton.jit
def _proj_split_kernel(
    X, XL, WH, WL, C, S, Out,
    sxb, sxh, sxn, swh, swc, scb, scn, sob, soh, son,
    N, HQ, G, CDIM, HALF, TILES, C_STEP,
    ASPLIT: tl.constexpr, ORDER: tl.constexpr, HALF_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = pid // TILES
    mt = pid % TILES
    b = bh // HQ
    h = bh % HQ
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_j = tl.arange(0, HALF_P)
    j_ok = offs_j < HALF
    x_off = b.to(tl.int64) * sxb + (h // G).to(tl.int64) * sxh + rows.to(tl.int64)[:, None] * sxn
    w_off = h.to(tl.int64) * swh
    acc1 = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF_P], dtype=tl.float32)
    for k0 in range(0, CDIM, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_mask = row_ok[:, None] & (ks < CDIM)[None, :]
        a = tl.load(X + x_off + ks[None, :], mask=a_mask, other=0.0)
        if ASPLIT:
            a_hi = a
            a_lo = tl.load(XL + x_off + ks[None, :], mask=a_mask, other=0.0)
        else:
            a_hi, a_lo = _split_tf32(a)
        w_ptr = w_off + ks.to(tl.int64)[:, None] * swc + offs_j[None, :]
        w_mask = (ks < CDIM)[:, None] & j_ok[None, :]
        wh1 = tl.load(WH + w_ptr, mask=w_mask, other=0.0)
        wh2 = tl.load(WH + w_ptr + HALF, mask=w_mask, other=0.0)
        wl1 = tl.load(WL + w_ptr, mask=w_mask, other=0.0)
        wl2 = tl.load(WL + w_ptr + HALF, mask=w_mask, other=0.0)
        x1 = tl.dot(a_lo, wh1, input_precision="tf32")
        x1 = tl.dot(a_hi, wl1, x1, input_precision="tf32")
        x2 = tl.dot(a_lo, wh2, input_precision="tf32")
        x2 = tl.dot(a_hi, wl2, x2, input_precision="tf32")
        if ORDER == 0:
            acc1 = tl.dot(a_hi, wh1, acc1 + x1, input_precision="tf32")
            acc2 = tl.dot(a_hi, wh2, acc2 + x2, input_precision="tf32")
        else:
            acc1 += tl.dot(a_hi, wh1, x1, input_precision="tf32")
            acc2 += tl.dot(a_hi, wh2, x2, input_precision="tf32")
    m = row_ok[:, None] & j_ok[None, :]
    c_off = b.to(tl.int64) * scb + (rows * C_STEP).to(tl.int64)[:, None] * scn + offs_j[None, :]
    cos1 = tl.load(C + c_off, mask=m, other=0.0).to(tl.float32)
    cos2 = tl.load(C + c_off + HALF, mask=m, other=0.0).to(tl.float32)
    sin1 = tl.load(S + c_off, mask=m, other=0.0).to(tl.float32)
    sin2 = tl.load(S + c_off + HALF, mask=m, other=0.0).to(tl.float32)
    o_ptr = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows.to(tl.int64)[:, None] * son + offs_j[None, :]
    tl.store(o_ptr, acc1 * cos1 - acc2 * sin1, mask=m)
    tl.store(o_ptr + HALF, acc2 * cos2 + acc1 * sin2, mask=m)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) as _split_tf32 computes them."""
    hi = ((x.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    return hi, x - hi


def proj_split(x, xl, wh, wl, cos, sin, c_step, tile, order):
    """Pooled x [B, Hx, N, C] (xl its pre-split lo part, or None) times the pre-split weights [Hq, C, Dg] + RoPE."""
    block_m, block_k, warps, stages = tile
    b, hx, n, c = x.shape
    hq, _, dg = wh.shape
    out = torch.empty(b, hq, n, dg, dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(n, block_m)
    _proj_split_kernel[(b * hq * tiles,)](
        x, xl if xl is not None else x, wh, wl, cos, sin, out,
        *x.stride()[:3], *wh.stride()[:2], cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), *out.stride()[:3],
        n, hq, hq // hx, c, dg // 2, tiles, c_step,
        ASPLIT=xl is not None, ORDER=order, HALF_P=max(16, triton.next_power_of_2(dg // 2)), BLOCK_M=block_m,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def proj_ref(x, w, cos, sin, c_step):
    """fp64 projection + rotate-half RoPE at rows n * c_step."""
    hq = w.shape[0]
    xd = x.double().repeat_interleave(hq // x.shape[1], dim=1)
    y = torch.einsum("bhnc,hcd->bhnd", xd, w.double())
    n, half = y.shape[2], y.shape[3] // 2
    c = cos[:, : n * c_step : c_step].double()[:, None]
    s = sin[:, : n * c_step : c_step].double()[:, None]
    y1, y2 = y[..., :half], y[..., half:]
    return torch.cat([y1 * c[..., :half] - y2 * s[..., :half], y2 * c[..., half:] + y1 * s[..., half:]], -1)


def rel(x, ref) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="32768,131072")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    cuda = not a.smoke
    hq, hkv = (32, 8) if cuda else (4, 2)
    seqlens = [int(s) for s in a.seqlens.split(",")] if cuda else [200]
    cfg = GATES["testbed"]
    r = cfg.block_size // cfg.q_step
    prec = gate_fwd.DEFAULT_PRECISION
    pool_tile = gate_fwd.POOL_PAIR_TILE if cuda else (4, 4, 4)
    tiles = [(128, 32, 8, 2), (128, 32, 8, 3), (128, 16, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2)]
    if not cuda:
        tiles = [(16, 16, 4, 1)]
    rows = []

    def bench(fn):
        if not cuda:
            fn()
            return float("nan")
        return triton.testing.do_bench(fn, rep=a.reps, return_mode="median")

    def rec(t, what, tile, ms, err=None):
        rows.append({"seq_len": t, "what": what, "tile": tile, "ms": ms, "rel_err": err})
        print(f"T={t:>7} {what:<26} {str(tile):<18} {ms:8.4f} ms" + (f"  rel err {err:.3e}" if err is not None else ""),
              flush=True)  # fmt: skip

    def one_length(t: int) -> None:
        gate, q, k, cos, sin = case(t, hq, hkv, cfg, device="cuda" if cuda else "cpu",
                                    dtype=torch.bfloat16 if cuda else torch.float16)  # fmt: skip
        kw, qw, warps = pool_tile
        kp, qp = gate_fwd._pool(k, cfg.block_size, cfg.k_pooling, (kw, warps),
                                second=(q, cfg.q_step, cfg.q_pooling, qw))  # fmt: skip
        kp2, qp2 = pool_hf(k, q, cfg, pool_tile)
        assert torch.equal(kp, kp2) and torch.equal(qp, qp2), "head-fast pooling differs"
        for _ in range(2):  # two alternating rounds
            rec(
                t,
                "pool_pair",
                pool_tile,
                bench(
                    lambda: gate_fwd._pool(
                        k, cfg.block_size, cfg.k_pooling, (kw, warps), second=(q, cfg.q_step, cfg.q_pooling, qw)
                    )
                ),
            )
            rec(t, "pool_pair_headfast", pool_tile, bench(lambda: pool_hf(k, q, cfg, pool_tile)))
        wq, wk = gate.q_proj.detach().float().contiguous(), gate.k_proj.detach().float().contiguous()
        jobs = {"q": (qp, wq, 1), "k": (kp, wk, r)}
        for name, (x, w, c_step) in jobs.items():
            ref = proj_ref(x, w, cos, sin, c_step)
            base = gate_fwd._project(x, w, cos, sin, c_step, prec)
            rec(
                t,
                f"proj_{name}_library",
                gate_fwd.PROJ_TILE if cuda else None,
                bench(lambda x=x, w=w, c_step=c_step: gate_fwd._project(x, w, cos, sin, c_step, prec)),
                rel(base, ref),
            )
            wh, wl = split(w)
            xh, xl = split(x)
            for tile in tiles:
                for order in (0, 1):
                    for asplit in (False, True):
                        xa, xla = (xh, xl) if asplit else (x, None)
                        try:
                            out = proj_split(xa, xla, wh, wl, cos, sin, c_step, tile, order)
                            ms = bench(lambda xa=xa, xla=xla, wh=wh, wl=wl, tile=tile, order=order, c_step=c_step:
                                       proj_split(xa, xla, wh, wl, cos, sin, c_step, tile, order))  # fmt: skip
                            rec(t, f"proj_{name}_split{'_asplit' if asplit else ''}_o{order}", tile, ms, rel(out, ref))
                        except OutOfResources as e:  # a tile that does not fit the GPU's shared memory
                            print(f"T={t} {name} {tile} order {order} asplit {asplit}: {type(e).__name__}: {e}"[:300])
                            rows.append({"seq_len": t, "what": f"proj_{name}", "tile": tile, "error": repr(e)[:300]})
                if not cuda:
                    break
        rec(
            t,
            "proj_pair_library",
            gate_fwd.PROJ_TILE if cuda else None,
            bench(lambda: gate_fwd._project(kp, wk, cos, sin, r, prec, second=(qp, wq, 1))),
        )

    for t in seqlens:
        one_length(t)
        if cuda:
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
