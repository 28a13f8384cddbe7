"""``seerattn eval ppl|passkey|masks|decode|curves``: the evaluation harness on a local model folder, and
the training curves of distillation runs.

Each run writes into ``--output``: ``<kind>.json`` (config, model, environment, results),
``<kind>.md`` (a markdown table) and PNG plots.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_METHODS = "dense,oracle,streaming,vertical_slash,random"
# For --help only (the parser is built without importing torch/transformers); the registry is
# seerattn.eval.methods.METHODS, and tests check that the two agree.
ALL_METHODS = (
    "dense, seer, seer_threshold, seer_top_p, oracle, mass_oracle, streaming, vertical_slash, xattention, "
    "xattention_top_p, flexprefill, flexprefill_top_p, random"
)
# Likewise seerattn.block_mask.ALLOCATIONS (checked by a test).
ALLOCATIONS = ("row", "uniform", "floor", "head")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _rope(args) -> str | None:
    return None if args.rope_scaling == "none" else args.rope_scaling


def _dtype(name: str):
    import torch

    table = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def add_mask_heads_argument(p) -> None:
    """``--mask-heads q|kv``: override the adapter's ``SeerConfig.mask_heads`` (eval and quickstart)."""
    p.add_argument(
        "--mask-heads",
        choices=["q", "kv"],
        help="gate and oracle masks per query head (q) or per GQA group (kv); default: the adapter's setting",
    )


# The repository's held-out sample (data/books-sample/README.md): a fresh clone runs without other downloads.
DEFAULT_DATA = "data/books-sample"
DATA_HELP = (
    "held-out text: a folder of .txt/.txt.gz files (with MANIFEST.tsv: its rows of split test, or of eval's "
    "--split; without: every file), one .txt/.txt.gz/.txt.xz file, or .jsonl/.parquet files or a folder of them "
    "with a text column (needs `pip install 'seerattn[data]'`) (%(default)s)"
)


def add_data_arguments(p) -> None:
    """``--data`` and ``--text-field`` (eval and quickstart), resolved by :func:`seerattn.data.resolve_data`."""
    p.add_argument("--data", default=DEFAULT_DATA, help=DATA_HELP)
    p.add_argument("--text-field", default="text", help="JSONL key / parquet column of the text (%(default)s)")


def _setup(args):
    """Load tokenizer, model (with gates) and books; expand the method settings."""
    import torch
    from transformers import AutoTokenizer

    from ..eval import TokenizedBooks, expand_settings, load_eval_model

    settings = expand_settings(args.methods, args.densities, args.thresholds, args.top_p, args.allocations)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    # the data before the model: a wrong --data fails in a second, not after loading weights
    books = TokenizedBooks(args.data, tokenizer, split=args.split, max_books=args.max_books, text_field=args.text_field)
    em = load_eval_model(
        args.model,
        gates=args.gates,
        device=device,
        dtype=_dtype(args.dtype),
        block_size=args.block_size,
        impl=args.impl,
        train_length=args.train_length,
        mask_heads=args.mask_heads,
    )
    torch.manual_seed(args.seed)
    return tokenizer, em, books, settings


def _model_meta(args, em, **extra) -> dict:
    """What every evaluation record says of its model (path, adapter, shape, training length, dtype, device),
    with ``extra`` fields after the training length."""
    cfg = em.model.config
    return {
        "path": str(args.model),
        "gates": em.gates,
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "train_length": em.train_length,
        **extra,
        "dtype": str(next(em.model.parameters()).dtype),
        "device": str(em.device),
    }


def _meta(args, em) -> tuple[dict, dict]:
    config = {k: v for k, v in vars(args).items() if k != "func"}
    return config, _model_meta(args, em, block_size=em.block_size, mask_heads=em.state.config.mask_heads)


def _write_outputs(args, em, kind: str, results: list, markdown: str, plot, t0: float) -> int:
    """``<kind>.json`` (with config, model and environment), ``<kind>.md`` and the plots (``plot(folder)``
    returns their paths)."""
    from ..eval.report import write_text
    from ..record import write_record

    out = Path(args.output)
    config, model = _meta(args, em)
    files = [
        write_record(out / f"{kind}.json", kind, results, config, model),
        write_text(out / f"{kind}.md", markdown),
        *plot(out),
    ]
    logger.info("eval %s done in %.1f s", kind, time.perf_counter() - t0)
    for f in files:
        print(f"wrote {f}")
    return 0


