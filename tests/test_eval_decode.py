"""Sparse-decode evaluation (seerattn.eval.decode): teacher-forced decode PPL and passkey by generation for
dense / seer / streaming / quest, on test_eval's tiny Llama, tokenizer and books (CPU, 16-token blocks)."""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_eval import BS, books, books_dir, plain_model, tokenizer  # noqa: E402, F401  (module fixtures)

from seerattn.eval import segment_windows, token_nll  # noqa: E402
from seerattn.eval.decode import (  # noqa: E402
    DECODE_METHODS,
    NEEDLE_FIELDS,
    configure_decode,
    decode_answer,
    evaluate_decode_passkey,
    evaluate_decode_ppl,
    prepare_decode_model,
)
from seerattn.eval.model import greedy_continue  # noqa: E402
from seerattn.eval.passkey import make_passkey_prompt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
CONTEXT, TAIL = 224, 64  # 14 blocks; the tail rows 160..223 decode with 10..13 completed blocks


@pytest.fixture()
def dem(plain_model):  # noqa: F811
    return prepare_decode_model(copy.deepcopy(plain_model), block_size=BS)


def test_decode_ppl_whole_budget_equals_dense_and_small_budgets_differ(dem, plain_model, books):  # noqa: F811
    methods = list(DECODE_METHODS)
    whole = evaluate_decode_ppl(
        dem, books, methods, CONTEXT, 2, budget=CONTEXT + BS, tail=TAIL, allow_untrained_gates=True, progress=False
    )
    dense = whole[0]
    # the dense row is the plain model's PPL over the same windows
    plain = sum(token_nll(plain_model, w)[-TAIL:].sum().item() for w in segment_windows(books, CONTEXT, 2))
    assert dense["ppl_tail"] == pytest.approx(math.exp(plain / (2 * TAIL)), rel=1e-6)
    for r in whole[1:]:  # a budget holding every block: each decode row sees its whole causal past
        assert r["ppl_tail"] == pytest.approx(dense["ppl_tail"], rel=1e-5), r["method"]
        assert r["density"] == pytest.approx(1.0)
    small = evaluate_decode_ppl(
        dem, books, methods, CONTEXT, 2, budget=4 * BS, tail=TAIL, allow_untrained_gates=True, progress=False
    )
    by = {r["method"]: r for r in small}
    assert by["dense"]["ppl_tail"] == pytest.approx(dense["ppl_tail"], rel=1e-9)
    for m in ("seer", "streaming", "quest", "oracle"):
        r = by[m]
        assert r["ppl_tail"] != pytest.approx(dense["ppl_tail"], rel=1e-4), m
        assert 0.25 < r["density"] < 0.45, (m, r["density"])  # 4 of 11..14 blocks
        assert r["ppl_tail_vs_dense"] == pytest.approx(r["ppl_tail"] / dense["ppl_tail"] - 1)
        lo, hi = r["ppl_tail_vs_dense_ci"]
        assert lo <= r["ppl_tail_vs_dense"] <= hi
    assert by["streaming"]["ppl_tail"] != pytest.approx(by["quest"]["ppl_tail"], rel=1e-6)
    # the oracle keeps the blocks the dense attention weighs most: its PPL is the nearest to dense's
    gap = {m: abs(by[m]["ppl_tail"] - dense["ppl_tail"]) for m in ("seer", "streaming", "quest", "oracle")}
    assert gap["oracle"] < min(gap["seer"], gap["streaming"], gap["quest"]), gap
    with pytest.raises(ValueError, match="no decode gates were loaded|none were loaded"):
        evaluate_decode_ppl(dem, books, ["seer"], CONTEXT, 1, budget=4 * BS, tail=TAIL, progress=False)
    with pytest.raises(ValueError, match="unknown decode methods"):
        evaluate_decode_ppl(dem, books, ["h2o"], CONTEXT, 1, budget=4 * BS, tail=TAIL, progress=False)
    assert dem.state.config.mode == "dense" and not dem.state.decoding  # put back


