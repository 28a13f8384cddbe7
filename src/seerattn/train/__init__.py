"""Training: gate distillation and long-context fine-tuning on one trainer skeleton.

Typical use::

    from seerattn.train import FinetuneConfig, distill, finetune, load_recipe

    config = load_recipe("recipes/testbed.yaml", ["steps=50", "lr=3e-4"])
    result = distill(config)            # result.adapter: the trained gates (seerattn.hf adapter)

    config = load_recipe("recipes/testbed-yarn-32k.yaml", kind=FinetuneConfig)
    result = finetune(config)           # result.model (save_pretrained folder), result.adapter

or ``seerattn distill|finetune RECIPE --set key=value`` (``torchrun ... -m seerattn ...`` for
several GPUs). Imports transformers only when a run starts.
"""

from .config import ConfigError, DistillConfig, FinetuneConfig, TrainConfig, load_recipe, parse_overrides
from .distill import distill
from .finetune import finetune
from .trainer import TrainResult, lr_multiplier

__all__ = [
    "ConfigError",
    "DistillConfig",
    "FinetuneConfig",
    "TrainConfig",
    "TrainResult",
    "distill",
    "finetune",
    "load_recipe",
    "lr_multiplier",
    "parse_overrides",
]
