"""The library's Triton launches compiled offline for Hopper (sm_90), no GPU needed: the prefill gate
(:mod:`seerattn.ops._triton.gate_fwd`), the selection (:mod:`seerattn.ops._triton.select`), sparse decode's gate and
block selection (``decode_select``, ``kcache_append``) and the attention kernels (block-sparse forward and backward,
the Hopper warp-specialised forward in Gluon (``sparse_fwd_ws``), the ground-truth forward, sparse decode: their
default configs, ``--all-configs`` every tuning candidate) at the GPU's
tiles, with the argument types and constexprs each launch really passes, compiled and reported by ptxas (registers,
spills, shared memory), never run.

    python -m benchmarks.sm90 --json runs/sm90.json
    python -m benchmarks.sm90 --launches attention --all-configs

The Triton interpreter, which the CPU tests use, runs a kernel's Python without compiling it and at the
interpreter's own tiles: a kernel that does not compile for the GPU (a constexpr reassigned in a ``static_range``,
session 17's grouped selection) or a GPU tile over Hopper's shared memory passes there and fails on the H200. This
compiles each launch the way the GPU would (pointers typed by the tensors' dtypes, integers as i32 / i64, every
constexpr as passed; integers equal to 1 folded and 16-divisible integers and aligned pointers declared so, as
Triton's launcher specialises them; the sizes of this module's examples, so a real shape may specialise otherwise).
Needs ``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` functions are not compilable).

:func:`compile_sm90` is the same compile for one kernel with hand-made constexprs (the tile studies in
docs/experiments/prefill-gate-policy: ``proj_compile.py``, ``scores_compile.py``; the decode gate's in
docs/experiments/decode/session12: ``gate_query_compile.py``).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

HOPPER_SHARED = 232448  # bytes of shared memory a Hopper block may use (227 KiB)
_POINTER_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.uint32: "u32", torch.uint64: "u64", torch.int8: "i8",
    torch.bool: "i8",
}  # fmt: skip


def _ptxas(kernel) -> dict:
    """ptxas (Triton's own) on the compiled kernel's PTX: registers and spills, shared bytes, whether they fit
    Hopper, and the wgmma instructions."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True,
            check=True,
        )  # fmt: skip
    info = " ".join(
        line.split(":", 1)[-1].strip() for line in out.stderr.splitlines() if "registers" in line or "spill" in line
    )
    shared = kernel.metadata.shared
    return {"ptxas": info, "shared": shared, "fits": shared <= HOPPER_SHARED,
            "mma": kernel.asm["ptx"].count("wgmma.mma_async")}  # fmt: skip


def _compile(
    fn, signature: dict, consts: dict, attrs: dict, warps: int, stages: int, maxnreg: int | None = None
) -> dict:
    from triton.experimental.gluon._runtime import GluonASTSource

    source = GluonASTSource if fn.is_gluon() else ASTSource  # Gluon kernels (the Hopper forward) lower differently
    options = {"num_warps": warps, "num_stages": stages} | ({} if maxnreg is None else {"maxnreg": maxnreg})
    kernel = triton.compile(
        source(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),  # what the driver reports for an sm_90 GPU (warp size 32)
        options=options,
    )
    return _ptxas(kernel)


def compile_sm90(
    fn, consts: dict, pointers: tuple[str, ...] | dict[str, str], free_ints: tuple[str, ...], warps: int,
    stages: int = 3, floats: tuple[str, ...] = (),
) -> dict:  # fmt: skip
    """``fn`` (a ``@triton.jit`` kernel) with ``consts`` -> ptxas's report (:func:`_ptxas`). ``pointers``: the
    pointer arguments, fp32 (a tuple of names) or name -> element type ("bf16", "i64", ...); every pointer and integer
    argument is declared 16-divisible (as a launch's strides are) except the integers named as free."""
    types = pointers if isinstance(pointers, dict) else dict.fromkeys(pointers, "fp32")
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "*" + types[name] if name in types else "i32"
            if name not in free_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return _compile(fn, sig, consts, attrs, warps, stages)


