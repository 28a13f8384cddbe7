"""End-to-end prefill time of a Llama-3.1-8B-shaped model: dense SDPA vs seer and the other sparse methods.

    python3 -m benchmarks.prefill --seqlens 8192,32768 --densities 0.1 --json runs/prefill.json
    python3 -m benchmarks.prefill --seqlens 32768 --methods seer,xattention,flexprefill,xattention_top_p \
        --json runs/prefill_peers.json
    python3 -m benchmarks.prefill --seqlens 32768,131072 --densities 0.1,0.05 --gate-impls triton,eager
    python3 -m benchmarks.prefill --seqlens 32768,131072 --block-sizes 64,128 --attn-impls auto,triton,fa4
    python3 -m benchmarks.prefill --smoke   # a tiny model on the CPU: checks that every method runs

Builds ``LlamaForCausalLM`` with Llama-3.1-8B's shape (random bf16 weights: speed only; the shape is
``benchmarks.shapes.LLAMA_31_8B``) and times one forward of a batch of ``--batch`` prompts (default 1) of one length
(``logits_to_keep=1``: only the last position's logits, as a generation's prefill), with CUDA events,
median over ``--reps`` after ``--warmup``. Two other inputs (:func:`prompt_inputs`), each row recording which:

- ``--batch N --pad left|right``: a padded batch, row r with ``T - r * T // (2N)`` real tokens (T down to about
  T/2), padded on that side, with the 2-D attention mask and the position_ids generate() would derive from it.
  ``sdpa`` gets the same input (transformers' SDPA with the [B, 1, T, T] padding mask it builds); seer packs the
  real tokens into one varlen call. With an arbitrary mask SDPA leaves its flash / cuDNN kernels, so a second
  baseline, ``sdpa-rows``, runs each row's real tokens alone (B 1, no mask: SDPA's fastest causal kernel), its time
  the sum over rows; seer rows record ``speedup_vs_rows`` against it;
- ``--packed N``: one row of N documents of T/N tokens with the collator's ``cu_seq_lens_q/k``
  (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``; no position_ids, so transformers builds no
  [T, T] mask). transformers' SDPA does not separate the documents from these kwargs, so the ``sdpa`` row runs
  the same documents as a batch of N unpadded rows (exactly the per-document attention, at its best speed).

- ``sdpa``: the unmodified model (PyTorch SDPA, its default backend choice);
- ``seer@d``: the same weights with fresh AttnGates (fp32, as adapters load) (:func:`seerattn.hf.apply_seer_attention`),
  mode ``sparse`` at density ``d`` — gate, policy, block-sparse kernel and the per-layer statistics,
  everything a user's prefill runs. Untrained gates pick arbitrary blocks; the time depends on how
  many blocks are kept, which the policy fixes, and on how much adjacent rows share, which random masks make
  least: ``--gate-init local`` (rows ``seer@d/local``, :func:`local_gate_init_`) sets the gates to score by
  distance, for banded masks like trained gates' local heads (the kernel tuner then sees structured masks);
- any other method of the eval registry (``--methods``, :mod:`seerattn.eval.methods`), run exactly as
  ``seerattn eval`` runs it (:func:`seerattn.eval.configure`): its mask estimation on the layer's q/k
  (e.g. XAttention's antidiagonal scores, FlexPrefill's pattern search), then the same kernel; density
  methods at each ``--densities`` value, native ``*_top_p`` methods at each ``--top-p`` value (their
  density is what their threshold gives on these random weights, recorded per row). Their masks are per
  query head, so ``--mask-heads`` applies to ``seer`` only.

Each ``seer`` row also has the per-part breakdown of one profiled forward (torch.profiler, the GPU
time of the device activities inside the ranges ``seer.gate``, ``seer.policy``, ``seer.attention``,
``seer.stats``; :func:`attribute_parts`): ``gate_ms``, ``policy_ms``, ``kernel_ms``, ``stats_ms``,
``rest_ms`` (all other GPU work), ``busy_ms`` (their sum; the timed ``ms`` minus it is GPU idle time) and
``overhead`` = (gate + policy) / kernel, and the limit: ``limit_ms`` = ``ms`` - gate - policy (the same forward
with a gate and policy that cost nothing: the dense model's other work plus the block-sparse kernel),
``limit_speedup`` (SDPA's time over it) and ``of_limit`` (``limit_ms / ms``: the share of the limit's speed-up
reached). A breakdown the profiler cannot give (a range that ran got no
time) is not reported: the row gets ``breakdown_error`` instead. ``--gate-impls triton,eager`` times
the fused gate and the selection kernel (``triton``, what ``auto`` picks on CUDA) against the PyTorch
gate and policies (``eager``, rows ``.../eager``): before and after in one run. Timed forwards skip the
density statistics (``SeerState.record_densities``); the profiled forward records the realised density.

``--attn-impls`` picks the block-sparse attention of the sparse rows (``SeerConfig.impl``): ``auto``
(``impl=None``: :func:`seerattn.ops.auto_impl`'s measured rule, e.g. FlashAttention-4 at block 128 where
it is installed), ``triton``, ``fa4``, ``flex``; non-auto rows are labelled ``.../<impl>``. Every row
records ``attn_impl``, the implementation that ran (:func:`seerattn.ops.resolve_impl` on the row's
block size, head dim and dtype). An impl that cannot run a row (FA4 not installed, a block size it does
not take) gives a row with its reason in ``error`` and no time, not a missing row.

The whole model is timed, so the ratio is what the paper calls time-to-first-token speedup (it
reports 1.3x at 32k / 70 % sparsity up to 2.7x at 128k / 95 %): MLPs and projections stay dense.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import itertools
import statistics
import time
import warnings

import torch

from benchmarks.shapes import LLAMA_31_8B, SMOKE_SHAPE, build_llama
from seerattn import SparsityPolicy
from seerattn.block_mask import ALLOCATIONS
from seerattn.eval.methods import Setting, configure, get_method
from seerattn.gate import AttnGate, GateConfig
from seerattn.hf import SeerConfig, apply_seer_attention, gate_modules, get_seer_state, remove_seer_attention
from seerattn.ops import AttentionCase, fa4, resolve_impl
from seerattn.record import write_record

GATES = {
    "paper": GateConfig(),
    "windows": GateConfig(q_pooling=("avg", "max", "min"), q_subblock=16),
}
GATE_INITS = ("fresh", "local")


def local_gate_init_(gate: AttnGate) -> None:
    """``--gate-init local``: the gate reads Q's and K's max-pooled channels through an identity (its other
    channels zero). On random weights a window's maximum is a near-constant positive vector, so the rotated gate
    vectors score by distance alone (RoPE's decay) and each row keeps its nearest blocks: banded masks whose
    adjacent rows share most blocks, like trained gates' local heads, where fresh gates (an identity on the avg
    channel) make random masks. Needs ``max`` in both poolings, a Q projection and Dg == D."""
    c = gate.config
    if gate.q_proj is None or "max" not in c.q_pooling or "max" not in c.k_pooling or gate.gate_dim != gate.head_dim:
        raise ValueError(
            "--gate-init local needs a gate with a Q projection, 'max' in q_pooling and k_pooling and Dg == D "
            f"(--gate windows); got q_pooling={c.q_pooling}, k_pooling={c.k_pooling}, Dg={gate.gate_dim}"
        )
    d = gate.head_dim
    with torch.no_grad():
        for w, pools in ((gate.k_proj, c.k_pooling), (gate.q_proj, c.q_pooling)):
            w.zero_()
            i = pools.index("max") * d
            w[:, i : i + d] = torch.eye(d)


def prompt_inputs(
    t: int, batch: int, pad: str, packed: int, vocab: int, device
) -> tuple[dict[str, torch.Tensor | int], dict[str, torch.Tensor], dict]:
    """(the seer rows' forward inputs, the sdpa row's, the fields every row records) for prompts of ``t`` tokens:
    ``batch`` unpadded rows, a padded batch (``pad`` 'left' / 'right') or ``packed`` documents in one row."""
    if packed:
        doc = t // packed
        ids = torch.randint(0, vocab, (1, doc * packed), device=device)
        cu = torch.arange(0, doc * packed + 1, doc, device=device, dtype=torch.int32)
        seer = {"input_ids": ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": doc, "max_length_k": doc}
        return seer, {"input_ids": ids.view(packed, doc)}, {"packed": packed, "doc_len": doc, "tokens": doc * packed}
    ids = torch.randint(0, vocab, (batch, t), device=device)
    if pad == "none":
        return {"input_ids": ids}, {"input_ids": ids}, {"tokens": batch * t}
    lengths = [t - r * t // (2 * batch) for r in range(batch)]
    mask = torch.zeros(batch, t, dtype=torch.long, device=device)
    for r, n in enumerate(lengths):
        (mask[r, t - n :] if pad == "left" else mask[r, :n]).fill_(1)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    return inputs, inputs, {"pad": pad, "lengths": lengths, "tokens": sum(lengths)}


def time_forward(model, inputs: dict, warmup: int, reps: int) -> float:
    """Median ms of ``model(**inputs)`` (no grad, no cache, last logits only): CUDA events on the GPU,
    perf_counter on the CPU (smoke runs)."""
    cuda = inputs["input_ids"].device.type == "cuda"
    times = []
    with torch.no_grad():
        for i in range(warmup + reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            if cuda:
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(ms)
    return statistics.median(times)


def sync_report(model, inputs: dict) -> dict[str, int]:
    """Where one forward synchronises the host with the GPU: ``{"file:line": count}`` from
    ``torch.cuda.set_sync_debug_mode("warn")`` (a sync per layer stalls the GPU once per layer)."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return dict(collections.Counter(where).most_common())


