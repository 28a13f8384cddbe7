"""The selection kernel's ``density`` kind (row allocation): main's kernel (``select_baseline.py``, a 32-pass bitwise
search over full-width rows) against this branch's ``_density_kernel`` (width classes, two bits a pass with an early
stop), at the profiled shapes: B 1, H 32 per-query-head masks, NQ 512 (32k tokens at block 64) and 2048 (128k),
densities 0.1 and 0.05, sink and diagonal forced.

    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/select_bench.py --json select_bench.json   # GPU
    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/select_bench.py --sweep   # + launch configs
    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/select_bench.py --compile   # no GPU: sm_90 build

GPU mode: for each shape, density and score set, both kernels' outputs are asserted equal (``kv_num_blocks`` and
``kv_indices``, padding included), then each is timed with ``triton.testing.do_bench`` (median ms), beside a floor:
``scores.clone()``, one read of the scores and one write of as many bytes (what the lists take). Score sets:
``gate`` (softmax of N(0, 3^2) logits over the causal row, fp32: distinct values, the search stops early) and
``ties`` (the logits rounded to multiples of 0.5: many equal scores, ties across the budget, every pass runs).
``--sweep`` also times the new kernel under other launch constants (rows a program, scores a thread, narrowest
width class), patched into the module.

Compile mode (``triton.compile`` for ``GPUTarget("cuda", 90, 64)``, Triton's ptxas and cuobjdump): per kernel and
launch, registers, spills, shared memory, SASS instructions, ``BAR.SYNC`` (cross-warp steps) and, for a search pass,
its instructions; then an estimate of the warp-instructions one layer issues (programs x warps x instructions a
thread runs; the new kernel's passes per program counted on CPU scores of the ``gate`` and ``ties`` sets at H 4),
a proxy for work, not a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

from seerattn.block_mask import density_row_budget
from seerattn.ops._triton import select as new

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import select_baseline as old  # noqa: E402  (main's kernel, beside this file)

NQS = (512, 2048)
DENSITIES = (0.1, 0.05)
HEADS = 32
SWEEP = [(rows, per_thread, min_width) for rows in (1, 2, 4) for per_thread in (4, 8, 16) for min_width in (64,)] + [
    (4, 8, 32),
    (4, 8, 128),
]


def gate_scores(nq: int, heads: int, ties: bool, device, seed: int = 0) -> torch.Tensor:
    """fp32 [1, heads, NQ, NQ] causal softmax rows of N(0, 9) logits (``ties``: rounded to multiples of 0.5)."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(1, heads, nq, nq, generator=g, device=device) * 3
    if ties:
        logits = (logits * 2).round() / 2
    causal = torch.ones(nq, nq, dtype=torch.bool, device=device).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def run(module, scores: torch.Tensor, density: float):
    budget = density_row_budget(scores.shape[-1], density, scores.device, "row")
    return module.select_fwd(scores, "density", density, budget, True, True, 0)