class CompileOnly:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` compiles it for sm_90 with the
    launch's argument types and constexprs (:func:`_compile`) and appends the report to ``reports``; nothing runs."""

    def __init__(self, fn, reports: list):
        self.fn, self.reports = fn, reports

    def __getitem__(self, grid):
        def launch(*args, num_warps: int = 4, num_stages: int = 3, maxnreg: int | None = None, **kwargs):
            values = dict(zip(self.fn.arg_names[: len(args)], args, strict=True)) | kwargs
            sig, consts, attrs, shown = {}, {}, {}, {}
            for i, param in enumerate(self.fn.params):
                name = param.name
                if name not in values and not param.has_default:
                    raise TypeError(f"{self.fn.__name__}: launched without argument {name}")
                value = values.get(name, param.default)
                # what a launch specialises, as Triton's launcher does: an integer 1 becomes a constant, integers
                # and pointers 16-divisible / 16-aligned are declared so (vectorised loads, folded strides)
                if param.is_constexpr and isinstance(value, (int, str, bool)):
                    shown[name] = value  # the kernel's own constexprs, for the report
                if param.is_constexpr or (type(value) is int and value == 1):
                    sig[name], consts[name] = "constexpr", value
                elif isinstance(value, torch.Tensor):
                    sig[name] = "*" + _POINTER_TYPES[value.dtype]
                    if value.data_ptr() % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(value, bool):
                    sig[name] = "i1"
                elif isinstance(value, int):
                    sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                    if value % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(value, float):
                    sig[name] = "fp32"
                elif isinstance(value, TensorDescriptor):  # a host TMA descriptor (the Hopper forward's Q / K / V)
                    block = ", ".join(map(str, value.block_shape))
                    sig[name] = f"tensordesc<{_POINTER_TYPES[value.base.dtype]}[{block}],{value.layout!r}>"
                else:
                    raise TypeError(f"{self.fn.__name__}: argument {name} is a {type(value).__name__}")
            report = _compile(self.fn, sig, consts, attrs, num_warps, num_stages, maxnreg)
            self.reports.append({"kernel": self.fn.__name__, "grid": list(grid), "warps": num_warps,
                                 "stages": num_stages, "maxnreg": maxnreg, "constexprs": shown, **report})  # fmt: skip

        return launch


def gate_launches() -> None:
    """The fused gate's launches at the GPU tiles: Llama-3.1-8B heads, the testbed's windowed gate (Q windows of 16
    pooled avg / max / min, K blocks of 64, Dg 128, RoPE), bf16 q / k of an odd length; and a gate without a Q
    projection (the pooled Q rotated by the RoPE kernel)."""
    from seerattn.ops._triton import gate_fwd

    t, hq, hkv, d, dg = 1000, 32, 8, 128, 128
    q = torch.empty(1, t, hq, d, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.empty(1, t, hkv, d, dtype=torch.bfloat16).transpose(1, 2)
    pools = ("avg", "max", "min")
    cos = sin = torch.empty(1, -(-t // 16), dg)
    wk, wq = torch.empty(hq, 3 * d, dg), torch.empty(hq, 3 * d, dg)
    for precision in gate_fwd.PRECISIONS:
        gate_fwd.gate_logits_fwd(q, k, wk, wq, cos, sin, 64, 16, pools, pools, precision)
    cos1 = sin1 = torch.empty(1, -(-t // 64), d)
    gate_fwd.gate_logits_fwd(q, k, torch.empty(hq, d, d), None, cos1, sin1, 64, 64, ("avg",), ("max",))


def select_launches() -> None:
    """The selection's launches: density with row budgets at NQ 512 (four width classes, one launch) and 2048 (three
    launches), fp32 and fp64 scores; threshold, top_p and the head allocation."""
    from seerattn.ops._triton import select

    for nq, dtype in ((512, torch.float32), (2048, torch.float32), (512, torch.float64)):
        scores = torch.empty(1, 2, nq, nq, dtype=dtype)
        budget = torch.ones(nq, dtype=torch.int64)
        select.select_fwd(scores, "density", 0.1, budget, True, True, 0)
    scores = torch.empty(1, 2, 512, 512)
    for kind in ("threshold", "top_p"):
        select.select_fwd(scores, kind, 0.5, None, True, True, 0)
    select.select_fwd(scores, "density", 0.1, None, True, True, 0, head_total=1000)


def decode_launches() -> None:
    """Sparse decode's launches outside the attention kernel (which the autotuner times on a GPU): the decode gate's
    key-cache append, the budget selection (with and without forced blocks), the block bounds' update, their scores
    and the top-M; batch 16, Llama-3.1-8B heads, a 32k cache of 64-token blocks, 64 slots."""
    from seerattn.ops._triton import decode_select, kcache_append

    b, hq, hkv, d, dg, nb, t, bs = 16, 32, 8, 128, 128, 512, 32768, 64
    keys = torch.empty(b, hkv, nb, dg)
    lengths, num_blocks = torch.empty(b, dtype=torch.int64), torch.empty(b, dtype=torch.int64)
    cos = sin = torch.empty(b, 1, dg)
    kcache_append.gate_key_append_fwd(
        torch.empty(b, hkv, d, dtype=torch.bfloat16), torch.empty(b, hkv, 3, d), keys, lengths, num_blocks,
        torch.empty(hkv, 3 * d, dg), torch.empty(dg), 1e-6, cos, sin, bs, ("max", "min", "avg"),
    )  # fmt: skip
    qg, seqlens = torch.empty(b, hkv, dg), torch.empty(b, dtype=torch.int32)
    for forced in (None, torch.empty(b, hkv, 2, dtype=torch.int32)):
        decode_select.decode_budget_select_fwd(qg, keys, seqlens, 64, bs, forced)
    kmin = kmax = torch.empty(b, hkv, nb, d, dtype=torch.bfloat16)
    cache = torch.empty(b, hkv, t, d, dtype=torch.bfloat16)
    kcache_append.block_bounds_update_fwd(cache, kmin, kmax, lengths, None, bs)
    q = torch.empty(b, hq, 1, d, dtype=torch.bfloat16)
    scores = decode_select.bound_scores_fwd(q, kmin, kmax, torch.empty(b, 1, dtype=torch.int32), bs)
    decode_select.top_fwd(scores, 64)


def attention_launches(all_configs: bool = False) -> None:
    """The attention kernels at their untuned default configs (``all_configs``: every candidate the tuner would
    time): the block-sparse forward and backward at mask blocks 32, 64 and 128 with per-query-head and per-group
    masks (and a varlen forward), the ground-truth forward with block scores, the sparse decode on a contiguous and
    a paged cache; Llama-3.1-8B heads, bf16, 1000 tokens."""
    from seerattn.ops._triton import block_scores, config, decode_fwd, sparse_bwd, sparse_fwd, sparse_fwd_ws

    def pick(configs):
        return configs if all_configs else configs[:1]

    t, hq, hkv, d, scale = 1000, 32, 8, 128, 128**-0.5
    q = torch.empty(1, t, hq, d, dtype=torch.bfloat16).transpose(1, 2)
    k = v = torch.empty(1, t, hkv, d, dtype=torch.bfloat16).transpose(1, 2)
    lse = torch.empty(1, hq, t)
    for mb in (32, 64, 128):
        nq = -(-t // mb)
        for hm in (hq, hkv):
            num, idx = torch.empty(1, hm, nq, dtype=torch.int32), torch.empty(1, hm, nq, nq, dtype=torch.int32)
            fwd = config.sparse_configs(mb, hq // hm, d)
            for cfg in pick(fwd):
                sparse_fwd.block_sparse_attention_fwd(q, k, v, num, idx, mb, scale, config=cfg)
            if mb == 64:  # the warp-specialised Hopper forward (Gluon) per group and per head, and at D 64 in fp16
                sparse_fwd_ws.launch(q, k, v, q, lse, num, idx, scale)
                sparse_fwd_ws.launch(q, k, v, q, lse, num, idx, scale, cu_seqlens=torch.empty(2, dtype=torch.int32))
                q64 = torch.empty(1, t, hq, 64, dtype=torch.float16).transpose(1, 2)
                k64 = torch.empty(1, t, hkv, 64, dtype=torch.float16).transpose(1, 2)
                sparse_fwd_ws.launch(q64, k64, k64, q64, lse, num, idx, scale)
                if hm == hkv:  # 128-key steps (two kept blocks a step)
                    sparse_fwd_ws.launch(q, k, v, q, lse, num, idx, scale, 64, 128)
                else:  # per query head: the union kernel (two query blocks of a head a tile), also varlen and with
                    # 128-key steps (two blocks of the union a step)
                    sparse_fwd_ws.launch(q, k, v, q, lse, num, idx, scale, union=True)
                    sparse_fwd_ws.launch(q, k, v, q, lse, num, idx, scale, union=True,
                                         cu_seqlens=torch.empty(2, dtype=torch.int32))  # fmt: skip
                    sparse_fwd_ws.launch(q, k, v, q, lse, num, idx, scale, 64, 128, union=True)
            if mb == 128:  # 128-token blocks (per group; per query head: a head a tile), a block a 128-key step
                sparse_fwd_ws.launch(q, k, v, q, lse, num, idx, scale, 128, 128)
            if mb == 64 and hm == hkv:  # packed documents with per-group masks: the varlen forward
                cu = torch.empty(3, dtype=torch.int32)
                sparse_fwd.block_sparse_attention_fwd(q, k, v, num, idx, mb, scale, cu_seqlens=cu, config=fwd[0])
            dkdv, dq = config.dkdv_configs(mb, d), config.dq_configs(mb, hq // hm, d)
            pairs = [(c, dq[0]) for c in pick(dkdv)] + [(dkdv[0], c) for c in pick(dq)[1:] if all_configs]
            for dkdv_cfg, dq_cfg in pairs:
                sparse_bwd.block_sparse_attention_bwd(
                    q, k, v, q, lse, q, num, idx, num, idx, mb, scale, dkdv_config=dkdv_cfg, dq_config=dq_cfg
                )
    for cfg in pick(config.block_scores_configs(64, d)):
        block_scores.attention_with_block_scores_fwd(q, k, v, 64, scale, config=cfg)
    b, slots = 16, 64
    qd, seqlens = torch.empty(b, hq, d, dtype=torch.bfloat16), torch.empty(b, dtype=torch.int32)
    blocks = torch.empty(b, hkv, slots, dtype=torch.int32)
    cache = torch.empty(b, hkv, 4096, d, dtype=torch.bfloat16)
    pages, table = torch.empty(256, 256, hkv, d, dtype=torch.bfloat16), torch.empty(b, 16, dtype=torch.int32)
    for cfg in pick(decode_fwd.decode_configs(64)):
        decode_fwd.sparse_decode_fwd(qd, cache, cache, seqlens, blocks, 64, scale, num_splits=4, config=cfg)
        decode_fwd.sparse_decode_fwd(qd, pages, pages, seqlens, blocks, 64, scale, table, num_splits=1, config=cfg)


LAUNCHES = {
    "gate": gate_launches,
    "select": select_launches,
    "decode": decode_launches,
    "attention": attention_launches,
}


def compile_all(names=tuple(LAUNCHES), all_configs: bool = False) -> list[dict]:
    """Runs the named launch sets with every ``@triton.jit`` kernel of their modules replaced by
    :class:`CompileOnly`; returns the reports in launch order. ``all_configs``: the attention kernels at every
    tuning candidate, not only the default."""
    from seerattn.ops._triton import (
        block_scores,
        config,
        decode_fwd,
        decode_select,
        gate_fwd,
        kcache_append,
        select,
        sparse_bwd,
        sparse_fwd,
        sparse_fwd_ws,
    )

    if config.interpreting():
        raise RuntimeError("compiling for sm_90 needs TRITON_INTERPRET unset (interpreted kernels do not compile)")
    reports: list[dict] = []
    saved = []
    modules = (gate_fwd, select, decode_select, kcache_append, sparse_fwd, sparse_fwd_ws, sparse_bwd, block_scores,
               decode_fwd)  # fmt: skip
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                saved.append((module, name, value))
    try:
        for module, name, value in saved:
            setattr(module, name, CompileOnly(value, reports))
        launches = {**LAUNCHES, "attention": functools.partial(attention_launches, all_configs)}
        for name in names:
            launches[name]()
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    return reports


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", default=",".join(LAUNCHES), help=f"comma list of {tuple(LAUNCHES)}")
    p.add_argument("--all-configs", action="store_true", help="the attention kernels at every tuning candidate")
    p.add_argument("--json", help="write the reports here")
    args = p.parse_args(argv)
    if not set(args.launches.split(",")) <= set(LAUNCHES):
        p.error(f"--launches takes a comma list of {tuple(LAUNCHES)}; got {args.launches!r}")
    reports = compile_all(tuple(args.launches.split(",")), args.all_configs)
    for r in reports:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        print(f"{r['kernel']:<22} w{r['warps']} s{r['stages']} shared {r['shared']:>6} {r['ptxas']}  [{consts}]")
    if args.json:
        from seerattn.record import write_record

        write_record(args.json, "sm90-compile", reports, vars(args))
    over = [r for r in reports if not r["fits"]]
    if over:
        print(f"{len(over)} launch(es) over Hopper's shared memory: {[r['kernel'] for r in over]}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
