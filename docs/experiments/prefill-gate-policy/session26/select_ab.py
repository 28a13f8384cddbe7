"""Session 26: the density selection and the gate's scores kernel timed on the tree on PYTHONPATH (the device script
runs it once per tree, alternating), so main and a branch are compared in one call.

    PYTHONPATH=src python3 docs/experiments/prefill-gate-policy/session26/select_ab.py --tag new --json new.json

Selection (``select_fwd``, kind ``density``, row budgets, sink and diagonal forced): B 1, H 32 per-query-head masks,
NQ 512 (32k tokens at block 64) and 2048 (128k), densities 0.1, 0.05 and 1.0 (the whole causal row: the threshold
search stops at once, so that row times the loads and stores alone), on gate-like logits (N(0, 3^2), -inf above the
diagonal, fixed seed). Each case's outputs are hashed (``kv_num_blocks`` and ``kv_indices``, padding included), so two
trees' rows say whether they select the same lists. ``--nopad``: also the selection with its padding stores cut out
of the source (an ablation: what the 33.5 MB / 537 MB of zeros a layer cost at 32k / 128k).
Scores kernel (``gate_fwd._scores``, tf32x3, R 4, Dg 128, the
testbed gate's split inputs at Llama-3.1-8B heads): with and without ``causal_only`` where the tree has it. Times are
medians of ``triton.testing.do_bench_cudagraph`` (a CUDA graph of the one launch replayed). ``--gate``: also the whole
gate (``AttnGate`` at the testbed's windowed gate, ``impl="triton"``, Llama-3.1-8B heads, bf16 q / k from
``benchmarks.gate_parts.case``) at 32k and 128k, replayed the same way, its causal logits hashed. ``--sweep``: also
the density kernel (density 0.1) at other launch constants (rows a program, scores a thread) patched into the module.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json

import torch
import triton

from seerattn.block_mask import density_row_budget
from seerattn.ops._triton import gate_fwd
from seerattn.ops._triton.select import select_fwd


def logits(nq: int, heads: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = 3.0 * torch.randn(1, heads, nq, nq, generator=g)
    return s.masked_fill(torch.ones(nq, nq, dtype=torch.bool).triu(1), float("-inf")).to(device)


def split(x: torch.Tensor):
    """Gate vectors as the projection writes them split (see tests/test_gate_kernels.py::_split_vectors)."""
    e = torch.frexp(x.abs().amax(-1))[1] - 1
    v = x * torch.exp2(14 - e.float())[..., None]
    hi = v.half()
    return torch.cat([hi, (v - hi.float()).half()], -1).contiguous(), torch.exp2(e.float() - 14).contiguous()


def select_without_padding():
    """An ablation, not a kernel to use: the tree's ``select_fwd`` with the padding stores taken out of its source (its
    lists' slots past the count left as ``torch.empty`` made them), loaded as a module beside the real one."""
    import importlib.util
    import os
    import tempfile

    from seerattn.ops._triton import select

    with open(select.__file__) as f:
        src = f.read()
    cuts = (
        "    tl.store(i_ptr[:, None] + cols[None, :], tl.zeros_like(pos), mask=pad)\n",
        "        tl.store(i_ptr[:, None] + c + cols[None, :], tl.zeros([BLOCK_R, W], dtype=tl.int32), mask=pad)\n",
    )
    for cut in cuts:
        if cut not in src:
            raise RuntimeError(f"select.py has no line {cut.strip()!r} (this ablation is for wip/select-vec's tree)")
        src = src.replace(cut, "")
    path = os.path.join(tempfile.mkdtemp(), "select_nopad.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("seerattn.ops._triton.select_nopad", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.select_fwd


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--json")
    p.add_argument("--sweep", action="store_true", help="also the density kernel at other launch constants")
    p.add_argument("--nopad", action="store_true", help="also the selection without its padding stores (ablation)")
    p.add_argument("--gate", action="store_true", help="also the whole gate at 32k and 128k (testbed gate, bf16)")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    variants = {"": select_fwd, **({"-nopad": select_without_padding()} if args.nopad else {})}
    for nq in (512, 2048):
        scores = logits(nq, 32, dev)
        for density in (0.1, 0.05, 1.0):
            budget = density_row_budget(nq, density, dev, "row")
            for variant, select in variants.items():

                def fn(scores=scores, budget=budget, density=density, select=select):
                    return select(scores, "density", density, budget, True, True, 0)

                num, idx = fn()
                digest = hashlib.sha1(num.cpu().numpy().tobytes() + idx.cpu().numpy().tobytes()).hexdigest()[:12]
                rows.append({"tag": args.tag + variant, "part": "select", "nq": nq, "density": density,
                             "ms": bench(fn), "digest": digest})  # fmt: skip
        del scores
    if args.sweep:  # the density kernel's launch constants (rows a program, scores a thread), patched into the module
        from seerattn.ops._triton import select

        default = (select.DENSITY_ROWS, select.DENSITY_PER_THREAD)
        for nq in (512, 2048):
            scores, budget = logits(nq, 32, dev), density_row_budget(nq, 0.1, dev, "row")
            for rows_, per_thread in (default, (1, 8), (1, 32), (2, 16), (2, 8), (4, 16)):
                select.DENSITY_ROWS, select.DENSITY_PER_THREAD = rows_, per_thread

                def fn(scores=scores, budget=budget):
                    return select_fwd(scores, "density", 0.1, budget, True, True, 0)

                num, idx = fn()
                digest = hashlib.sha1(num.cpu().numpy().tobytes() + idx.cpu().numpy().tobytes()).hexdigest()[:12]
                rows.append({"tag": f"{args.tag}-r{rows_}p{per_thread}", "part": "select", "nq": nq, "density": 0.1,
                             "ms": bench(fn), "digest": digest})  # fmt: skip
            select.DENSITY_ROWS, select.DENSITY_PER_THREAD = default
            del scores
    has_flag = "causal_only" in inspect.signature(gate_fwd._scores).parameters
    for nb in (512, 2048):
        g = torch.Generator(device="cpu").manual_seed(1)
        qg = split(torch.randn(1, 32, 4 * nb, 128, generator=g).to(dev))
        kg = split(torch.randn(1, 32, nb, 128, generator=g).to(dev))
        for causal_only in (False, True) if has_flag else (False,):
            kw = {"causal_only": True} if causal_only else {}
            out = gate_fwd._scores(qg, kg, 4, "tf32x3", **kw)
            causal = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
            digest = hashlib.sha1(out[..., causal].cpu().numpy().tobytes()).hexdigest()[:12]
            ms = bench(lambda kw=kw, qg=qg, kg=kg: gate_fwd._scores(qg, kg, 4, "tf32x3", **kw))
            rows.append({"tag": args.tag, "part": "scores", "nq": nb, "causal_only": causal_only, "ms": ms,
                         "digest": digest})  # fmt: skip
    if args.gate:  # the whole gate (pooling, projection, scores) at the testbed's windowed gate, bf16 q / k
        from benchmarks.gate_parts import GATES, case

        for t in (32768, 131072):
            gate, q, k, cos, sin = case(t, 32, 8, GATES["testbed"])
            with torch.no_grad():
                out = gate(q, k, cos, sin, impl="triton")
                nb = out.shape[-1]
                causal = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
                digest = hashlib.sha1(out[..., causal].cpu().numpy().tobytes()).hexdigest()[:12]
                del out
                ms = bench(lambda gate=gate, q=q, k=k, cos=cos, sin=sin: gate(q, k, cos, sin, impl="triton"))
            rows.append({"tag": args.tag, "part": "gate", "nq": nb, "ms": ms, "digest": digest})
            del gate, q, k
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