def bench(sweep: bool) -> list[dict]:
    rows = []
    for nq in NQS:
        for ties in (False, True):
            scores = gate_scores(nq, HEADS, ties, "cuda")
            floor = triton.testing.do_bench(lambda s=scores: s.clone(), return_mode="median")
            for density in DENSITIES:
                want, got = run(old, scores, density), run(new, scores, density)
                assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), (nq, ties, density)
                t_old = triton.testing.do_bench(lambda s=scores, d=density: run(old, s, d), return_mode="median")
                t_new = triton.testing.do_bench(lambda s=scores, d=density: run(new, s, d), return_mode="median")
                row = {"nq": nq, "scores": "ties" if ties else "gate", "density": density, "old_ms": t_old,
                       "new_ms": t_new, "speedup": t_old / t_new, "floor_ms": floor}  # fmt: skip
                if sweep:
                    row["sweep_ms"] = {}
                    saved = (new.DENSITY_ROWS, new.DENSITY_PER_THREAD, new.MIN_WIDTH)
                    try:
                        for cfg in SWEEP:
                            new.DENSITY_ROWS, new.DENSITY_PER_THREAD, new.MIN_WIDTH = cfg
                            got = run(new, scores, density)
                            assert torch.equal(want[1], got[1]), (cfg, nq, ties, density)
                            row["sweep_ms"][",".join(map(str, cfg))] = triton.testing.do_bench(
                                lambda s=scores, d=density: run(new, s, d), return_mode="median"
                            )
                    finally:
                        new.DENSITY_ROWS, new.DENSITY_PER_THREAD, new.MIN_WIDTH = saved
                rows.append(row)
                print(
                    f"NQ {nq:5d}  {row['scores']:5s}  density {density:.2f}  old {t_old:7.3f} ms  new {t_new:7.3f} ms"
                    f"  x{row['speedup']:5.2f}  floor {floor:6.3f} ms",
                    flush=True,
                )
                if sweep:
                    best = min(row["sweep_ms"], key=row["sweep_ms"].get)
                    times = "  ".join(f"{k} {v:.3f}" for k, v in row["sweep_ms"].items())
                    print(f"    sweep (rows,per_thread,min_width): {times}   best {best}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- offline compile

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTERS = {"S": "*fp32", "Value": "*fp32", "Budget": "*i64", "Num": "*i32", "Idx": "*i32", "Theta": "*i32",
            "Need": "*i32", "TiesBefore": "*i32"}  # fmt: skip
NOT_DIVISIBLE = ("NQ", "H", "BH", "N_ROWS", "DENSE_FROM", "ROW_LO", "ROW_HI", "LAST_LO")  # sizes: any value


def compile_sm90(fn, consts: dict, warps: int) -> dict:
    """Build ``fn`` for sm_90 with pointers and strides declared 16-divisible, as a real launch specialises them."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = POINTERS.get(name, "i32")
        if name not in NOT_DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 64),
        options={"num_warps": warps},
    )
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        info = subprocess.run(
            [os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True,
            check=True,
        ).stderr  # fmt: skip
        sass = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    # loops: conditional backward branches (target below the branch), body = the instructions between them
    # (the unconditional ones return from the out-of-line paths of divergent shuffles, placed after the exit)
    loops = []
    for addr, text in code:
        m = re.search(r"^@!?U?P\w+\s+BRA\s+(?:\S+,\s*)?0x([0-9a-f]+)", text.strip())
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [t for a, t in code if lo <= a <= addr]
            loops.append({"instructions": len(body), "bar": sum("BAR.SYNC" in t for t in body)})
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {
        "warps": warps,
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spill_stores": int(spill.group(1)),
        "spill_loads": int(spill.group(2)),
        "shared": kernel.metadata.shared,
        "sass": len(code),
        "bar": sum("BAR.SYNC" in t for _, t in code),
        "loops": sorted(loops, key=lambda x: -x["instructions"]),
    }


def passes_per_row(scores: torch.Tensor, density: float) -> torch.Tensor:
    """int [B, H, NQ]: search passes ``_density_kernel`` runs for each row (two bits a pass, stopping once exactly
    the budget is at or above the threshold), replayed in PyTorch on the same keys."""
    nq = scores.shape[-1]
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    forced = torch.eye(nq, dtype=torch.bool)
    forced[:, 0] = True
    s = scores.float().masked_fill(forced & causal, float("inf"))
    bits = torch.where(s == 0, torch.zeros_like(s), s).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(bits >> 31 != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000).masked_fill(~causal, 0)
    k = torch.minimum(density_row_budget(nq, density), torch.arange(1, nq + 1)).view(nq, 1)
    theta = torch.zeros(*scores.shape[:-1], 1, dtype=torch.int64)
    n_ge = torch.arange(1, nq + 1).view(nq, 1).expand_as(theta)
    passes = torch.zeros(scores.shape[:-1], dtype=torch.int64)
    for bit in range(30, -1, -2):
        passes += (n_ge != k).squeeze(-1)  # a row that has met its budget stays met (its count is k)
        c1, c2 = theta | (1 << bit), theta | (2 << bit)
        c3 = c1 | c2
        n1, n2, n3 = ((key >= c).sum(-1, keepdim=True) for c in (c1, c2, c3))
        theta = torch.where(n3 >= k, c3, torch.where(n2 >= k, c2, torch.where(n1 >= k, c1, theta)))
        n_ge = torch.where(n3 >= k, n3, torch.where(n2 >= k, n2, torch.where(n1 >= k, n1, n_ge)))
    return passes


def compile_report(nq: int, density: float) -> dict:
    """Old and new kernels at one shape: their builds, and the estimated warp-instructions of one layer (H 32)."""
    bh = HEADS
    out = {"nq": nq, "density": density}
    # main's launch: block_r = 4096 // NKP rows, 8 warps; every row full width, no loop (32 passes unrolled)
    nkp = triton.next_power_of_2(nq)
    block_r = max(1, 4096 // nkp)
    warps = 4 if block_r * nkp <= 2048 else 8
    consts = dict(KIND=2, SINK=True, DIAG=True, NKP=nkp, BLOCK_R=block_r, KEY64=False)
    o = compile_sm90(old._select_kernel, {**consts, "BITS": 32}, warps)
    o16 = compile_sm90(old._select_kernel, {**consts, "BITS": 16}, warps)
    o["pass_instructions"] = (o["sass"] - o16["sass"]) / 16
    o["bar_per_pass"] = (o["bar"] - o16["bar"]) / 16
    o["block_r"] = block_r
    o["programs"] = triton.cdiv(bh * nq, block_r)
    o["warp_instructions"] = o["programs"] * warps * o["sass"]
    out["old"] = o
    # new: one launch per width class, passes per program counted on CPU scores (4 heads of each set)
    out["new"] = []
    passes = {name: passes_per_row(gate_scores(nq, 4, name == "ties", "cpu"), density) for name in ("gate", "ties")}
    width, hi = nkp, nq
    totals = {"gate": 0, "ties": 0, "worst": 0}
    while hi > 0:
        lo = width // 2 if width > new.MIN_WIDTH else 0
        block_r = max(1, min(new.DENSITY_TILE // width, new.DENSITY_ROWS))
        warps = max(1, min(8, block_r * width // (32 * new.DENSITY_PER_THREAD)))
        c = compile_sm90(
            new._density_kernel,  # one width class a launch, as when this study ran (session 17 groups them)
            dict(SINK=True, DIAG=True, W0=width, CLASSES=1, BLOCK_R=block_r, KEY64=False, BITS=32),
            warps,
        )
        search = c["loops"][0]  # the largest loop: the search pass (the other writes padding past the width)
        pad = (c["loops"][1]["instructions"] if len(c["loops"]) > 1 else 0) * (triton.cdiv(nq, width) - 1)
        once = c["sass"] - sum(x["instructions"] for x in c["loops"])
        programs = triton.cdiv((hi - lo) * bh, block_r)
        c.update(width=width, rows=[lo, hi], block_r=block_r, programs=programs,
                 pass_instructions=search["instructions"], bar_per_pass=search["bar"])  # fmt: skip
        for name, p in passes.items():
            # rows of a program: consecutive heads of one I (4 heads here, the pattern repeats over 32)
            per_row = p[0, :, lo:hi].flip(1).transpose(0, 1).reshape(-1)  # r order: I descending, heads inner
            per_prog = per_row[: (per_row.numel() // block_r) * block_r].view(-1, block_r).amax(1).float().mean()
            c[f"passes_{name}"] = round(per_prog.item(), 2)
            totals[name] += programs * warps * (once + per_prog.item() * search["instructions"] + pad)
        totals["worst"] += programs * warps * (once + 16 * search["instructions"] + pad)
        out["new"].append(c)
        width, hi = width // 2, lo
    out["new_warp_instructions"] = totals
    return out


def print_compile(rep: dict) -> None:
    o = rep["old"]
    print(f"\nNQ {rep['nq']}, density {rep['density']}, H {HEADS}")
    print(f"  old  rows {o['block_r']}, {o['warps']} warps: {o['registers']} regs, spills {o['spill_stores']}/"
          f"{o['spill_loads']} B, shared {o['shared']} B, {o['sass']} SASS, {o['bar']} BAR; a pass "
          f"{o['pass_instructions']:.0f} instr, {o['bar_per_pass']:.1f} BAR, 32 passes; "
          f"{o['programs']} programs, {o['warp_instructions'] / 1e6:.1f} M warp-instr")  # fmt: skip
    for c in rep["new"]:
        print(f"  new  W {c['width']:5d} rows {c['rows'][0]}..{c['rows'][1] - 1}, {c['block_r']} rows x {c['warps']} "
              f"warps: {c['registers']} regs, spills {c['spill_stores']}/{c['spill_loads']} B, shared {c['shared']} B, "
              f"{c['sass']} SASS; a pass {c['pass_instructions']} instr, {c['bar_per_pass']} BAR; passes a program "
              f"gate {c['passes_gate']} ties {c['passes_ties']}; {c['programs']} programs")  # fmt: skip
    t = rep["new_warp_instructions"]
    print(f"  new  warp-instr {t['gate'] / 1e6:.1f} M (gate), {t['ties'] / 1e6:.1f} M (ties), "
          f"{t['worst'] / 1e6:.1f} M (every pass)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile", action="store_true", help="no GPU: the sm_90 build of both kernels")
    p.add_argument("--sweep", action="store_true", help="also time the new kernel's other launch constants")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--config", help="the new kernel's launch constants rows,per_thread,min_width (default: module's)")
    args = p.parse_args()
    if args.config:
        new.DENSITY_ROWS, new.DENSITY_PER_THREAD, new.MIN_WIDTH = (int(x) for x in args.config.split(","))
    if args.compile:
        rows = []
        for nq in NQS:
            for density in DENSITIES:
                rows.append(compile_report(nq, density))
                print_compile(rows[-1])
    else:
        if not torch.cuda.is_available():
            raise SystemExit("select_bench.py times kernels on a CUDA GPU; without one, run it with --compile")
        rows = bench(args.sweep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
