"""The committed testbed model (testbed/model) loads with plain transformers on CPU and behaves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

MODEL = Path(__file__).resolve().parents[1] / "testbed" / "model"

transformers = pytest.importorskip("transformers")

GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    m.eval()
    return m


def test_checkpoint_files_are_small():
    shards = sorted(MODEL.glob("*.safetensors"))
    assert shards, "no safetensors shards in testbed/model"
    sizes = [f.stat().st_size for f in shards]
    assert max(sizes) < 15_000_000, sizes
    assert sum(sizes) <= 40_000_000, sum(sizes)


def test_config_is_llama_gqa_8k():
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_attention_heads"] > cfg["num_key_value_heads"] > 0  # GQA
    assert cfg["max_position_embeddings"] >= 8192
    assert cfg["tie_word_embeddings"] is True


def test_tokenizer_round_trip(tok):
    text = "Chapter I.\n\n  “Émile,” said Mme. Dupont—in 1847—“it costs 12.50 francs!”\tÇa va? 日本\n"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # digits are one token each, so a 5-digit pass key is 5 tokens
    digits = tok(" 71432", add_special_tokens=False).input_ids
    assert len(digits) == 6 and tok.decode(digits) == " 71432"
    assert len(tok) == 14336


def test_model_loads_and_predicts_text(model, tok):
    assert model.config.vocab_size == len(tok)
    text = (
        "It was a bright cold day in April, and the clocks were striking thirteen. He walked slowly "
        "along the street, thinking of the letter he had received that morning from his mother, who "
        "lived in the country and wrote to him every week."
    )
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # a uniform guess is ln(14336) = 9.57; the trained model must do far better on plain English
    assert loss < 4.5, loss


def test_model_retrieves_a_pass_key(model, tok):
    """Pass key in ~1.5k tokens of repetitive filler, at three depths: greedy answer must be exact."""
    n_ok = 0
    for depth, key in ((0.1, "53817"), (0.5, "20946"), (0.9, "68153")):
        n = 70  # ~21 tokens per filler sentence group
        before, after = " ".join([GRASS] * round(n * depth)), " ".join([GRASS] * round(n * (1 - depth)))
        prompt = (
            f"{INTRO} {before} The pass key is {key}. Remember it. {key} is the pass key. {after} "
            "What is the pass key? The pass key is"
        )
        ids = torch.tensor([tok(prompt).input_ids])
        assert ids.shape[1] > 1400
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        n_ok += tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().startswith(key)
    assert n_ok == 3


def test_distill_corpus_recipe():
    """testbed/data.py distill_documents: book pieces, pass-key prompts and fact pieces as documented."""
    import re
    import sys

    import numpy as np

    sys.path.insert(0, str(MODEL.parent))
    import data as tb_data  # testbed/data.py

    rng = np.random.default_rng(0)
    words = np.array("the old ship sailed over a grey sea while we slept and dreamt of home".split())
    books = [" ".join(rng.choice(words, size=20_000)) for _ in range(4)]
    docs = tb_data.distill_documents(books, np.random.default_rng(1), n_books=3, chars=(3000, 6000))
    assert len(docs) > 20
    kinds = {"passkey": 0, "facts": 0, "plain": 0}
    for d in docs:
        if d.startswith(tb_data.PASSKEY_INTRO):
            kinds["passkey"] += 1
            key = re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", d).group(1)
            assert d.endswith(f"{tb_data.PASSKEY_QUESTION} {key}.") and d.count(key) == 3
        elif "The code of " in d:
            kinds["facts"] += 1
            stated = re.findall(r"The code of (\w+) is (\d{4})\.", d)
            k = len(stated) // 2
            assert 2 <= k <= 6 and len(stated) == 2 * k  # each fact once in the text, once restated at the end
            assert sorted(stated[:k]) == sorted(stated[k:]) and d.endswith(".")
        else:
            kinds["plain"] += 1
            assert 1500 <= len(d) <= 6000 and "pass key" not in d
    assert all(kinds.values()), kinds
    again = tb_data.distill_documents(books, np.random.default_rng(1), n_books=3, chars=(3000, 6000))
    assert again == docs  # seeded
    with pytest.raises(ValueError, match="sum <= 1"):
        tb_data.distill_documents(books, np.random.default_rng(1), p_passkey=0.7, p_facts=0.5)
    with pytest.raises(ValueError, match="chars"):
        tb_data.distill_documents(books, np.random.default_rng(1), chars=(6000, 3000))


@pytest.mark.parametrize("folder, block", [("gates", 64), ("gates-b32", 32)])
def test_committed_gates_run_sparse_prefill(model, tok, folder, block):
    """Both committed adapters load onto the testbed with their block size, and a sparse prefill at 10 %
    keeps exactly the row budget's blocks in every layer (quality is measured by `seerattn eval`)."""
    import copy

    from seerattn import SparsityPolicy
    from seerattn.block_mask import density_row_budget
    from seerattn.hf import from_pretrained, get_seer_state

    sparse = from_pretrained(copy.deepcopy(model), MODEL.parent / folder, mode="sparse", policy=SparsityPolicy())
    state = get_seer_state(sparse)
    assert state.config.gate.block_size == block and state.config.policy == SparsityPolicy("density", 0.1)
    before = " ".join([GRASS] * 35)
    prompt = f"{INTRO} {before} The pass key is 20946. Remember it. 20946 is the pass key. {before}"
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        dense_loss = model(input_ids=ids, labels=ids).loss.item()
        sparse_loss = sparse(input_ids=ids, labels=ids).loss.item()
    nq = -(-ids.shape[1] // block)
    budget = torch.clamp(density_row_budget(nq, 0.1), min=2)  # sink and diagonal are forced
    budget[0] = 1
    want = budget.sum().item() / (nq * (nq + 1) / 2)
    assert all(s["density"] == pytest.approx(want) for s in state.stats.values())
    assert math.isfinite(sparse_loss) and sparse_loss != dense_loss


def test_committed_decode_gates_run_sparse_decode(model, tok):
    """The committed decode adapter (the recipe's 400-step decode gates) loads onto the testbed and drives
    sparse decode in ``generate``: a prompt longer than the token budget decodes at a density below 1 and
    answers the pass key (quality is measured by `seerattn eval decode`)."""
    import copy

    from seerattn.decode_policy import DecodePolicy
    from seerattn.hf import from_pretrained, get_seer_state

    sparse = from_pretrained(copy.deepcopy(model), MODEL.parent / "gates-decode")
    state = get_seer_state(sparse)
    assert state.config.gate is None and state.config.decode.policy == DecodePolicy("budget", 4096, bound_slots=2)
    state.set_decode(policy=DecodePolicy("budget", 512, bound_slots=2))
    before = " ".join([GRASS] * 60)
    needle = "The pass key is 20946. Remember it. 20946 is the pass key."
    prompt = f"{INTRO} {before} {needle} {before} What is the pass key? The pass key is"
    ids = torch.tensor([tok(prompt).input_ids])
    assert ids.shape[1] > 1024
    with torch.no_grad():
        out = sparse.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert all(s["path"] == "sparse-decode" for s in state.stats.values())
    assert 0.0 < state.mean_density() < 0.25  # 512 of ~2950 tokens (first and current blocks forced)
    assert tok.decode(out[0, ids.shape[1] :]).strip().startswith("20946")