def test_decode_answer_is_greedy_decoding_and_sparse_steps_read_the_budget(dem, tokenizer, books):  # noqa: F811
    filler = books.tokens(1, 400)
    p = make_passkey_prompt(tokenizer, filler, CONTEXT, 0.5, "31415")
    configure_decode(dem, "dense", 4 * BS)
    dense, density = decode_answer(dem.model, p.ids, 6)
    assert dense == greedy_continue(dem.model, p.ids, 6)[0] and density == 1.0
    for method in ("seer", "streaming", "quest"):
        configure_decode(dem, method, CONTEXT + BS)  # every block: the same tokens as dense
        dem.state.reset()
        assert decode_answer(dem.model, p.ids, 6)[0] == dense, method
        configure_decode(dem, method, 4 * BS)
        dem.state.reset()
        _, density = decode_answer(dem.model, p.ids, 6)
        assert 0.25 < density < 0.35, (method, density)  # 4 blocks of a 13-14 block cache


def test_decode_passkey_rows(dem, tokenizer, books, monkeypatch):  # noqa: F811
    from seerattn.eval import decode as decode_mod

    rows = evaluate_decode_passkey(
        dem, tokenizer, books, ["dense", "streaming"], CONTEXT, [0.0, 1.0], 2, budget=CONTEXT + BS, progress=False
    )
    assert [r["method"] for r in rows] == ["dense", "streaming"]
    assert rows[0]["answers"] == rows[1]["answers"] and rows[1]["budget_fraction"] == (CONTEXT + BS) / CONTEXT

    def knows_the_key(model, ids, _):
        key = tokenizer.decode(ids).split("The pass key is ")[1][:5]
        return tokenizer(" " + key + ".", add_special_tokens=False)["input_ids"], 1.0

    monkeypatch.setattr(decode_mod, "decode_answer", knows_the_key)  # runs no decode step: nothing to record
    rows = evaluate_decode_passkey(
        dem, tokenizer, books, ["dense", "quest"], CONTEXT, [0.5], 3, 4 * BS, progress=False, needle_recall=False
    )
    assert [r["mean_accuracy"] for r in rows] == [1.0, 1.0] and rows[1]["accuracy_vs_dense"] == 1.0
    assert rows[0]["accuracy_ci"][0][0] < 1.0 == rows[0]["accuracy_ci"][0][1]
    assert rows[1]["prompt_right"] == [[True] * 3] and all(rows[1][f] is None for f in NEEDLE_FIELDS)


def test_cli_eval_decode_writes_json_and_markdown(plain_model, tokenizer, books_dir, tmp_path):  # noqa: F811
    from seerattn.cli import eval as cli_eval
    from seerattn.cli import main
    from seerattn.eval.decode import DECODE_METHODS as methods
    from seerattn.record import read_record

    assert cli_eval.DECODE_METHODS == ",".join(methods)  # the parser's default names the registry
    model = tmp_path / "model"
    plain_model.save_pretrained(model)
    tokenizer.save_pretrained(model)
    out = tmp_path / "out"
    args = ["eval", "decode", "--model", str(model), "--data", str(books_dir), "--context", str(CONTEXT)]
    args += ["--budget", str(4 * BS), "--samples", "2", "--tail", str(TAIL), "--passkey-samples", "1"]
    args += ["--depths", "0.5", "--methods", "dense,streaming,quest", "--resamples", "50", "--no-progress"]
    args += ["--block-size", str(BS)]
    assert main([*args, "--output", str(out)]) == 0
    record = read_record(out / "decode.json")
    assert record["kind"] == "decode" and record["config"]["budget"] == 4 * BS
    assert [r["method"] for r in record["results"]["ppl"]] == ["dense", "streaming", "quest"]
    assert [r["method"] for r in record["results"]["passkey"]] == ["dense", "streaming", "quest"]
    assert record["model"]["decode_gate"]["block_size"] == BS
    md = (out / "decode.md").read_text()
    assert "PPL last 64" in md and "| quest |" in md and "passkey" in md
    dense, streaming, quest = record["results"]["passkey"]
    assert (
        dense["needle_recall_by_step"] is None
        and len(quest["needle_recall_by_layer"]) == plain_model.config.num_hidden_layers
    )
    assert (
        "Needle recall" in md
        and "| streaming | all (1) | " in md
        and "| quest | wrong (" in md
        and "| depth 0.5 |" in md
    )
    args_pk = [
        *args,
        "--measure",
        "passkey",
        "--methods",
        "streaming",
        "--no-needle-recall",
        "--output",
        str(tmp_path / "z"),
    ]
    assert main(args_pk) == 0
    assert read_record(tmp_path / "z" / "decode.json")["results"]["passkey"][0]["needle_recall"] is None
    assert "Needle recall" not in (tmp_path / "z" / "decode.md").read_text()
    assert main([*args, "--methods", "seer", "--output", str(tmp_path / "x")]) == 2  # no decode gates
    assert main([*args, "--measure", "speed", "--output", str(tmp_path / "y")]) == 2


