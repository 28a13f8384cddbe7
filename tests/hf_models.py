"""Tiny Hugging Face causal LMs built in code (no hub downloads) for the integration tests.

Every family gets the same shape: hidden 64, 2 layers, Hq 4, Hkv 2 (GQA group 2), head dim 16,
vocab 128, no sliding window, fp32, eval mode. ``GATE`` uses 16-token blocks so that a prompt of
~100-150 tokens spans several blocks with a partial last one.

Also here: a test-only attention function (``"seer_test_masked"``) that applies recorded token
masks densely with materialised softmax, the reference the sparse path is compared against.
"""

from __future__ import annotations

import copy
import importlib
import json
import random
from pathlib import Path

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from seerattn.gate import GateConfig

FAMILY_NAMES = ("llama", "qwen2", "qwen3", "mistral")
HQ, HKV, HEAD_DIM, LAYERS, VOCAB = 4, 2, 16, 2, 128
GATE = GateConfig(block_size=16)

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def rope_kwargs(config_cls, params: dict) -> dict:
    """Config kwargs that set the RoPE type: ``rope_parameters`` (transformers >= 5) or ``rope_scaling``.

    transformers 5 renamed ``rope_scaling`` to ``rope_parameters`` (``rope_theta`` moved inside it);
    ``rope_scaling`` is still accepted there as an alias, but 4.x knows only ``rope_scaling``.
    """
    if "rope_parameters" in config_cls().to_dict():
        return {"rope_parameters": dict(params)}
    params = dict(params)
    theta = params.pop("rope_theta", None)
    out = {"rope_scaling": params}
    if theta is not None:
        out["rope_theta"] = theta
    return out


def make_config(family: str, rope: dict | None = None, **overrides):
    """A tiny config of ``family``; ``rope`` e.g. ``{"rope_type": "yarn", "factor": 4.0, ...}``."""
    cfg_cls = getattr(transformers, _CLASSES[family][0])
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        sliding_window=None,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    if family == "llama":
        kwargs.pop("sliding_window")
    if rope is not None:
        kwargs.update(rope_kwargs(cfg_cls, rope))
    kwargs.update(overrides)
    return cfg_cls(**kwargs)


def make_model(family: str, seed: int = 0, attn: str = "sdpa", rope: dict | None = None, **overrides):
    """A randomly initialised fp32 model in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    model_cls = getattr(transformers, _CLASSES[family][1])
    model = model_cls(make_config(family, rope=rope, **overrides))
    # HF init gives tiny weights (std 0.02): attention would be nearly uniform and every block mask
    # would look alike. Larger q/k weights make the attention peaked so masks matter.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0.0, 0.3)
    model.set_attn_implementation(attn)
    return model.eval()


def family_module(family: str):
    """The ``transformers.models.<family>.modeling_<family>`` module (for ``apply_rotary_pos_emb``)."""
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def input_ids(t: int, b: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


# ------------------------------------------------------------------ dense reference with token masks
MASKED_ATTN = "seer_test_masked"


def masked_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Materialised softmax attention with the token mask stored on ``module._test_token_mask``.

    query [B, Hq, T, D], key/value [B, Hkv, T, D]; the mask is bool [B, Hq or Hkv, T, T] (already causal).
    """
    keep = module._test_token_mask
    hq, hkv = query.shape[1], key.shape[1]
    g = hq // hkv
    if keep.shape[1] == hkv and g > 1:
        keep = keep.repeat_interleave(g, dim=1)
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = (query @ k.transpose(-1, -2)) * scale
    p = s.masked_fill(~keep, float("-inf")).softmax(-1)
    return (p @ v).transpose(1, 2).contiguous(), None


AttentionInterface.register(MASKED_ATTN, masked_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(MASKED_ATTN, sdpa_mask)


def masked_reference(model, token_masks: dict[int, torch.Tensor]):
    """A deep copy of an un-patched ``model`` whose layer ``i`` attends with ``token_masks[i]``."""
    ref = copy.deepcopy(model)
    for i, layer in enumerate(ref.model.layers):
        layer.self_attn._test_token_mask = token_masks[i]
    ref.set_attn_implementation(MASKED_ATTN)
    return ref


# ------------------------------------------------------------------ a saved tiny model + corpus for the trainers
WORDS = "alpha beta gamma delta river stone light dark north south king queen code key door blue".split()


def documents(n: int, seed: int) -> list[str]:
    """``n`` random word documents (40-300 words of :data:`WORDS`), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 300))) for _ in range(n)]


def make_tiny(root: Path) -> dict:
    """A saved tiny Llama + tokenizer and its corpus under ``root``: ``{"model": path, "data": path, "text": path,
    "root"}``; ``data`` is the corpus as JSONL (read through ``datasets``), ``text`` the same documents as one plain
    text file (no ``datasets`` needed: the GPU machine does not have it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = documents(60, seed=0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    # the shared tiny Llama (peaked attention), with this tokenizer's vocabulary and special tokens
    model = make_model(
        "llama",
        vocab_size=len(fast),
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model.save_pretrained(model_dir)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    text = root / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n")
    return {"model": str(model_dir), "data": str(data), "text": str(text), "root": root}