def _run_ppl(args) -> int:
    from ..eval import evaluate_ppl
    from ..eval.plots import plot_ppl_vs_density
    from ..eval.report import ppl_markdown

    t0 = time.perf_counter()
    _, em, books, settings = _setup(args)
    rows = evaluate_ppl(
        em,
        books,
        settings,
        args.contexts,
        args.samples,
        rope_scaling=_rope(args),
        seed=args.seed,
        add_bos=args.add_bos,
        tail=args.tail,
        allow_untrained_gates=args.allow_untrained_gates,
        progress=not args.no_progress,
        resamples=args.resamples,
    )
    title = Path(args.model).name
    plot = lambda out: [plot_ppl_vs_density(rows, out / "ppl_vs_density.png", title=title)]  # noqa: E731
    return _write_outputs(args, em, "ppl", rows, ppl_markdown(rows), plot, t0)


def _template(args, cls):
    """The passkey template with the command line's overrides (unset fields keep the defaults)."""
    given = {"intro": args.intro, "needle": args.needle, "question": args.question, "digits": args.digits}
    template = cls(**{k: v for k, v in given.items() if v is not None})
    if "{key}" not in template.needle:
        raise ValueError(f"--needle must contain {{key}}, got {template.needle!r}")
    return template


def _run_passkey(args) -> int:
    from ..eval import PasskeyTemplate, evaluate_passkey
    from ..eval.plots import plot_passkey_accuracy, plot_passkey_heatmaps
    from ..eval.report import passkey_markdown

    t0 = time.perf_counter()
    tokenizer, em, books, settings = _setup(args)
    rows = evaluate_passkey(
        em,
        tokenizer,
        books,
        settings,
        args.contexts,
        args.depths,
        args.samples,
        rope_scaling=_rope(args),
        seed=args.seed,
        template=_template(args, PasskeyTemplate),
        add_bos=not args.no_bos,
        scoring=args.scoring,
        allow_untrained_gates=args.allow_untrained_gates,
        progress=not args.no_progress,
    )
    title = Path(args.model).name

    def plot(out: Path) -> list[Path]:
        return [
            plot_passkey_heatmaps(rows, out / "passkey_heatmap.png", title=title),
            plot_passkey_accuracy(rows, out / "passkey_accuracy.png", title=title),
        ]

    return _write_outputs(args, em, "passkey", rows, passkey_markdown(rows), plot, t0)


