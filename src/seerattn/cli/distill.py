"""``seerattn distill``: train the gates of a frozen model from a recipe (see ``recipes/``).

Also the recipe-command plumbing that ``seerattn finetune`` shares: the ``RECIPE --set ... --resume
--stop-after`` arguments and running a trainer from them.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)


def run_recipe(args, command: str, kind_name: str, train_name: str) -> int:
    """Load ``args.recipe`` + ``--set`` as ``seerattn.train.<kind_name>`` and run ``seerattn.train.<train_name>``."""
    from .. import train

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 alone reports progress
        logging.getLogger().setLevel(logging.WARNING)
    items = [item for group in args.set or [] for item in group]
    try:
        overrides = train.parse_overrides(items)
        if args.data is not None:
            if "data" in overrides:
                raise train.ConfigError("--data and --set data=... both set the training data; give one of them")
            overrides["data"] = list(args.data)  # paths as given: no YAML parsing of the user's file names
        config = train.load_recipe(args.recipe, overrides, kind=getattr(train, kind_name))
        result = getattr(train, train_name)(config, resume=args.resume, stop_after=args.stop_after)
    except (train.ConfigError, FileNotFoundError, FileExistsError) as e:  # user errors: one line, no traceback
        print(f"seerattn {command}: error: {e}", file=sys.stderr)
        return 2
    if result.stopped_early:
        logger.info("stopped after step %d; resume with --resume", result.steps_done)
    else:
        logger.info(
            "%s done: %d steps; outputs %s; final %s",
            command,
            result.steps_done,
            {k: str(v) for k, v in result.outputs.items()},
            {k: round(v, 5) for k, v in result.final.items() if isinstance(v, float)},
        )
    return 0


def add_recipe_arguments(p, config_class: str, example: str) -> None:
    """``RECIPE``, ``--set KEY=VALUE ...``, ``--resume`` and ``--stop-after`` of a training command."""
    p.add_argument("recipe", help=f"recipe file (.yaml/.yml/.toml); see recipes/ and seerattn.train.{config_class}")
    p.add_argument(
        "--set",
        nargs="+",
        action="append",
        metavar="KEY=VALUE",
        help=f"override recipe fields, e.g. --set {example}",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        default=None,
        help="training data instead of the recipe's: folders of .txt/.txt.gz (MANIFEST.tsv: its train split; none: "
        "every file), text files, or .jsonl/.parquet files or folders with a text column (the [data] extra)",
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


def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="train AttnGates on a frozen model (recipe file + overrides)",
        description="Distil the AttnGates of a frozen causal LM from its own attention. Outputs (config, "
        "environment, metrics.jsonl, checkpoints, adapter/, summary.json) go to the recipe's output_dir. Several "
        "GPUs: torchrun --nproc_per_node N -m seerattn distill RECIPE.",
    )
    add_recipe_arguments(p, "DistillConfig", "lr=3e-4 steps=50 gate.block_size=128")
    p.set_defaults(func=lambda args: run_recipe(args, "distill", "DistillConfig", "distill"))
