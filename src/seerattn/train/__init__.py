"""Gate distillation: recipes, data packing, the trainer and its multi-process layout.

Typical use::

    from seerattn.train import load_recipe, distill

    config = load_recipe("recipes/testbed.yaml", ["steps=50", "lr=3e-4"])
    result = distill(config)            # result.adapter: the trained gates (seerattn.hf adapter)

or ``seerattn distill recipes/testbed.yaml --set steps=50`` (``torchrun ... -m seerattn distill``
for several GPUs). Imports transformers only when a run starts.
"""

from .config import ConfigError, DistillConfig, load_recipe, parse_overrides
from .distill import DistillResult, distill, lr_multiplier

__all__ = [
    "ConfigError",
    "DistillConfig",
    "DistillResult",
    "distill",
    "load_recipe",
    "lr_multiplier",
    "parse_overrides",
]
