"""``seerattn distill``: train the gates of a frozen model from a recipe (see ``recipes/``)."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)


def _run(args) -> int:
    from ..train import ConfigError, distill, load_recipe

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 alone reports progress
        logging.getLogger().setLevel(logging.WARNING)
    overrides = [item for group in args.set or [] for item in group]
    try:
        config = load_recipe(args.recipe, overrides)
        result = distill(config, resume=args.resume, stop_after=args.stop_after)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:  # user errors: one line, no traceback
        print(f"seerattn distill: error: {e}", file=sys.stderr)
        return 2
    if result.stopped_early:
        logger.info("stopped after step %d; resume with --resume", result.steps_done)
    else:
        logger.info(
            "done: %d steps; adapter %s; final %s",
            result.steps_done,
            result.adapter,
            {k: round(v, 5) for k, v in result.final.items() if isinstance(v, float)},
        )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="train AttnGates on a frozen model (recipe file + overrides)",
        description="Distil the AttnGates of a frozen causal LM from its own attention. Outputs (config, "
        "environment, metrics.jsonl, checkpoints, adapter/) go to the recipe's output_dir. Several GPUs: "
        "torchrun --nproc_per_node N -m seerattn distill RECIPE.",
    )
    p.add_argument("recipe", help="recipe file (.yaml/.yml/.toml); see recipes/ and seerattn.train.DistillConfig")
    p.add_argument(
        "--set",
        nargs="+",
        action="append",
        metavar="KEY=VALUE",
        help="override recipe fields, e.g. --set lr=3e-4 steps=50 gate.block_size=128",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in output_dir (a fresh start when there is none)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after this global step without saving, as if killed (for testing resume)",
    )
    p.set_defaults(func=_run)