def profile_table(model, inputs: dict, rows: int) -> str:
    """The ``rows`` ops of one forward with the most GPU time (torch.profiler), to see what the
    sparse path spends beside the attention kernel (its parts are the ranges ``seer.gate``,
    ``seer.policy``, ``seer.attention`` and ``seer.stats``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


# torch.profiler range -> breakdown column (seerattn.hf.integration names the ranges)
PARTS = {
    "seer.gate": "gate_ms",
    "seer.policy": "policy_ms",
    "seer.attention": "kernel_ms",
    "seer.stats": "stats_ms",
}
GATE_IMPLS = ("auto", "triton", "eager")
ATTN_IMPLS = ("auto", "triton", "fa4", "flex")


def part_breakdown(model, inputs: dict) -> dict[str, float]:
    """Milliseconds per part of one profiled forward (:func:`attribute_parts`), and the forward's total."""

    def forward() -> None:
        with torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=1)

    return profile_parts(forward, inputs["input_ids"].device.type == "cuda")


def profile_parts(run, cuda: bool, parts_of: dict[str, str] = PARTS) -> dict[str, float]:
    """Milliseconds per part (:func:`attribute_parts`) of one call of ``run()`` under torch.profiler (CUDA
    activities too when ``cuda``; the device is synchronised before the wall time is read)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    return attribute_parts(prof.events(), cuda, wall_ms, parts_of)


def attribute_parts(events, cuda: bool, wall_ms: float, parts_of: dict[str, str] = PARTS) -> dict[str, float]:
    """Per-part milliseconds of one profiled forward from its ``torch.profiler`` events.

    ``parts_of``: profiler range name -> column (default :data:`PARTS`; benchmarks/train_step.py adds the
    training ranges).

    GPU: each device activity (kernel, memcpy, memset) belongs to the part whose device-side span of the
    same name (the profiler's ``gpu_user_annotation`` of a ``record_function`` range: first to last
    activity launched inside it) contains its start; ``rest_ms`` is every other device activity (the
    dense projections, MLPs, norms) and ``busy_ms`` the sum of all: the GPU time of the forward, idle
    gaps excluded. One stream (the model runs on the current stream). Not the CPU range's
    ``device_time_total``: the profiler links a kernel to the innermost *operator* running when it was
    launched, and the Triton kernels (pooling, scores, selection, block-sparse attention) are launched
    from Python with no operator around them, so they were counted in no range (H200, commit 908f727:
    ``kernel_ms`` 0.00, the attention kernel in ``rest``).

    CPU (smoke runs): host time of each range (``cpu_time_total``); ``busy_ms`` is the forward's wall time.
    """
    from torch.autograd import DeviceType

    parts = dict.fromkeys(parts_of.values(), 0.0)
    if not cuda:
        for evt in events:
            if evt.name in parts_of and evt.device_type == DeviceType.CPU and not evt.is_async:
                parts[parts_of[evt.name]] += evt.cpu_time_total / 1e3
        busy = wall_ms
    else:
        device = [e for e in events if e.device_type == DeviceType.CUDA]
        spans = sorted(
            (e.time_range.start, e.time_range.end, parts_of[e.name])
            for e in device
            if e.is_user_annotation and e.name in parts_of
        )
        starts = [s[0] for s in spans]
        busy = 0.0
        for e in device:
            if e.is_user_annotation:
                continue
            ms = (e.time_range.end - e.time_range.start) / 1e3
            busy += ms
            i = bisect.bisect_right(starts, e.time_range.start) - 1
            if i >= 0 and e.time_range.start < spans[i][1]:
                parts[spans[i][2]] += ms
    parts["rest_ms"] = busy - sum(parts.values())
    parts["busy_ms"] = busy
    ran = {parts_of[e.name] for e in events if e.name in parts_of and e.device_type == DeviceType.CPU}
    problems = [f"{col} is 0 although its range ran" for col in sorted(ran) if parts[col] <= 0]
    if parts["rest_ms"] < -1e-6 * max(busy, 1.0):
        problems.append(f"the parts ({busy - parts['rest_ms']:.3f} ms) exceed the total ({busy:.3f} ms)")
    if problems:
        raise BreakdownError("invalid per-part breakdown: " + "; ".join(problems))
    return parts


class BreakdownError(RuntimeError):
    """The profiler's events do not give a valid per-part breakdown (a part that ran got no time)."""


