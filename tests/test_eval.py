"""Evaluation harness: method masks and budgets, PPL == plain HF, vertical-slash, passkey, CLI outputs.

Everything runs on CPU on a tiny Llama (2 layers, Hq 4, Hkv 2, head dim 16, 16-token blocks) with a
byte-level BPE trained here on a slice of the repository's sample books (no downloads).
"""

from __future__ import annotations

import copy
import csv
import gzip
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tokenizers")

from hf_models import make_model  # noqa: E402

from seerattn.block_mask import SparsityPolicy, causal_block_mask, density_row_budget, num_blocks  # noqa: E402
from seerattn.eval import (  # noqa: E402
    METHODS,
    Setting,
    TokenizedBooks,
    block_maps,
    build_mask,
    configure,
    evaluate_passkey,
    evaluate_ppl,
    expand_settings,
    make_passkey_prompt,
    prepare_eval_model,
    scaled_rope,
    segment_windows,
)
from seerattn.eval import passkey as passkey_mod  # noqa: E402
from seerattn.eval.methods import attention_mass_scores, realised_row_counts, vertical_slash_scores  # noqa: E402
from seerattn.eval.passkey import PasskeyTemplate, sentence_ends  # noqa: E402
from seerattn.eval.stats import wilson_interval  # noqa: E402
from seerattn.hf import MaskRequest  # noqa: E402

BOOKS = Path(__file__).resolve().parents[1] / "data" / "books-sample"  # the repository's held-out sample
BS = 16  # block size of the tiny model
TRAIN_LEN = 256  # its max_position_embeddings: contexts above it use RoPE scaling
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_thread_module")


