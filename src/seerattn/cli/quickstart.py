"""``seerattn quickstart``: the whole method on one model in a few minutes, CPU or GPU.

Defaults to the committed testbed (``testbed/model``) and its distilled gates (``testbed/gates``):
sparse prefill on long held-out book windows (dense vs gate perplexity, realised density per
layer), a passkey prompt answered with dense and with sparse attention, and a PNG of the gate's
block map next to the true one. Any supported model with an adapter works the same way:
``seerattn quickstart --model PATH --gates ADAPTER --device cuda``. The held-out text is the repository's
``data/books-sample`` unless ``--data`` names other text (:func:`seerattn.data.resolve_data`); ``--fast``
runs the same at 512 tokens in seconds. Before any work it prints what it will run and an estimate of
how long that takes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .eval import ALLOCATIONS, add_data_arguments, add_mask_heads_argument

# Passkey needle depths (one prompt each) and the --fast window: a run of seconds on a CPU.
DEPTHS = (0.25, 0.5, 0.75)
FAST_CONTEXT = 512
SMOKE_BELOW = 4096  # windows shorter than the default run's: printed as a smoke check
# CPU cost model of the estimate printed before a run: stage -> (wall seconds per unit at a 4096-token window
# on two free cores, growth exponent with the window length). Units: ppl = one window through dense and
# sparse, passkey = one prompt through both, maps = the one analysed window. Scale: `stage_seconds` of
# `seerattn quickstart` on the idle 2-core development CPU (torch 2.13, 2 threads, fp32 reference ops): 0.4 /
# 33.4 / 43.4 / 15.6 s, 97 s for the whole command. Exponents: `stage_cpu_seconds` (steadier than wall time on
# a shared machine) of the default run against `seerattn quickstart --fast` (512 tokens, 1 window), mean of
# two pairs. The same command took 150-180 s with the machine's load at 3-5, and 390-500 s at 10.
_CPU_STAGES = {"ppl": (16.7, 1.0), "passkey": (14.5, 0.97), "maps": (15.6, 1.23)}
_CPU_LOAD_S = 0.4  # tokenizer, data, model and gates (the imports before the estimate is printed excluded)


def estimate_seconds(context: int, samples: int, device: str) -> float | None:
    """Seconds a CPU run at ``context`` tokens with ``samples`` windows is expected to take (None off CPU)."""
    if device != "cpu":
        return None
    units = {"ppl": samples, "passkey": len(DEPTHS), "maps": 1}
    return _CPU_LOAD_S + sum(n * _CPU_STAGES[k][0] * (context / 4096) ** _CPU_STAGES[k][1] for k, n in units.items())


def _plan(context: int, samples: int, device: str) -> str:
    """The line printed before a run: what it computes and how long that should take."""
    work = (
        f"{samples} window(s) and {len(DEPTHS)} passkey prompts of {context} tokens, each dense and sparse, "
        f"and 1 block map on {device}"
    )
    est = estimate_seconds(context, samples, device)
    if est is None:
        return f"seerattn quickstart: {work}: seconds after loading on a recent GPU (an H200 took 3 s at 8192 tokens)"
    took = f"{est:.0f} s" if est < 100 else f"{est / 60:.1f} min"
    return f"seerattn quickstart: {work}: about {took} on 2 free CPU cores (longer on a busy machine)"


def _run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from ..eval import (
        TokenizedBooks,
        block_maps,
        evaluate_passkey,
        evaluate_ppl,
        expand_settings,
        load_eval_model,
        segment_windows,
    )
    from ..eval.plots import plot_block_maps

    for name, path in (("--model", args.model), ("--gates", args.gates)):
        if not Path(path).exists():
            raise SystemExit(
                f"seerattn quickstart: {name} {path} does not exist (run from the repository root, or pass {name})"
            )
    context = args.context if args.context is not None else (FAST_CONTEXT if args.fast else 4096)
    samples = args.samples if args.samples is not None else (1 if args.fast else 2)
    t0, c0 = time.perf_counter(), time.process_time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(_plan(context, samples, torch.device(device).type), flush=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # the data before the model: a wrong --data fails at once
    books = TokenizedBooks(args.data, tokenizer, split="test", text_field=args.text_field)
    em = load_eval_model(args.model, gates=args.gates, device=device, mask_heads=args.mask_heads)
    stages = {"load": time.perf_counter() - t0}
    cpu = {"load": time.process_time() - c0}
    settings = expand_settings(["dense", "seer"], densities=[args.density], allocations=[args.allocation])
    quiet = not args.progress

    def timed(stage: str, fn, *a, **k):
        t, c = time.perf_counter(), time.process_time()
        result = fn(*a, **k)
        stages[stage], cpu[stage] = time.perf_counter() - t, time.process_time() - c
        return result

    ppl = timed("ppl", evaluate_ppl, em, books, settings, [context], samples, progress=not quiet)
    passkey = timed(
        "passkey", evaluate_passkey, em, tokenizer, books, settings, [context], list(DEPTHS), 1, progress=not quiet
    )
    window = segment_windows(books, context, 1)[0]
    maps = timed("maps", block_maps, em, window, settings[1:], layers=None)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    n_layers = em.model.config.num_hidden_layers
    png = plot_block_maps(
        maps["maps"], [(layer, 0) for layer in (0, n_layers // 2, n_layers - 1)], out / "gate_vs_truth.png"
    )

    dense, sparse = ppl
    recall = next(r for r in maps["rows"] if r["layer"] == "mean" and r["label"] == settings[1].label)
    summary = {
        "model": args.model,
        "gates": args.gates,
        "device": device,
        "data": args.data,
        "context": context,
        "windows": samples,
        "density_target": args.density,
        "allocation": args.allocation,
        "mask_heads": em.state.config.mask_heads,
        "ppl_dense": dense["ppl"],
        "ppl_sparse": sparse["ppl"],
        "density_realised": sparse["density"],
        "density_per_layer": sparse["density_per_layer"],
        "passkey_dense": passkey[0]["mean_accuracy"],
        "passkey_sparse": passkey[1]["mean_accuracy"],
        "mass_recall": recall["mass_recall"],
        "seconds": time.perf_counter() - t0,
        "stage_seconds": stages,
        "stage_cpu_seconds": cpu,  # all threads of the process: what the estimate before a run is fitted to
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nseerattn quickstart: {args.model} + gates {args.gates} on {device}, {context}-token windows")
    print(f"{'':28}{'dense':>10}{'seer gate':>12}")
    print(f"{'perplexity':28}{dense['ppl']:>10.3f}{sparse['ppl']:>12.3f}")
    print(f"{'passkey accuracy':28}{passkey[0]['mean_accuracy']:>10.2f}{passkey[1]['mean_accuracy']:>12.2f}")
    print(f"{'block density (realised)':28}{1.0:>10.3f}{sparse['density']:>12.3f}")
    per_layer = "  ".join(f"L{i}:{d:.2f}" for i, d in enumerate(sparse["density_per_layer"]))
    print(f"density per layer: {per_layer}")
    print(f"attention-mass recall of the kept blocks: {recall['mass_recall']:.3f}")
    if context < SMOKE_BELOW:
        # Seen on the testbed (3 prompts at 512 tokens): sparse passkey 0/3 at realised density 0.42, PPL +32 %;
        # 4096-token windows are the quickstart's quality setting.
        blocks = context // em.block_size
        forced = (2 * blocks - 1) / (blocks * (blocks + 1) / 2)  # sink + diagonal blocks of the causal ones
        print(
            f"note: {context}-token windows hold {blocks} blocks, and the sink and diagonal blocks (always kept) are "
            f"{forced:.0%} of the causal ones: a smoke check that everything runs, not the method's quality (run "
            f"without --fast for {SMOKE_BELOW}-token windows)"
        )
    took = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    print(f"wrote {png} and {out / 'quickstart.json'} ({summary['seconds']:.0f} s: {took})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="dense vs sparse prefill on the testbed (or your model): PPL, passkey, maps")
    p.add_argument("--model", default="testbed/model", help="model folder (%(default)s)")
    p.add_argument("--gates", default="testbed/gates", help="adapter folder (%(default)s)")
    add_data_arguments(p)
    p.add_argument("--context", type=int, help=f"tokens per window (4096; --fast: {FAST_CONTEXT})")
    p.add_argument("--samples", type=int, help="held-out windows (2; --fast: 1)")
    p.add_argument(
        "--fast",
        action="store_true",
        help=f"the short form: {FAST_CONTEXT}-token windows, 1 window (seconds on a CPU; --context/--samples win)",
    )
    p.add_argument("--density", type=float, default=0.2, help="fraction of causal blocks kept (%(default)s)")
    p.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default="row",
        help="how the density is spread over rows (%(default)s; see seerattn.SparsityPolicy)",
    )
    add_mask_heads_argument(p)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--output", "-o", default="quickstart-out", help="output folder (%(default)s)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=_run)