def _settings(args) -> list[tuple[Setting | None, float, str, int, str | None]]:
    """(setting, budget, mask heads, block size, gate impl) per timed configuration; setting None = the
    seer gate (gate impl None: the other methods have no gate)."""
    densities = [float(x) for x in args.densities.split(",")]
    top_ps = [float(x) for x in args.top_p.split(",") if x]
    block_sizes = [int(x) for x in args.block_sizes.split(",")]
    gate_impls = [x for x in args.gate_impls.split(",") if x]
    if not gate_impls or any(g not in GATE_IMPLS for g in gate_impls):
        raise ValueError(f"--gate-impls takes a comma list from {GATE_IMPLS}, got {args.gate_impls!r}")
    out = []
    for name in (m for m in args.methods.split(",") if m):
        if name == "seer":
            for gi, d, heads, bs in itertools.product(gate_impls, densities, args.mask_heads.split(","), block_sizes):
                out.append((None, d, heads, bs, None if gi == "auto" else gi))
            continue
        m = get_method(name)
        if m.mode != "custom":
            raise ValueError(f"--methods takes 'seer' and the registry's mask-function methods; {name!r} is {m.mode}")
        values = top_ps if m.budget == "top_p" else densities
        out += [
            (Setting(name, v, args.allocation), v, "q", bs, None) for v, bs in itertools.product(values, block_sizes)
        ]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", help="comma list of prompt lengths (8192,32768; smoke: 256)")
    p.add_argument("--methods", default="seer", help="comma list: seer and/or eval registry methods (%(default)s)")
    p.add_argument("--densities", default="0.1", help="comma list of densities (seer and density-budget methods)")
    p.add_argument("--top-p", default="0.9", help="comma list of thresholds of the native *_top_p methods")
    p.add_argument("--allocation", default="row", choices=ALLOCATIONS)
    p.add_argument(
        "--mask-heads",
        default="q",
        help="comma list from q (one mask per query head), kv (one per GQA group: 4x fewer rows to rank on Llama-8B)",
    )
    p.add_argument("--gate", default="windows", choices=sorted(GATES), help="gate architecture (%(default)s)")
    p.add_argument("--block-sizes", default="64", help="comma list of gate/mask block sizes (%(default)s)")
    p.add_argument(
        "--gate-init",
        default="fresh",
        choices=GATE_INITS,
        help="the seer rows' gates: fresh (AttnGate's init: random masks on random weights) or local (the max "
        "channels through an identity: banded masks, as trained gates' local heads make) (%(default)s)",
    )
    p.add_argument(
        "--gate-impls",
        default="auto",
        help="comma list from auto (triton on CUDA, eager on the CPU), triton (fused gate + selection kernel), "
        "eager (PyTorch gate and policies: the 'before'); seer rows only (%(default)s)",
    )
    p.add_argument(
        "--attn-impls",
        default="auto",
        help=f"comma list from {ATTN_IMPLS}: the block-sparse attention of the sparse rows; auto = impl=None "
        "(seerattn.ops.auto_impl's rule); each row records attn_impl, the one that ran (%(default)s)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="prompts per forward: all of the seq len, or with --pad a padded batch of lengths from the seq len "
        "down to about half of it (%(default)s)",
    )
    p.add_argument(
        "--pad",
        default="none",
        choices=("none", "left", "right"),
        help="pad the --batch rows on this side (row r keeps T - r * T // (2 * batch) tokens); sdpa and seer get "
        "the same padding mask (%(default)s)",
    )
    p.add_argument(
        "--packed",
        type=int,
        default=0,
        metavar="N",
        help="one row of N documents of seq len / N tokens (cu_seq_lens_q/k as DataCollatorWithFlattening hands "
        "them); the sdpa row runs the documents as a batch of N (0: off)",
    )
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the real depth)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sync-report", action="store_true", help="list where a sparse forward syncs with the host")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N GPU ops of each forward")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, one rep (checks that it runs)")
    p.add_argument("--json", help="write the run record here")
    args = p.parse_args(argv)
    if args.packed < 0 or (args.packed and (args.batch != 1 or args.pad != "none")):
        raise ValueError(
            "--packed N (N >= 1) puts N documents in one row, without --batch or --pad; got "
            f"--packed {args.packed} --batch {args.batch} --pad {args.pad}"
        )
    if args.pad != "none" and args.batch < 2:
        raise ValueError(f"--pad needs --batch >= 2 (row 0 keeps every token, the others fewer), got {args.batch}")
    settings = _settings(args)  # bad method names fail before the model is built
    if args.gate_init == "local":
        local_gate_init_(AttnGate(1, 1, 16, GATES[args.gate]))  # a gate it cannot set fails here too
    attn_impls = [x for x in args.attn_impls.split(",") if x]
    if not attn_impls or any(a not in ATTN_IMPLS for a in attn_impls):
        raise ValueError(f"--attn-impls takes a comma list from {ATTN_IMPLS}, got {args.attn_impls!r}")
    if args.smoke:
        device, shape = "cpu", {**LLAMA_31_8B, **SMOKE_SHAPE, "num_hidden_layers": min(args.layers, 2)}
        seqlens, dtype, args.warmup, args.reps = args.seqlens or "256", torch.float32, 0, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.prefill needs a CUDA GPU (or --smoke)")
        device, shape = "cuda", {**LLAMA_31_8B, "num_hidden_layers": args.layers}
        seqlens, dtype = args.seqlens or "8192,32768", torch.bfloat16
    cuda = device == "cuda"

    model = build_llama(shape, device, dtype).eval()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rows = []
    for t in (int(x) for x in seqlens.split(",")):
        inputs, sdpa_inputs, shape_fields = prompt_inputs(
            t, args.batch, args.pad, args.packed, config.vocab_size, device
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        dense_ms = time_forward(model, sdpa_inputs, args.warmup, args.reps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        rows.append(
            {"seq_len": t, "batch": args.batch, **shape_fields, "method": "sdpa", "ms": dense_ms, "speedup": 1.0,
             "density": 1.0, "peak_gib": peak}
        )  # fmt: skip
        print(f"T={t:>6} {'sdpa':<22} {dense_ms:9.2f} ms", flush=True)
        rows_ms = None
        if args.pad != "none":  # each row's real tokens alone, unpadded: the dense baseline without a mask
            real = sdpa_inputs["attention_mask"].bool()
            rows_ms = sum(
                time_forward(
                    model, {"input_ids": sdpa_inputs["input_ids"][r][real[r]].unsqueeze(0)}, args.warmup, args.reps
                )
                for r in range(real.shape[0])
            )
            rows.append({"seq_len": t, "batch": args.batch, **shape_fields, "method": "sdpa-rows", "ms": rows_ms,
                         "speedup": dense_ms / rows_ms, "density": 1.0})  # fmt: skip
            print(f"T={t:>6} {'sdpa-rows':<22} {rows_ms:9.2f} ms", flush=True)
        if args.profile and cuda:
            print(profile_table(model, sdpa_inputs, args.profile))
        for (setting, budget, heads, bs, gate_impl), attn in itertools.product(settings, attn_impls):
            gate = dataclasses.replace(GATES[args.gate], block_size=bs)
            impl = None if attn == "auto" else attn
            if setting is None:
                policy = SparsityPolicy("density", budget, allocation=args.allocation)
                cfg = SeerConfig(
                    gate=gate,
                    policy=policy,
                    mode="sparse",
                    mask_heads=heads,  # type: ignore[arg-type]
                    gate_impl=gate_impl,  # type: ignore[arg-type]
                    impl=impl,
                )
                label = f"seer@{budget:g}" + ("" if heads == "q" else f"/{heads}")
                label += "/local" if args.gate_init == "local" else ""
            else:
                cfg = SeerConfig(gate=gate, mode="custom", impl=impl)
                label = setting.label
            label += ("" if bs == 64 else f"/b{bs}") + ("/eager" if gate_impl == "eager" else "")
            label += "" if impl is None else f"/{impl}"
            case = AttentionCase(bs, head_dim, dtype)
            ran = resolve_impl(impl, torch.device(device), "block_sparse_attention", case=case)
            why = fa4.unsupported(torch.device(device), bs, head_dim, dtype) if ran == "fa4" else None
            if why is not None:  # an explicit fa4 that cannot run here: a row that says why
                rows.append({"seq_len": t, "batch": args.batch, **shape_fields, "method": label, "block_size": bs,
                             "budget": budget,
                             "ms": float("nan"),
                             "attn_impl": ran, "error": why})  # fmt: skip
                print(f"T={t:>6} {label:<22} not run: {why}", flush=True)
                continue
            apply_seer_attention(model, cfg)
            if setting is not None:
                configure(get_seer_state(model), setting)
            elif args.gate_init == "local":
                for gate_module in gate_modules(model).values():
                    local_gate_init_(gate_module)
            state = get_seer_state(model)
            state.record_densities = False  # timed forwards: no statistics
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ms = time_forward(model, inputs, args.warmup, args.reps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            state.record_densities = True  # the next forward records the realised density
            parts, breakdown_error = {}, None
            if setting is None:  # the profiled forward (statistics in their own part, stats_ms)
                try:
                    parts = part_breakdown(model, inputs)
                except BreakdownError as err:  # recorded in the row and printed: the timing stays valid
                    breakdown_error = str(err)
            else:
                with torch.no_grad():
                    model(**inputs, use_cache=False, logits_to_keep=1)
            realised = state.mean_density()
            if args.profile and cuda:
                print(profile_table(model, inputs, args.profile))
            if args.sync_report and cuda:
                for where, n in sync_report(model, inputs).items():
                    print(f"  host sync x{n}: {where}")
            remove_seer_attention(model)
            row = {"seq_len": t, "batch": args.batch, **shape_fields, "method": label, "block_size": bs,
                   "budget": budget, "ms": ms, "density": realised}  # fmt: skip
            row["peak_gib"] = peak
            row["attn_impl"] = ran
            # the kernel tuner's picks so far and the candidates' times (which tile this row ran, and how close)
            from seerattn.ops._triton import config as kcfg

            row["tuning"] = kcfg.tuning_log(timings=True)
            if setting is None:
                row["gate_impl"] = gate_impl
                row["gate_init"] = args.gate_init
            if parts:
                parts["overhead"] = (parts["gate_ms"] + parts["policy_ms"]) / parts["kernel_ms"]
                # the limit: this forward if the gate and policy cost nothing (the timed forwards skip statistics)
                parts["limit_ms"] = ms - parts["gate_ms"] - parts["policy_ms"]
                parts["limit_speedup"] = dense_ms / parts["limit_ms"]
                parts["of_limit"] = parts["limit_ms"] / ms
                row.update(parts)
            if breakdown_error:
                row["breakdown_error"] = breakdown_error
            rows.append(
                {**row, "speedup": dense_ms / ms, **({} if rows_ms is None else {"speedup_vs_rows": rows_ms / ms})}
            )
            line = f"T={t:>6} {label:<22} {ms:9.2f} ms  {dense_ms / ms:5.2f}x  density {realised:.3f}  {ran}"
            if rows_ms is not None:
                line += f"  {rows_ms / ms:.2f}x sdpa-rows"
            if parts:
                line += "  " + "  ".join(f"{k[:-3]} {parts[k]:.2f}" for k in (*PARTS.values(), "rest_ms", "busy_ms"))
                line += f"  (gate+policy)/kernel {parts['overhead']:.3f}"
                line += f"  limit {parts['limit_ms']:.2f} ms {parts['limit_speedup']:.2f}x"
                line += f" ({parts['of_limit']:.3f} of it)"
            if breakdown_error:
                line += f"  no breakdown: {breakdown_error}"
            print(line, flush=True)
        del inputs, sdpa_inputs
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        extra = {"gpu": torch.cuda.get_device_name()} if cuda else {}
        model_info = {"shape": {k: v for k, v in shape.items() if k != "rope_scaling"}, "dtype": str(dtype)}
        write_record(args.json, "bench-prefill", rows, {**vars(args), "device": device}, model_info, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