def _manifest_rows():
    with (BOOKS / "MANIFEST.tsv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory) -> Path:
    """A small books folder: slices of 3 test books and 1 train book, with a MANIFEST.tsv."""
    rows = _manifest_rows()
    test = [r for r in rows if r["split"] == "test"][:3]
    train = [r for r in rows if r["split"] == "train"][:1]
    out = tmp_path_factory.mktemp("books")
    with (out / "MANIFEST.tsv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["file", "title", "split"])
        for r in test + train:
            with gzip.open(BOOKS / r["file"], "rt", encoding="utf-8") as src:
                text = src.read()[5_000:45_000]
            with gzip.open(out / r["file"], "wt", encoding="utf-8") as dst:
                dst.write(text)
            w.writerow([r["file"], r["title"], r["split"]])
    return out


@pytest.fixture(scope="module")
def tokenizer(books_dir):
    """A byte-level BPE (vocab 384) trained on the slice of the train book, as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    train = next(
        r for r in csv.DictReader((books_dir / "MANIFEST.tsv").open(), delimiter="\t") if r["split"] == "train"
    )
    with gzip.open(books_dir / train["file"], "rt", encoding="utf-8") as f:
        text = f.read()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _tiny_llama(vocab: int, rope: dict | None = None):
    """The shared tiny Llama (peaked attention) with this tokenizer's vocabulary, trained length TRAIN_LEN."""
    return make_model(
        "llama", rope=rope, vocab_size=vocab, max_position_embeddings=TRAIN_LEN, bos_token_id=0, eos_token_id=1
    )


@pytest.fixture(scope="module")
def plain_model(tokenizer):
    return _tiny_llama(len(tokenizer))


@pytest.fixture()
def em(plain_model):
    return prepare_eval_model(copy.deepcopy(plain_model), block_size=BS)


@pytest.fixture(scope="module")
def books(books_dir, tokenizer):
    return TokenizedBooks(books_dir, tokenizer)


def _request(t: int = 16 * 12 + 5, b: int = 2, hq: int = 4, hkv: int = 2, d: int = 16, seed: int = 0) -> MaskRequest:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    return MaskRequest(layer_idx=1, q=q, k=k, scale=d**-0.5, block_size=BS, seq_len=t)


def _forced_budget(nb: int, density: float) -> torch.Tensor:
    """Blocks per row the shared policy keeps: the budget, but at least sink + diagonal."""
    forced = torch.tensor([1] + [2] * (nb - 1))
    return torch.maximum(density_row_budget(nb, density), forced)


# ------------------------------------------------------------------------------------ methods
def test_registry_has_every_method_and_rejects_unknown():
    from seerattn.block_mask import ALLOCATIONS
    from seerattn.cli import build_parser
    from seerattn.cli.eval import ALL_METHODS
    from seerattn.cli.eval import ALLOCATIONS as CLI_ALLOCATIONS
    from seerattn.eval.stats import BOOTSTRAP_RESAMPLES

    assert set(ALL_METHODS.split(", ")) == set(METHODS)
    assert CLI_ALLOCATIONS == ALLOCATIONS
    args = build_parser().parse_args(["eval", "ppl", "--model", "m", "-o", "o"])
    assert args.resamples == BOOTSTRAP_RESAMPLES
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        expand_settings(["nope"], [0.1])
    with pytest.raises(ValueError, match="needs at least one threshold"):
        expand_settings(["seer_threshold"], [0.1])
    with pytest.raises(ValueError, match="density must be in"):
        expand_settings(["random"], [1.5])
    got = [s.label for s in expand_settings(["dense", "random", "seer_top_p"], [0.5, 0.1], top_ps=[0.9])]
    assert got == ["dense", "random@0.5", "random@0.1", "seer_top_p@0.9"]


def test_settings_take_allocations_for_density_budgets_only():
    got = expand_settings(["dense", "streaming", "seer_top_p"], [0.1], top_ps=[0.9], allocations=["row", "head"])
    assert [s.label for s in got] == ["dense", "streaming@0.1", "streaming@0.1/head", "seer_top_p@0.9"]
    assert got[2].policy == SparsityPolicy("density", 0.1, allocation="head")
    assert got[2].to_dict()["allocation"] == "head"
    with pytest.raises(ValueError, match="only density budgets take an allocation"):
        Setting("seer_threshold", 0.01, "uniform")
    with pytest.raises(ValueError, match="allocation must be one of"):
        expand_settings(["random"], [0.1], allocations=["rows"])
    with pytest.raises(ValueError, match="allocations must name at least one"):
        expand_settings(["random"], [0.1], allocations=[])


def test_configure_gives_custom_methods_the_settings_allocation(em):
    configure(em.state, Setting("streaming", 0.2, "uniform"))
    assert em.state.config.policy == SparsityPolicy("density", 0.2, allocation="uniform")
    req = _request(t=16 * 12, b=1)
    assert torch.equal(em.state.mask_fn(req).to_dense(), build_mask("streaming", req, 0.2, 0, "uniform").to_dense())


@pytest.mark.parametrize("allocation", ["uniform", "head"])
def test_streaming_under_one_count_allocations_is_a_fixed_window(allocation):
    """With the uniform or per-head budget every row of StreamingLLM keeps the same local window."""
    nb = 12
    dense = build_mask("streaming", _request(t=16 * nb, b=1), 0.3, allocation=allocation).to_dense()[0, 0]
    counts = dense.sum(-1)
    k = int(counts.max())
    assert counts.tolist() == [min(i + 1, k) for i in range(nb)]
    assert abs(counts.sum().item() - 0.3 * nb * (nb + 1) / 2) <= nb / 2
    for i in range(k, nb):
        assert dense[i].nonzero().flatten().tolist() == [0, *range(i - k + 2, i + 1)], i


@pytest.mark.parametrize("name", ["streaming", "vertical_slash", "random", "mass_oracle"])
@pytest.mark.parametrize("density", [0.5, 0.2, 0.1])
def test_baseline_masks_have_requested_density(name, density):
    req = _request()
    mask = build_mask(name, req, density, seed=3)
    nb = num_blocks(req.seq_len, BS)
    assert mask.shape == (2, 4, nb, nb) and mask.seq_len == req.seq_len
    dense = mask.to_dense()
    causal = causal_block_mask(nb)
    assert not (dense & ~causal).any(), "a block above the diagonal is kept"
    counts = realised_row_counts(mask)
    assert (counts >= 1).all(), "an empty row"
    want = density_row_budget(nb, density)
    assert ((counts - want).abs() <= 1).all(), f"rows off budget by more than one block: {counts[0, 0]} vs {want}"
    assert torch.equal(counts, _forced_budget(nb, density).expand_as(counts))
    assert dense[..., 0].all() and dense.diagonal(dim1=-2, dim2=-1).all(), "sink and diagonal must be kept"
    # at a realistic block count (8k tokens / 64) the forced sink + diagonal barely move the density
    big = _request(t=128 * BS, b=1, hq=2, hkv=1, d=8)
    assert abs(build_mask(name, big, density, seed=3).density() - density) < 0.01


@pytest.mark.parametrize("chunk", [BS, 4 * BS, 64 * BS])
def test_attention_mass_scores_pool_the_exact_softmax(chunk):
    """Block (I, J) = mean over the queries of block I of their softmax mass in key block J, GQA
    and a partial last block included; the query chunking does not change it."""
    req = _request()  # 197 tokens: 13 blocks of 16, the last one of 5 tokens
    b, hq, t, d = req.q.shape
    k = req.k.repeat_interleave(hq // req.k.shape[1], dim=1)
    probs = (req.q @ k.transpose(-1, -2) * req.scale).masked_fill(torch.ones(t, t).triu(1).bool(), -math.inf)
    probs = probs.softmax(-1)
    nb = num_blocks(t, BS)
    want = torch.zeros(b, hq, nb, nb)
    for i in range(nb):
        for j in range(nb):
            want[..., i, j] = probs[..., i * BS : (i + 1) * BS, j * BS : (j + 1) * BS].sum((-1, -2))
        want[..., i, :] /= min(BS, t - i * BS)
    got = attention_mass_scores(req, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(b, hq, nb))
    with pytest.raises(ValueError, match="multiple of block_size"):
        attention_mass_scores(req, chunk=BS + 1)


def test_mass_oracle_keeps_the_most_attention_mass():
    """At one budget no method keeps more of the true attention mass than the mass oracle."""
    req = _request(t=16 * 16, b=1)
    mass = attention_mass_scores(req)
    kept = {n: (build_mask(n, req, 0.2).to_dense() * mass).sum().item() for n in ("mass_oracle", "streaming", "random")}
    assert kept["mass_oracle"] > max(kept["streaming"], kept["random"])


def test_streaming_keeps_sink_and_most_recent_blocks():
    req = _request(t=16 * 10, b=1)
    dense = build_mask("streaming", req, 0.3).to_dense()[0, 0]
    budget = _forced_budget(10, 0.3)
    for i in range(10):
        n = int(budget[i])
        want = [0] if i == 0 else [0, *range(i - n + 2, i + 1)]
        assert dense[i].nonzero().flatten().tolist() == want, i


def test_random_mask_is_seeded():
    req = _request()
    a, b = build_mask("random", req, 0.2, seed=1), build_mask("random", req, 0.2, seed=1)
    c = build_mask("random", req, 0.2, seed=2)
    assert torch.equal(a.to_dense(), b.to_dense()) and not torch.equal(a.to_dense(), c.to_dense())


def test_vertical_slash_finds_planted_columns_and_diagonals():
    """Last-block queries attend to 3 tokens of key block 5 (vertical) and to offset 7 blocks (slash)."""
    t, nb, d = 256, 16, 256
    vertical_tokens = [85, 86, 87]  # key block 5
    offset = 7 * BS  # token offset 112 -> block diagonal 7
    q = torch.zeros(1, 1, t, d)
    k = torch.zeros(1, 1, t, d)
    for j in range(t):  # position code of key j on dims 1.., the vertical direction on dim 0
        k[0, 0, j, 1 + j % (d - 1)] = 1.0
    for j in vertical_tokens:
        k[0, 0, j] = 0.0
        k[0, 0, j, 0] = 1.0
    for i in range(t):
        q[0, 0, i, 0] = 10.0
        if i - offset >= 0:
            q[0, 0, i, 1 + (i - offset) % (d - 1)] = 10.0
    req = MaskRequest(0, q, k, 1.0, BS, t)
    scores = vertical_slash_scores(req)[0, 0]  # shares of the last block's attention
    assert not scores[~causal_block_mask(nb)].any()
    # From the last block alone each line also casts a "ghost" of the other kind, as in MInference:
    # the slash's keys there (tokens 128..143) read as a vertical on block 8, and the vertical's
    # offsets from the last block (153..170) as slash mass on block diagonals 9..11.
    for i in range(nb):
        for j in range(i + 1):
            if j == 5:
                assert scores[i, j] > 0.7, (i, j)  # the planted vertical: 3/4 of the mass
            elif i - j == 7:
                assert scores[i, j] > 0.2, (i, j)  # the planted slash: 1/4 of the mass
            elif j != 8 and i - j not in (9, 10, 11):
                assert scores[i, j] < 0.01, (i, j)
    mask = build_mask("vertical_slash", req, 0.5).to_dense()[0, 0]
    for i in range(9, nb):  # budget >= 5: sink, diagonal, the vertical, the slash and block 8
        assert mask[i, 5] and mask[i, i - 7] and mask[i, 8], (i, mask[i].nonzero().flatten().tolist())
    # a pure slash: all its mass on block diagonal 7, none on the neighbouring diagonals
    slash_only = vertical_slash_scores(MaskRequest(0, q * torch.tensor([0.0] + [1.0] * (d - 1)), k, 1.0, BS, t))[0, 0]
    assert slash_only[13, 13 - 7] > 0.95 and slash_only[13, 13 - 6] < 0.01 and slash_only[13, 13 - 8] < 0.01


def test_model_forward_density_for_every_method(em, books):
    """Realised density reported by the model's stats is the requested one within one block per row."""
    settings = expand_settings(
        ["dense", "oracle", "streaming", "vertical_slash", "random", "seer"],
        [0.5, 0.2],
        thresholds=[0.05],
        top_ps=[0.9],
    )
    settings += expand_settings(["seer_threshold", "seer_top_p"], thresholds=[0.05], top_ps=[0.9])
    ids = segment_windows(books, 200, 1)[0]
    nb = num_blocks(200, BS)
    total = nb * (nb + 1) / 2
    for s in settings:
        configure(em.state, s, seed=0)
        em.state.reset()
        with torch.no_grad():
            em.model(input_ids=ids.view(1, -1))
        paths = {st["path"] for st in em.state.stats.values()}
        realised = em.state.mean_density()
        if s.method == "dense":
            assert paths == {"dense"} and realised == 1.0
        elif METHODS[s.method].budget == "density":
            want = _forced_budget(nb, s.budget).sum().item() / total
            assert realised == pytest.approx(want, abs=1e-9), s.label
            assert abs(realised - s.budget) <= nb / total
        else:
            assert 0 < realised <= 1.0


# ------------------------------------------------------------------------------------ data
def test_segment_windows_are_deterministic_non_overlapping_and_spread(books):
    w1 = segment_windows(books, 128, 5)
    w2 = segment_windows(books, 128, 5)
    assert len(w1) == 5 and all(w.shape == (128,) for w in w1)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))
    # round-robin: windows 0..2 are the first slot of books 0..2, window 3 the second slot of book 0
    assert torch.equal(w1[0], books.tokens(0, 256)[:128]) and torch.equal(w1[3], books.tokens(0, 256)[128:256])
    assert torch.equal(w1[1], books.tokens(1, 128)[:128])
    # with a span, windows of every context end at the same token (the end of the slot)
    short, long = segment_windows(books, 64, 4, span=256), segment_windows(books, 256, 4, span=256)
    assert all(torch.equal(s, lo[-64:]) for s, lo in zip(short, long, strict=True))
    assert torch.equal(long[3], books.tokens(0, 512)[256:512])
    bos = segment_windows(books, 64, 2, add_bos=True, span=256)
    assert bos[0][0].item() == books.tokenizer.bos_token_id and torch.equal(bos[0][1:], long[0][-63:])
    with pytest.raises(ValueError, match="hold only"):
        segment_windows(books, 4096, 1000)
    with pytest.raises(ValueError, match="span >= context"):
        segment_windows(books, 256, 1, span=128)


def test_dense_ppl_equals_plain_hf_forward(em, plain_model, books):
    contexts = [64, 200]
    rows = evaluate_ppl(em, books, [Setting("dense")], contexts, samples=3, tail=16, progress=False)
    for row in rows:
        windows = segment_windows(books, row["context"], 3, span=max(contexts))
        nll, tail_nll = 0.0, 0.0
        with torch.no_grad():
            for w in windows:
                out = plain_model(input_ids=w.view(1, -1), labels=w.view(1, -1))
                nll += out.loss.double().item() * (w.numel() - 1)
                logits = plain_model(input_ids=w.view(1, -1)).logits[0, -17:-1].double()
                tail_nll += torch.nn.functional.cross_entropy(logits, w[-16:], reduction="sum").item()
        tokens = sum(w.numel() - 1 for w in windows)
        assert row["tokens"] == tokens and row["windows"] == 3 and row["density"] == 1.0
        assert row["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
        assert row["ppl_tail"] == pytest.approx(math.exp(tail_nll / 48), rel=1e-5)
        assert row["rope_scaling"] is None and row["tail"] == 16


def test_ppl_beyond_training_length_uses_yarn_like_a_scaled_model(em, tokenizer, books):
    """At 2x the training length the harness equals a model built with a YaRN config; RoPE is restored."""
    context = 2 * TRAIN_LEN
    before = em.model.model.rotary_emb.inv_freq.clone()
    row = evaluate_ppl(em, books, [Setting("dense")], [context], samples=1, progress=False)[0]
    assert row["tail"] == context // 4
    assert torch.equal(em.model.model.rotary_emb.inv_freq, before)
    assert row["rope_scaling"]["rope_type"] == "yarn" and row["rope_scaling"]["factor"] == 2.0
    scaled = _tiny_llama(
        len(tokenizer),
        rope={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": TRAIN_LEN},
    )
    scaled.load_state_dict(em.model.state_dict(), strict=False)  # the seer gates are extra keys
    w = segment_windows(books, context, 1)[0]
    with torch.no_grad():
        loss = scaled(input_ids=w.view(1, -1), labels=w.view(1, -1)).loss.item()
    assert row["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    with scaled_rope(em, context, "dynamic") as rope:
        assert rope["rope_type"] == "dynamic"
    with scaled_rope(em, TRAIN_LEN, "yarn") as rope:
        assert rope is None


def test_ppl_sparse_methods_report_density_and_gate_guard(em, books):
    settings = expand_settings(["dense", "oracle", "streaming", "random"], [0.5])
    rows = evaluate_ppl(em, books, settings, [128], samples=2, progress=False)
    by = {r["label"]: r for r in rows}
    assert by["dense"]["density"] == 1.0
    for label in ("oracle@0.5", "streaming@0.5", "random@0.5"):
        assert 0.5 <= by[label]["density"] < 0.75 and len(by[label]["density_per_layer"]) == 2
        assert math.isfinite(by[label]["ppl"]) and by[label]["ppl"] != by["dense"]["ppl"]
    again = evaluate_ppl(em, books, [Setting("random", 0.5)], [128], samples=2, progress=False)[0]
    assert again["ppl"] == by["random@0.5"]["ppl"], "the random method must be deterministic for a seed"
    with pytest.raises(ValueError, match="no trained gates were loaded"):
        evaluate_ppl(em, books, expand_settings(["seer"], [0.5]), [64], samples=1, progress=False)
    assert em.state.config.mode == "dense"


# ------------------------------------------------------------------------------------ masks
def test_block_maps_oracle_has_best_mass_recall(em, books):
    settings = expand_settings(["oracle", "streaming", "vertical_slash", "random", "seer"], [0.3])
    windows = segment_windows(books, 160, 2)
    res = block_maps(em, windows, settings, allow_untrained_gates=True)
    nb = num_blocks(160, BS)
    assert res["windows"] == 2 and sorted(res["maps"]) == [0, 1]
    for layer in (0, 1, "mean"):
        rows = {r["label"]: r for r in res["rows"] if r["layer"] == layer}
        assert rows["oracle@0.3"]["block_recall"] == 1.0
        for label in ("streaming@0.3", "vertical_slash@0.3", "random@0.3", "seer@0.3"):
            assert rows[label]["mass_recall"] <= rows["oracle@0.3"]["mass_recall"] + 1e-6, label
            assert rows[label]["density"] == pytest.approx(rows["oracle@0.3"]["density"])
        assert 0 <= rows["gate_topk@0.3"]["mass_recall"] <= 1
    # metrics are the mean over windows
    one, two = (block_maps(em, w, settings, layers=[1], allow_untrained_gates=True) for w in windows)
    assert [r["layer"] for r in one["rows"]].count(1) == len(settings) + 1
    for a, b, both in zip(one["rows"], two["rows"], [r for r in res["rows"] if r["layer"] == 1], strict=False):
        assert a["label"] == b["label"] == both["label"]
        assert both["mass_recall"] == pytest.approx((a["mass_recall"] + b["mass_recall"]) / 2)
    for layer in (0, 1):
        m = res["maps"][layer]
        assert m["gt"].shape == (4, nb, nb) and m["gate"].shape == (4, nb, nb)
        assert torch.allclose(m["gt"].sum(-1), torch.ones(4, nb), atol=1e-5)
        assert set(m["masks"]) == {s.label for s in settings}
    assert torch.equal(one["maps"][1]["gt"], res["maps"][1]["gt"])


# ------------------------------------------------------------------------------------ passkey
def test_passkey_prompt_layout(tokenizer, books):
    filler = books.tokens(0, 400)
    p = make_passkey_prompt(tokenizer, filler, 300, 0.5, "12345")
    assert p.ids.numel() + p.answer.numel() == 300 and p.ids[0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(p.answer) == " 12345"
    assert tokenizer.decode(p.ids[1:40]).startswith("There is an important info")
    needle = tokenizer.decode(p.ids[p.needle_start : p.needle_start + 60])
    assert needle.startswith(" The pass key is 12345. Remember it. 12345 is the pass key.")
    assert tokenizer.decode(p.ids[-40:]).endswith(" What is the pass key? The pass key is")
    intro = len(tokenizer(PasskeyTemplate.intro, add_special_tokens=False)["input_ids"])
    assert make_passkey_prompt(tokenizer, filler, 300, 0.0, "12345").needle_start == 1 + intro
    bare = PasskeyTemplate(intro="", needle=" key {key}.", question=" key")
    assert make_passkey_prompt(tokenizer, filler, 300, 0.0, "7", bare, add_bos=False).needle_start == 0
    with pytest.raises(ValueError, match="depth must be"):
        make_passkey_prompt(tokenizer, filler, 300, 1.5, "12345")
    # with sentence boundaries the needle follows the end of a sentence, nearest to the depth
    ends = sentence_ends(tokenizer, filler)
    assert ends.numel() > 3
    for depth in (0.3, 0.6, 0.9):
        q = make_passkey_prompt(tokenizer, filler, 300, depth, "12345", boundaries=ends)
        before = tokenizer.decode(q.ids[q.needle_start - 1 : q.needle_start])
        assert before.rstrip(" \"'”’)").endswith((".", "!", "?")) or "\n" in before, before
        assert abs((q.needle_start - 1 - intro) - depth * (300 - (q.ids.numel() - 300) - 1 - intro)) < 150


def test_passkey_grid_on_tiny_model(em, tokenizer, books):
    settings = expand_settings(["dense", "streaming", "oracle"], [0.5])
    contexts, depths = [224, TRAIN_LEN + 64], [0.0, 0.5, 1.0]
    rows = evaluate_passkey(em, tokenizer, books, settings, contexts, depths, samples=2, progress=False)
    assert [r["label"] for r in rows] == ["dense", "streaming@0.5", "oracle@0.5"]
    for r in rows:
        acc = torch.tensor(r["accuracy"])
        assert acc.shape == (2, 3) and ((acc >= 0) & (acc <= 1)).all()
        assert len(r["answers"][1][2]) == 2 and 0 <= r["mean_accuracy"] <= 1
        assert r["rope_scaling"][0] is None and r["rope_scaling"][1]["rope_type"] == "yarn"
    assert rows[0]["density"] == 1.0 and 0.5 <= rows[1]["density"] < 0.8


def test_passkey_forced_scoring_equals_greedy_decoding_when_dense(em, tokenizer, books):
    """Dense attention: teacher forcing on greedy's own output reproduces it (forced == greedy decoding)."""
    from seerattn.eval.model import greedy_continue
    from seerattn.eval.passkey import forced_answer

    configure(em.state, Setting("dense"))
    filler = books.tokens(1, 400)
    for depth in (0.0, 0.5, 1.0):
        p = make_passkey_prompt(tokenizer, filler, 224, depth, "31415")
        greedy, _ = greedy_continue(em.model, p.ids, 6)
        forced, density = forced_answer(em.model, p.ids, torch.tensor(greedy[:5]))
        assert forced == greedy[:5] and density == 1.0
    args = (em, tokenizer, books, [Setting("dense")], [224], [0.0, 0.5, 1.0], 2)
    forced = evaluate_passkey(*args, scoring="forced", progress=False)[0]
    generated = evaluate_passkey(*args, scoring="generate", progress=False)[0]
    assert forced["scoring"] == "forced" and generated["scoring"] == "generate"
    assert forced["accuracy"] == generated["accuracy"]
    with pytest.raises(ValueError, match="scoring must be one of"):
        evaluate_passkey(*args, scoring="vibes", progress=False)


@pytest.mark.parametrize("scoring, fn", [("forced", "forced_answer"), ("generate", "greedy_continue")])
def test_passkey_scores_an_exact_answer_as_correct(em, tokenizer, books, monkeypatch, scoring, fn):
    """With a model that answers the key, accuracy is 1; answering another number gives 0."""

    def knows_the_key(model, ids, _):
        key = tokenizer.decode(ids).split("The pass key is ")[1][:5]
        return tokenizer(" " + key + ".", add_special_tokens=False)["input_ids"], 1.0

    def wrong(model, ids, _):
        return tokenizer(" 00000", add_special_tokens=False)["input_ids"], 1.0

    run = lambda: evaluate_passkey(  # noqa: E731
        em, tokenizer, books, [Setting("dense")], [224], [0.0, 1.0], 3, scoring=scoring, progress=False
    )
    monkeypatch.setattr(passkey_mod, fn, knows_the_key)
    assert run()[0]["accuracy"] == [[1.0, 1.0]]
    monkeypatch.setattr(passkey_mod, fn, wrong)
    assert run()[0]["accuracy"] == [[0.0, 0.0]]


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, plain_model, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny_model")
    plain_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_cli_eval_writes_json_markdown_and_pngs(model_dir, books_dir, tmp_path):
    from seerattn.cli import main

    common = ["--model", str(model_dir), "--data", str(books_dir), "--block-size", str(BS), "--no-progress"]
    t0 = time.perf_counter()
    assert (
        main(
            [
                "eval",
                "ppl",
                *common,
                "--methods",
                "dense,oracle,streaming,vertical_slash,random",
                "--densities",
                "0.5,0.2",
                "--contexts",
                "128,384",
                "--samples",
                "2",
                "-o",
                str(tmp_path / "ppl"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "passkey",
                *common,
                "--methods",
                "dense,streaming",
                "--densities",
                "0.5",
                "--allocations",
                "row,uniform",
                "--contexts",
                "224,320",
                "--depths",
                "0,0.5,1",
                "--samples",
                "2",
                "-o",
                str(tmp_path / "pk"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "masks",
                *common,
                "--densities",
                "0.3",
                "--context",
                "160",
                "--heads",
                "0,3",
                "--samples",
                "2",
                "--plot-layers",
                "1",
                "-o",
                str(tmp_path / "masks"),
            ]
        )
        == 0
    )
    assert time.perf_counter() - t0 < 120

    ppl = json.loads((tmp_path / "ppl" / "ppl.json").read_text())
    assert ppl["kind"] == "ppl" and ppl["model"]["train_length"] == TRAIN_LEN and "torch" in ppl["environment"]
    labels = {(r["label"], r["context"]) for r in ppl["results"]}
    assert len(labels) == 9 * 2 and ("vertical_slash@0.2", 384) in labels
    assert all(r["rope_scaling"] is not None for r in ppl["results"] if r["context"] == 384)
    md = (tmp_path / "ppl" / "ppl.md").read_text()
    assert "| method | ctx 128 | ctx 384 |" in md and "| oracle@0.2 |" in md and "last 32 tokens" in md
    assert all(r["tail"] == 32 and r["ppl_tail"] > 1 for r in ppl["results"])
    assert _is_png(tmp_path / "ppl" / "ppl_vs_density.png")
    # every method's difference from dense has a 95 % interval that brackets it; dense itself has none
    for r in ppl["results"]:
        dense = next(d for d in ppl["results"] if d["method"] == "dense" and d["context"] == r["context"])
        assert len(r["window_nll"]) == len(r["window_nll_tail"]) == len(r["window_tokens"]) == 2
        assert math.exp(sum(r["window_nll"]) / sum(r["window_tokens"])) == pytest.approx(r["ppl"], rel=1e-12)
        if r["method"] == "dense":
            assert r["ppl_vs_dense"] is None and r["ppl_vs_dense_ci"] is None and r["interval"] is None
            continue
        assert r["interval"] == {
            "kind": "paired bootstrap over windows, percentile", "level": 0.95, "resamples": 2000, "seed": 0
        }  # fmt: skip
        for key, ppl_key in (("ppl_vs_dense", "ppl"), ("ppl_tail_vs_dense", "ppl_tail")):
            lo, hi = r[f"{key}_ci"]
            assert lo <= r[key] <= hi, (r["label"], key)
            assert r[key] == pytest.approx(r[ppl_key] / dense[ppl_key] - 1, rel=1e-9, abs=1e-12)
    oracle = next(r for r in ppl["results"] if r["label"] == "oracle@0.2" and r["context"] == 384)
    cell = f"{100 * oracle['ppl_vs_dense']:+.2f} % [{100 * oracle['ppl_vs_dense_ci'][0]:+.2f}, "
    assert cell in md and "paired bootstrap over the windows (2000 resamples, seed 0)" in md

    pk = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert [r["label"] for r in pk["results"]] == ["dense", "streaming@0.5", "streaming@0.5/uniform"]
    assert [r["allocation"] for r in pk["results"]] == ["row", "row", "uniform"]
    assert torch.tensor(pk["results"][0]["accuracy"]).shape == (2, 3)
    pk_md = (tmp_path / "pk" / "passkey.md").read_text()
    assert "| dense |" in pk_md and "95 % Wilson intervals" in pk_md
    for r in pk["results"]:  # Wilson intervals from the counts, bracketing every accuracy
        assert r["interval"]["level"] == 0.95
        for acc_row, ci_row, correct_row in zip(r["accuracy"], r["accuracy_ci"], r["correct"], strict=True):
            for acc, (lo, hi), k in zip(acc_row, ci_row, correct_row, strict=True):
                assert acc == k / 2 and [lo, hi] == pytest.approx(wilson_interval(k, 2)) and lo <= acc <= hi
        by_context = zip(r["accuracy_by_context"], r["accuracy_by_context_ci"], r["correct"], strict=True)
        for acc, (lo, hi), correct_row in by_context:
            assert [lo, hi] == pytest.approx(wilson_interval(sum(correct_row), 6)) and lo <= acc <= hi
        lo, hi = r["mean_accuracy_ci"]
        assert [lo, hi] == pytest.approx(wilson_interval(sum(map(sum, r["correct"])), 12))
        assert lo <= r["mean_accuracy"] <= hi and f"{r['mean_accuracy']:.3f} [{lo:.2f}, {hi:.2f}]" in pk_md
    assert _is_png(tmp_path / "pk" / "passkey_heatmap.png") and _is_png(tmp_path / "pk" / "passkey_accuracy.png")

    masks = json.loads((tmp_path / "masks" / "masks.json").read_text())
    assert {r["layer"] for r in masks["results"]} == {0, 1, "mean"}
    assert "mass recall" in (tmp_path / "masks" / "masks.md").read_text()
    assert _is_png(tmp_path / "masks" / "block_maps.png")


def test_cli_refuses_seer_without_gates_and_bad_values(model_dir, books_dir, tmp_path):
    from seerattn.cli import main

    common = ["--model", str(model_dir), "--data", str(books_dir), "--block-size", str(BS), "--no-progress"]
    # --debug: the exceptions themselves (without it the CLI prints one line and returns 2)
    with pytest.raises(ValueError, match="no trained gates"):
        main(["--debug", "eval", "ppl", *common, "--methods", "seer", "--contexts", "64", "-o", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown method"):
        main(["--debug", "eval", "ppl", *common, "--methods", "bogus", "--contexts", "64", "-o", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["eval", "ppl", *common, "--contexts", "64,abc", "-o", str(tmp_path)])


def test_cli_seer_methods_with_an_adapter(model_dir, books_dir, tmp_path, plain_model):
    """--gates loads an adapter: seer (density), seer_threshold and seer_top_p run; densities are realised."""
    from seerattn.cli import main
    from seerattn.gate import GateConfig
    from seerattn.hf import SeerConfig, apply_seer_attention, save_gates

    shell = copy.deepcopy(plain_model)
    apply_seer_attention(shell, SeerConfig(gate=GateConfig(block_size=BS)))
    save_gates(shell, tmp_path / "gates")
    common = ["--model", str(model_dir), "--gates", str(tmp_path / "gates"), "--data", str(books_dir)]
    args = ["--methods", "dense,seer,seer_threshold,seer_top_p", "--densities", "0.3", "--thresholds", "0.1"]
    args += ["--top-p", "0.5", "--contexts", "160", "--samples", "1", "--no-progress", "-o", str(tmp_path / "out")]
    assert main(["eval", "ppl", *common, *args]) == 0
    res = json.loads((tmp_path / "out" / "ppl.json").read_text())
    assert res["model"]["gates"] == str(tmp_path / "gates") and res["model"]["block_size"] == BS
    by = {r["label"]: r for r in res["results"]}
    assert set(by) == {"dense", "seer@0.3", "seer_threshold@0.1", "seer_top_p@0.5"}
    assert by["seer@0.3"]["density"] == pytest.approx(_forced_budget(10, 0.3).sum().item() / 55)
    assert 0 < by["seer_top_p@0.5"]["density"] < 1 and 0 < by["seer_threshold@0.1"]["density"] < 1


def test_cli_mask_heads_overrides_the_adapter(model_dir, books_dir, tmp_path, plain_model):
    """--mask-heads kv ranks gate blocks per GQA group: recorded in the JSON, and it changes the PPL
    of the same gates at the same density (the adapter was saved with per-query-head masks)."""
    from seerattn.cli import main
    from seerattn.gate import GateConfig
    from seerattn.hf import SeerConfig, apply_seer_attention, save_gates

    shell = copy.deepcopy(plain_model)
    apply_seer_attention(shell, SeerConfig(gate=GateConfig(block_size=BS)))
    torch.manual_seed(0)
    with torch.no_grad():  # gates that differ per query head, so that group averaging matters
        for name, p in shell.named_parameters():
            if "seer_gate" in name:
                p.add_(torch.randn_like(p))
    save_gates(shell, tmp_path / "gates")
    common = ["--model", str(model_dir), "--gates", str(tmp_path / "gates"), "--data", str(books_dir)]
    common += ["--methods", "seer", "--densities", "0.3", "--contexts", "320", "--samples", "1", "--no-progress"]
    out = {}
    for heads in ("q", "kv"):
        assert main(["eval", "ppl", *common, "--mask-heads", heads, "-o", str(tmp_path / heads)]) == 0
        out[heads] = json.loads((tmp_path / heads / "ppl.json").read_text())
        assert out[heads]["model"]["mask_heads"] == heads
    assert out["q"]["results"][0]["ppl"] != pytest.approx(out["kv"]["results"][0]["ppl"], rel=1e-6)
    with pytest.raises(SystemExit):
        main(["eval", "ppl", *common, "--mask-heads", "hq", "-o", str(tmp_path / "bad")])


def test_eval_package_never_imports_triton_itself():
    """No module of seerattn.eval (or the CLI wrapper) names triton or seerattn's Triton kernels."""
    root = Path(__file__).resolve().parents[1] / "src" / "seerattn"
    for f in [*(root / "eval").glob("*.py"), root / "cli" / "eval.py"]:
        text = f.read_text()
        assert "import triton" not in text and "_triton" not in text, f
    code = "import seerattn.eval, sys; print('seerattn.ops._triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_prefill_evaluations_leave_an_adapters_decode_gates_off_and_refuse_a_decode_only_adapter(plain_model, tmp_path):
    """An adapter with prefill and decode gates: the prefill evaluation model has no decode section (its generation
    stays dense); an adapter with decode gates only is refused with a message naming `seerattn eval decode`."""
    from seerattn.decode_policy import DecodePolicy
    from seerattn.gate import DecodeGateConfig, GateConfig
    from seerattn.hf import DecodeConfig, SeerConfig, apply_seer_attention, remove_seer_attention, save_gates

    decode = DecodeConfig(DecodeGateConfig(block_size=BS), DecodePolicy("budget", 4 * BS))
    for name, gate in (("both", GateConfig(block_size=BS)), ("decode-only", None)):
        model = copy.deepcopy(plain_model)
        apply_seer_attention(model, SeerConfig(gate=gate, mode="dense", decode=decode))
        save_gates(model, tmp_path / name)
        remove_seer_attention(model)
    em = prepare_eval_model(copy.deepcopy(plain_model), gates=tmp_path / "both")
    assert em.state.config.decode is None and em.state.config.gate == GateConfig(block_size=BS)
    assert em.block_size == BS
    with pytest.raises(ValueError, match="no prefill section.*seerattn eval decode"):
        prepare_eval_model(copy.deepcopy(plain_model), gates=tmp_path / "decode-only")