def test_an_adapter_without_decode_gates_is_refused_before_anything_is_attached(plain_model, tmp_path):  # noqa: F811
    """prepare_decode_model reads the adapter's sections first: a prefill-only adapter is refused with a message
    naming the missing section, and the model keeps its own attention (no gates, no seer state)."""
    from seerattn.gate import GateConfig
    from seerattn.hf import SeerConfig, apply_seer_attention, remove_seer_attention, save_gates

    shell = copy.deepcopy(plain_model)
    apply_seer_attention(shell, SeerConfig(gate=GateConfig(block_size=BS), mode="dense"))
    save_gates(shell, tmp_path / "prefill-only")
    remove_seer_attention(shell)
    model = copy.deepcopy(plain_model)
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="has no decode section"):
        prepare_decode_model(model, tmp_path / "prefill-only")
    assert getattr(model, "_seer_state", None) is None and model.config._attn_implementation == impl
    assert not any("seer_gate" in n for n, _ in model.named_parameters())


# ------------------------------------------------------------------------------ needle recall
def test_key_token_positions_are_the_needles_digit_tokens(tokenizer, books):  # noqa: F811
    from seerattn.eval.passkey import PasskeyTemplate, key_token_positions

    needle = len(tokenizer(PasskeyTemplate().needle.format(key="31415"), add_special_tokens=False)["input_ids"])
    for depth in (0.0, 0.5, 1.0):
        p = make_passkey_prompt(tokenizer, books.tokens(1, 400), CONTEXT, depth, "31415")
        pos = key_token_positions(tokenizer, p).tolist()
        texts = [tokenizer.decode([t]) for t in p.ids.tolist()]
        # the digits of the tokens found, in order, are the two mentions; no other token of the needle has one
        assert "".join(c for i in pos for c in texts[i] if c.isdigit()) == "31415" * 2
        assert p.needle_start < pos[0] and pos[-1] < p.needle_start + needle
        rest = [texts[i] for i in range(p.needle_start, p.needle_start + needle) if i not in pos]
        assert len(rest) == needle - len(pos) and not any(c.isdigit() for t in rest for c in t)
    other = PasskeyTemplate(needle=" The secret code is {key}. {key} it is.")
    with pytest.raises(ValueError, match="not this template's needle"):
        key_token_positions(tokenizer, p, other)
    with pytest.raises(ValueError, match="only plain {key} fields"):
        key_token_positions(tokenizer, p, PasskeyTemplate(needle=" The pass key is {key:>6}."))


