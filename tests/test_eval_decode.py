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
    for m in ("seer", "streaming", "quest"):
        r = by[m]
        assert r["ppl_tail"] != pytest.approx(dense["ppl_tail"], rel=1e-4), m
        assert 0.25 < r["density"] < 0.45, (m, r["density"])  # 4 of 11..14 blocks
        assert r["ppl_tail_vs_dense"] == pytest.approx(r["ppl_tail"] / dense["ppl_tail"] - 1)
        lo, hi = r["ppl_tail_vs_dense_ci"]
        assert lo <= r["ppl_tail_vs_dense"] <= hi
    assert by["streaming"]["ppl_tail"] != pytest.approx(by["quest"]["ppl_tail"], rel=1e-6)
    with pytest.raises(ValueError, match="no decode gates were loaded|none were loaded"):
        evaluate_decode_ppl(dem, books, ["seer"], CONTEXT, 1, budget=4 * BS, tail=TAIL, progress=False)
    with pytest.raises(ValueError, match="unknown decode methods"):
        evaluate_decode_ppl(dem, books, ["oracle"], CONTEXT, 1, budget=4 * BS, tail=TAIL, progress=False)
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

    monkeypatch.setattr(decode_mod, "decode_answer", knows_the_key)
    rows = evaluate_decode_passkey(dem, tokenizer, books, ["dense", "quest"], CONTEXT, [0.5], 3, 4 * BS, progress=False)
    assert [r["mean_accuracy"] for r in rows] == [1.0, 1.0] and rows[1]["accuracy_vs_dense"] == 1.0
    assert rows[0]["accuracy_ci"][0][0] < 1.0 == rows[0]["accuracy_ci"][0][1]


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
