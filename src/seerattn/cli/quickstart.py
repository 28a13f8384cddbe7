"""``seerattn quickstart``: the whole method on one model in a few minutes, CPU or GPU.

Defaults to the committed testbed (``testbed/model``) and its distilled gates (``testbed/gates``):
sparse prefill on long held-out book windows (dense vs gate perplexity, realised density per
layer), a passkey prompt answered with dense and with sparse attention, and a PNG of the gate's
block map next to the true one. Any supported model with an adapter works the same way:
``seerattn quickstart --model PATH --gates ADAPTER --device cuda``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .eval import ALLOCATIONS, add_mask_heads_argument


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

    for name, path in (("--model", args.model), ("--gates", args.gates), ("--data", args.data)):
        if not Path(path).exists():
            raise SystemExit(
                f"seerattn quickstart: {name} {path} does not exist (run from the repository root, or pass {name})"
            )
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    em = load_eval_model(args.model, gates=args.gates, device=device, mask_heads=args.mask_heads)
    books = TokenizedBooks(args.data, tokenizer, split="test")
    settings = expand_settings(["dense", "seer"], densities=[args.density], allocations=[args.allocation])
    quiet = not args.progress
    ppl = evaluate_ppl(em, books, settings, [args.context], args.samples, progress=not quiet)
    passkey = evaluate_passkey(em, tokenizer, books, settings, [args.context], [0.25, 0.5, 0.75], 1, progress=not quiet)
    window = segment_windows(books, args.context, 1)[0]
    maps = block_maps(em, window, settings[1:], layers=None)
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
        "context": args.context,
        "windows": args.samples,
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
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nseerattn quickstart: {args.model} + gates {args.gates} on {device}, {args.context}-token windows")
    print(f"{'':28}{'dense':>10}{'seer gate':>12}")
    print(f"{'perplexity':28}{dense['ppl']:>10.3f}{sparse['ppl']:>12.3f}")
    print(f"{'passkey accuracy':28}{passkey[0]['mean_accuracy']:>10.2f}{passkey[1]['mean_accuracy']:>12.2f}")
    print(f"{'block density (realised)':28}{1.0:>10.3f}{sparse['density']:>12.3f}")
    per_layer = "  ".join(f"L{i}:{d:.2f}" for i, d in enumerate(sparse["density_per_layer"]))
    print(f"density per layer: {per_layer}")
    print(f"attention-mass recall of the kept blocks: {recall['mass_recall']:.3f}")
    print(f"wrote {png} and {out / 'quickstart.json'} ({summary['seconds']:.0f} s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="dense vs sparse prefill on the testbed (or your model): PPL, passkey, maps")
    p.add_argument("--model", default="testbed/model", help="model folder (%(default)s)")
    p.add_argument("--gates", default="testbed/gates", help="adapter folder (%(default)s)")
    p.add_argument("--data", default="../shared/data/books", help="books folder with MANIFEST.tsv (%(default)s)")
    p.add_argument("--context", type=int, default=4096, help="tokens per window (%(default)s)")
    p.add_argument("--samples", type=int, default=2, help="held-out windows (%(default)s)")
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