def test_needle_summary_averages_steps_layers_heads_and_splits_right_from_wrong():
    import torch

    from seerattn.eval.decode import needle_summary

    # two prompts at one depth; S = 2 and 3 steps, L = 2 layers, Hkv = 2 heads
    a = torch.tensor([[[1, 1], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)  # right
    b = torch.tensor([[[1, 1], [1, 1]], [[1, 1], [0, 0]], [[0, 1], [0, 1]]], dtype=torch.bool)  # wrong
    out = needle_summary([[torch.tensor([3, 4]), torch.tensor([5])]], [[a, b]], [[True, False]])
    assert set(out) == set(NEEDLE_FIELDS)
    assert out["needle_blocks"] == [[[3, 4], [5]]]
    assert out["needle_recall"] == [[[[1.0, 0.5], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0], [0.5, 0.5]]]]
    assert out["needle_recall_by_step"] == pytest.approx([(0.75 + 1.0) / 2, (0.0 + 0.5) / 2, 0.5])
    assert out["needle_recall_by_step_right"] == pytest.approx([0.75, 0.0, None])
    assert out["needle_recall_by_step_wrong"] == pytest.approx([1.0, 0.5, 0.5])
    assert out["needle_recall_by_layer"] == pytest.approx([(1 + 0 + 1 + 1 + 0.5) / 5, (0.5 + 0 + 1 + 0 + 0.5) / 5])
    torch.testing.assert_close(torch.tensor(out["needle_recall_by_layer_head"]), torch.tensor([[3, 4], [2, 2]]) / 5)
    assert out["needle_recall_by_depth"] == pytest.approx([11 / 20])  # 11 of the 20 (step, layer, head) kept


def test_decode_passkey_needle_recall_follows_the_selection(dem, tokenizer, books, monkeypatch):  # noqa: F811
    """Every block kept: recall 1. First + current block only (StreamingLLM at 2 blocks): the needle, far from
    both, is never kept: 0. A hand-written selection keeping every block in KV head 0 only: 1 / Hkv."""
    import torch

    from seerattn.eval import decode as decode_mod

    def head0_all(_budget, req):
        hkv = req.k.shape[1]
        cur = (req.cache_seqlens.long() - 1) // req.block_size  # [B, N]
        nb = -(-req.k.shape[2] // req.block_size)
        j = torch.arange(nb)
        every = torch.where(j <= cur.unsqueeze(-1), j, -1)  # [B, N, NB]
        first_cur = torch.full_like(every, -1)
        first_cur[..., 0], first_cur[..., 1] = 0, cur
        idx = torch.stack([every] + [first_cur] * (hkv - 1), 1)  # [B, Hkv, N, NB]
        return idx.to(torch.int32).contiguous()

    hkv = dem.model.config.num_key_value_heads
    layers = dem.model.config.num_hidden_layers
    depths = [0.25, 0.5]
    kw = dict(progress=False)
    whole = evaluate_decode_passkey(
        dem, tokenizer, books, ["dense", "streaming"], CONTEXT, depths, 2, CONTEXT + BS, **kw
    )
    assert all(whole[0][f] is None for f in NEEDLE_FIELDS)  # dense selects nothing
    r = whole[1]
    assert (
        r["needle_recall_by_step"] == [1.0] * len(r["needle_recall_by_step"])
        and r["needle_recall_by_depth"] == [1.0] * 2
    )
    assert r["needle_recall_by_layer_head"] == [[1.0] * hkv] * layers
    steps = [len(p) for d in r["needle_recall"] for p in d]
    assert len(r["needle_recall_by_step"]) == max(steps) >= 6  # the answer's tokens + 1
    assert r["prompt_right"] == [[a == k for a, k in zip(d, r["keys"], strict=True)] for d in r["answers"]]

    monkeypatch.setitem(decode_mod._SELECT, "quest", head0_all)
    small = evaluate_decode_passkey(dem, tokenizer, books, ["streaming", "quest"], CONTEXT, depths, 2, 2 * BS, **kw)
    streaming, head0 = small
    last = (CONTEXT - 1) // BS
    assert all(0 not in bl and last not in bl for d in streaming["needle_blocks"] for bl in d)  # far from both kept
    for row, want in ((streaming, 0.0), (head0, 1 / hkv)):
        assert all(v == want for d in row["needle_recall"] for p in d for step in p for v in step), row["method"]
        assert row["needle_recall_by_layer"] == pytest.approx([want] * layers)
        assert row["needle_recall_by_depth"] == pytest.approx([want] * 2)
    assert head0["needle_recall_by_layer_head"] == [[1.0] + [0.0] * (hkv - 1)] * layers
