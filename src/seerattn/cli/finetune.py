"""``seerattn finetune``: long-context fine-tuning of a model and its gates from a recipe (see ``recipes/``)."""

from __future__ import annotations

from .distill import add_recipe_arguments, run_recipe


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model with YaRN and block-sparse attention, jointly with its gates (recipe + overrides)",
        description="Extend a causal LM's context (RoPE scaling such as YaRN in its config) and fine-tune it through "
        "block-sparse attention with its AttnGates (or densely: attention=dense). Outputs (config, environment, "
        "metrics.jsonl, checkpoints, model/ via save_pretrained, adapter/ with the gates, summary.json) go to the "
        "recipe's output_dir; then `seerattn eval ppl --model OUT/model --gates OUT/adapter`. Several GPUs: "
        "torchrun --nproc_per_node N -m seerattn finetune RECIPE --set parallel=fsdp.",
    )
    add_recipe_arguments(p, "FinetuneConfig", "policy.value=0.5 attention=dense init_gates=null steps=50")
    p.set_defaults(func=lambda args: run_recipe(args, "finetune", "FinetuneConfig", "finetune"))
