"""Evaluation harness: perplexity, passkey retrieval and block-mask quality for every sparsity method.

Orchestration only (above :mod:`seerattn.hf`; never imports Triton). The pieces:

- :mod:`.methods`: the one registry of methods (dense, seer gate, oracle, streaming, vertical-slash,
  random) run on the same block-sparse path at one density budget;
- :mod:`.data`: held-out books from a folder with ``MANIFEST.tsv``, tokenised lazily;
- :mod:`.model`: loading a model with seer attention attached, RoPE scaling beyond training length;
- :mod:`.ppl`, :mod:`.passkey`, :mod:`.masks`: the evaluations;
- :mod:`.decode`: sparse decode (decode gate, StreamingLLM- and Quest-style) at one token budget;
- :mod:`.stats`: 95 % intervals (paired bootstrap for PPL differences from dense, Wilson for accuracies);
- :mod:`.plots`, :mod:`.report`: PNGs, JSON and markdown tables.

``seerattn eval ppl|passkey|masks|decode`` (:mod:`seerattn.cli.eval`) wires them together.
"""

from .data import TokenizedBooks, read_manifest, segment_windows
from .masks import block_maps, mass_recall
from .methods import METHODS, Method, Setting, build_mask, configure, expand_settings, get_method, register_method
from .model import EvalModel, load_eval_model, prepare_eval_model, scaled_rope, token_nll
from .passkey import PasskeyTemplate, evaluate_passkey, make_passkey_prompt
from .ppl import evaluate_ppl

__all__ = [
    "METHODS",
    "EvalModel",
    "Method",
    "PasskeyTemplate",
    "Setting",
    "TokenizedBooks",
    "block_maps",
    "build_mask",
    "configure",
    "evaluate_passkey",
    "evaluate_ppl",
    "expand_settings",
    "get_method",
    "load_eval_model",
    "make_passkey_prompt",
    "mass_recall",
    "prepare_eval_model",
    "read_manifest",
    "register_method",
    "scaled_rope",
    "segment_windows",
    "token_nll",
]