def _run_masks(args) -> int:
    from ..eval import block_maps, segment_windows
    from ..eval.plots import plot_block_maps
    from ..eval.report import masks_markdown

    t0 = time.perf_counter()
    _, em, books, settings = _setup(args)
    n_layers = em.model.config.num_hidden_layers
    plot_layers = args.plot_layers if args.plot_layers is not None else sorted({0, n_layers // 2, n_layers - 1})
    windows = segment_windows(books, args.context, args.samples, add_bos=args.add_bos)
    result = block_maps(
        em,
        windows,
        settings,
        args.layers,
        rope_scaling=_rope(args),
        seed=args.seed,
        allow_untrained_gates=args.allow_untrained_gates,
        progress=not args.no_progress,
    )
    missing = sorted(set(plot_layers) - set(result["maps"]))
    if missing:
        raise ValueError(f"--plot-layers {missing} are not among the analysed --layers")
    gate_label = "gate" if em.gates else "gate (untrained)"
    heads = [(layer, h) for layer in plot_layers for h in args.heads]
    plot = lambda out: [plot_block_maps(result["maps"], heads, out / "block_maps.png", gate_label=gate_label)]  # noqa: E731
    return _write_outputs(args, em, "masks", result["rows"], masks_markdown(result["rows"]), plot, t0)


def _read_metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl`` (a ``seerattn distill`` output folder), checked for the plotted fields.
    A torn last line (a run killed while logging) is dropped with a warning."""
    from ..eval.plots import DISTILL_CURVE_FIELDS
    from ..record import read_jsonl

    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a `seerattn distill` output folder (it holds metrics.jsonl)")
    rows = read_jsonl(path)
    for i, r in enumerate(rows):  # checked here too, to name the file and line
        missing = [k for k in DISTILL_CURVE_FIELDS if k not in r]
        if missing:
            raise ValueError(f"{path} line {i + 1} lacks {missing}; each row needs {list(DISTILL_CURVE_FIELDS)}")
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


# seerattn.eval.decode.DECODE_METHODS (checked by a test)
DECODE_METHODS = "dense,seer,seer_shift,seer_bound,streaming,quest,oracle"


def _run_decode(args) -> int:
    """``seerattn eval decode``: teacher-forced decode PPL and passkey by generation at one token budget."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..eval import TokenizedBooks
    from ..eval.decode import evaluate_decode_passkey, evaluate_decode_ppl, prepare_decode_model
    from ..eval.passkey import PasskeyTemplate
    from ..eval.report import decode_markdown, write_text
    from ..record import write_record

    t0 = time.perf_counter()
    unknown = sorted(set(args.measure) - {"ppl", "passkey"})
    if unknown or not args.measure:
        raise ValueError(f"--measure takes ppl, passkey or both, got {','.join(args.measure)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    budget = args.budget if args.budget is not None else round(args.budget_fraction * args.context)
    tail = args.tail if args.tail is not None else args.context // 4
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    # the data before the model: a wrong --data fails in a second, not after loading weights
    books = TokenizedBooks(args.data, tokenizer, split=args.split, max_books=args.max_books, text_field=args.text_field)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=dtype, attn_implementation="sdpa").to(device)
    em = prepare_decode_model(model, args.gates, args.block_size, args.impl, args.train_length, name=str(args.model))
    torch.manual_seed(args.seed)
    common = dict(
        rope_scaling=_rope(args),
        seed=args.seed,
        allow_untrained_gates=args.allow_untrained_gates,
        progress=not args.no_progress,
    )
    ppl_rows, passkey_rows = [], []
    if "ppl" in args.measure:
        ppl_rows = evaluate_decode_ppl(
            em, books, args.methods, args.context, args.samples, budget, tail, add_bos=args.add_bos,
            resamples=args.resamples, **common,
        )  # fmt: skip
    if "passkey" in args.measure:
        passkey_rows = evaluate_decode_passkey(
            em, tokenizer, books, args.methods, args.context, args.depths, args.passkey_samples, budget,
            template=_template(args, PasskeyTemplate), add_bos=not args.no_bos,
            needle_recall=not args.no_needle_recall, **common,
        )  # fmt: skip
    out = Path(args.output)
    meta = _model_meta(args, em, decode_gate=em.state.config.decode.gate.to_dict())
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"budget": budget, "tail": tail}
    results = {"ppl": ppl_rows, "passkey": passkey_rows}
    files = [
        write_record(out / "decode.json", "decode", results, config, meta),
        write_text(out / "decode.md", decode_markdown(ppl_rows, passkey_rows)),
    ]
    logger.info("eval decode done in %.1f s", time.perf_counter() - t0)
    for f in files:
        print(f"wrote {f}")
    return 0


def _run_curves(args) -> int:
    from ..eval.plots import plot_distill_curves

    runs = [Path(r) for r in args.runs]
    labels = args.labels or [r.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"--labels gives {len(labels)} names for {len(runs)} runs")
    curves = {label: _read_metrics(run) for label, run in zip(labels, runs, strict=True)}
    out = Path(args.output) if args.output else runs[0] / "loss_curve.png"
    print(f"wrote {plot_distill_curves(curves, out, title=args.title)}")
    for label, rows in curves.items():
        last = rows[-1]
        print(
            f"{label}: {last['step']} steps, KL {rows[0]['kl']:.3f} -> {last['kl']:.3f}, "
            f"mass recall {last['mass_recall']:.3f}"
        )
    return 0


def _model_and_data(p: argparse.ArgumentParser, gates_help: str) -> None:
    """The model, adapter and held-out data arguments of every evaluation that loads a model."""
    p.add_argument("--model", required=True, help="local model folder (AutoModelForCausalLM.from_pretrained)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    p.add_argument("--gates", help=gates_help)
    add_data_arguments(p)
    p.add_argument("--split", default="test", help="MANIFEST.tsv split to evaluate on (%(default)s)")
    p.add_argument("--max-books", type=int, help="use only the first N books of the split")


def _runtime(
    p: argparse.ArgumentParser, impls: list[str], block_help: str, seed_help: str, untrained_help: str
) -> None:
    """Device, dtype, kernels, RoPE and the remaining run arguments of every evaluation that loads a model."""
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype; auto = fp32 on CPU, bf16 on CUDA (%(default)s)",
    )
    p.add_argument("--impl", choices=impls, help="op implementation (default: automatic)")
    p.add_argument("--block-size", type=int, default=64, help=block_help)
    p.add_argument("--train-length", type=int, help="training context (default: config.max_position_embeddings)")
    p.add_argument(
        "--rope-scaling",
        default="yarn",
        choices=["yarn", "dynamic", "linear", "none"],
        help="RoPE scaling beyond the training length (%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--allow-untrained-gates", action="store_true", help=untrained_help)
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 is fastest for tiny models on busy machines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _common(p: argparse.ArgumentParser, contexts: str | None, samples: int) -> None:
    _model_and_data(p, "seerattn adapter folder with trained AttnGates (needed by seer* methods)")
    p.add_argument(
        "--methods",
        type=_names,
        default=_names(DEFAULT_METHODS),
        help=f"comma-separated, from {ALL_METHODS} (default {DEFAULT_METHODS})",
    )
    p.add_argument("--densities", type=_floats, default=[0.5, 0.2, 0.1], help="density budgets (0.5,0.2,0.1)")
    p.add_argument(
        "--allocations",
        type=_names,
        default=["row"],
        help=f"how a density spreads over rows, comma-separated from {','.join(ALLOCATIONS)} (row); "
        "see seerattn.SparsityPolicy",
    )
    p.add_argument("--thresholds", type=_floats, default=[], help="gate thresholds for seer_threshold")
    p.add_argument(
        "--top-p",
        type=_floats,
        default=[],
        help="cumulative-mass values for seer_top_p and the peers' native modes (xattention_top_p: XAttention's "
        "threshold, paper 0.9; flexprefill_top_p: FlexPrefill's gamma, paper 0.9-0.95)",
    )
    if contexts:
        p.add_argument("--contexts", type=_ints, default=_ints(contexts), help=f"context lengths ({contexts})")
    p.add_argument("--samples", type=int, default=samples, help="windows per context / prompts per cell (%(default)s)")
    p.add_argument("--output", "-o", required=True, help="output folder for JSON, markdown and PNGs")
    _runtime(
        p,
        ["reference", "triton", "flex"],
        "block size when no --gates are given (%(default)s)",
        "seed of the random method and of passkey keys",
        "run seer* methods without --gates (measures the untrained, identity-initialised gate)",
    )
    add_mask_heads_argument(p)


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, passkey retrieval and block-mask quality per sparsity method")
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    pp = esub.add_parser("ppl", help="perplexity on held-out books at several contexts, with realised density")
    _common(pp, "2048,4096,8192,16384", 8)
    pp.add_argument("--add-bos", action="store_true", help="start each window with the BOS token")
    pp.add_argument(
        "--tail", type=int, help="last tokens of each window scored for ppl_tail (default: min(contexts) / 4)"
    )
    pp.add_argument(
        "--resamples",
        type=int,
        default=2000,  # seerattn.eval.stats.BOOTSTRAP_RESAMPLES (the parser imports no torch; a test checks)
        help="bootstrap resamples of the 95 %% intervals of each method's PPL difference from dense, paired over "
        "the windows and seeded with --seed (%(default)s)",
    )
    pp.set_defaults(func=_run_ppl)

    pk = esub.add_parser("passkey", help="passkey retrieval accuracy on a grid of contexts x needle depths")
    _common(pk, "2048,4096,8192", 5)
    pk.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    pk.add_argument("--digits", type=int, default=5, help="digits of the pass key (%(default)s)")
    pk.add_argument("--intro", help="text before the filler ('' for none; default: the classic pass-key intro)")
    pk.add_argument(
        "--needle",
        help="needle text with {key} (default: ' The pass key is {key}. Remember it. {key} is the pass key.')",
    )
    pk.add_argument("--question", help="text after the filler (default: ' What is the pass key? The pass key is')")
    pk.add_argument("--no-bos", action="store_true", help="do not start prompts with the BOS token")
    pk.add_argument(
        "--scoring",
        choices=["forced", "generate"],
        default="forced",
        help="forced: the answer is predicted in the same forward through the method (default); generate: "
        "method prefill then dense greedy decoding",
    )
    pk.set_defaults(func=_run_passkey)

    pm = esub.add_parser("masks", help="gate vs ground-truth block maps, every method's mask and attention-mass recall")
    _common(pm, None, 1)
    pm.add_argument("--context", type=int, default=4096, help="window length (%(default)s)")
    pm.add_argument("--layers", type=_ints, help="layers whose recalls are measured (default: all)")
    pm.add_argument("--plot-layers", type=_ints, help="layers drawn in block_maps.png (default: first, middle, last)")
    pm.add_argument("--heads", type=_ints, default=[0, 1], help="query heads to draw per layer (0,1)")
    pm.add_argument("--add-bos", action="store_true", help="start the window with the BOS token")
    pm.set_defaults(func=_run_masks)

    pd = esub.add_parser(
        "decode",
        help="sparse decode at one token budget: decode PPL of the last tokens of windows (teacher-forced) and "
        "passkey by generation, for dense / seer (decode gates) / streaming / quest / oracle (true attention: an "
        "upper bound)",
    )
    _model_and_data(pd, "seerattn adapter folder with a decode section (needed by the seer method)")
    pd.add_argument(
        "--methods", type=_names, default=_names(DECODE_METHODS), help=f"comma-separated (default {DECODE_METHODS})"
    )
    pd.add_argument(
        "--measure", type=_names, default=["ppl", "passkey"], help="what to measure: ppl, passkey or both (both)"
    )
    pd.add_argument("--context", type=int, default=8192, help="window / prompt length in tokens (%(default)s)")
    pd.add_argument(
        "--budget-fraction",
        type=float,
        default=0.125,
        help="token budget of a decode step as a fraction of --context (%(default)s)",
    )
    pd.add_argument("--budget", type=int, help="token budget of a decode step (overrides --budget-fraction)")
    pd.add_argument("--samples", type=int, default=8, help="PPL windows (%(default)s)")
    pd.add_argument("--tail", type=int, help="last tokens of each window that decode (default: --context / 4)")
    pd.add_argument("--add-bos", action="store_true", help="start each PPL window with the BOS token")
    pd.add_argument(
        "--resamples",
        type=int,
        default=2000,
        help="bootstrap resamples of the 95 %% intervals against dense, paired over windows (%(default)s)",
    )
    pd.add_argument("--passkey-samples", type=int, default=10, help="passkey prompts per depth (%(default)s)")
    pd.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    pd.add_argument("--digits", type=int, default=5, help="digits of the pass key (%(default)s)")
    pd.add_argument("--intro", help="text before the filler (default: the classic pass-key intro)")
    pd.add_argument("--needle", help="needle text with {key} (default: the classic needle)")
    pd.add_argument("--question", help="text after the filler (default: ' What is the pass key? The pass key is')")
    pd.add_argument("--no-bos", action="store_true", help="do not start passkey prompts with the BOS token")
    pd.add_argument(
        "--no-needle-recall",
        action="store_true",
        help="do not record which decode steps kept the blocks holding the pass key (recorded by default for the "
        "sparse methods; needs a fast tokenizer)",
    )
    pd.add_argument("--output", "-o", required=True, help="output folder for decode.json and decode.md")
    _runtime(
        pd,
        ["reference", "triton"],
        "decode block size without --gates (%(default)s)",
        "seed of the passkey keys",
        "run the seer method without --gates (untrained prior)",
    )
    pd.set_defaults(func=_run_decode)

    pc = esub.add_parser("curves", help="KL and mass-recall curves of distillation runs (from metrics.jsonl)")
    pc.add_argument("runs", nargs="+", help="`seerattn distill` output folders")
    pc.add_argument("--labels", type=_names, help="comma-separated legend names (default: folder names)")
    pc.add_argument("--title", default="", help="figure title")
    pc.add_argument("--output", "-o", help="PNG path (default: RUN/loss_curve.png of the first run)")
    pc.set_defaults(func=_run_curves)
