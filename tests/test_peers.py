"""XAttention and FlexPrefill in the eval harness: each estimator against a brute-force version of its
scoring (loops, full softmax, fp64), native selection against a brute-force cumulative threshold,
density-mode budgets equal to the other methods', and both end to end through ``seerattn eval ppl``.

Tiny CPU shapes only (T < 200, head dim 8-16); errors of the fp32 code are bounded by twice the error
of the same brute force run in fp32 (both against the fp64 brute force).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seerattn.block_mask import causal_block_mask, density_row_budget, num_blocks
from seerattn.eval import build_mask, expand_settings
from seerattn.eval.methods import realised_row_counts
from seerattn.eval.peers import (
    FLEX_MIN_BUDGET,
    flexprefill_estimate,
    flexprefill_native_mask,
    last_query_lines,
    xattention_scores,
)
from seerattn.hf import MaskRequest

PEERS = ("xattention", "flexprefill")
BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books"
if not (BOOKS / "MANIFEST.tsv").is_file():
    BOOKS = Path("/work/shared/data/books")


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _request(t: int, bs: int, b: int = 1, hq: int = 4, hkv: int = 2, d: int = 8, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64) * 1.5
    return MaskRequest(layer_idx=0, q=q.to(dtype), k=k.to(dtype), scale=d**-0.5, block_size=bs, seq_len=t)


def _as(req: MaskRequest, dtype) -> MaskRequest:
    return MaskRequest(req.layer_idx, req.q.to(dtype), req.k.to(dtype), req.scale, req.block_size, req.seq_len)


def _full_logits(req: MaskRequest, pad_to: int | None = None) -> torch.Tensor:
    """[B, Hq, T', T'] logits of q_i . k_j * scale, k repeated over GQA groups, zero-padded to ``pad_to``."""
    q, k = req.q, req.k
    g = q.shape[1] // k.shape[1]
    if pad_to is not None:
        q = torch.nn.functional.pad(q, (0, 0, 0, pad_to - q.shape[2]))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad_to - k.shape[2]))
    return q @ k.repeat_interleave(g, dim=1).transpose(-1, -2) * req.scale


def _check_close(got: torch.Tensor, oracle: torch.Tensor, low: torch.Tensor) -> None:
    """fp32 result vs the fp64 oracle: at most 2x the error of the fp32 brute force, plus a small epsilon."""
    bound = 2 * (low.double() - oracle).abs().max().item() + 1e-6
    err = (got.double() - oracle).abs().max().item()
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g}"


# ------------------------------------------------------------------------------ XAttention scoring
def _xattention_brute(req: MaskRequest, stride: int) -> torch.Tensor:
    """The scoring of :func:`xattention_scores`, written out with loops over reduced rows and columns."""
    bs, t = req.block_size, req.seq_len
    nb = num_blocks(t, bs)
    n, per = nb * bs // stride, bs // stride
    logits = _full_logits(req, nb * bs)  # [B, H, NB*bs, NB*bs]
    b, h = logits.shape[:2]
    red = torch.full((b, h, n, n), -math.inf, dtype=logits.dtype)
    for i in range(n):
        for j in range(n):
            if j <= i and j * stride < t:
                anti = sum(logits[:, :, i * stride + stride - 1 - m, j * stride + m] for m in range(stride))
                red[:, :, i, j] = anti / stride
    probs = red.softmax(-1)
    out = torch.zeros(b, h, nb, nb, dtype=logits.dtype)
    for i in range(n):
        if i * stride >= t:
            continue
        for j in range(n):
            out[:, :, i // per, j // per] += probs[:, :, i, j]
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize(
    ("t", "bs", "stride", "chunk"),
    [(16 * 5 + 3, 16, 8, 2**28), (16 * 5 + 3, 16, 8, 1), (32 * 3 + 9, 32, 8, 64), (64 * 2, 64, 16, 2**28)],
)
def test_xattention_scores_match_brute_force(t, bs, stride, chunk):
    """GQA, T not a multiple of the block or the stride, several chunks (chunk=1: one block per chunk)."""
    req = _request(t, bs, b=2)
    oracle = _xattention_brute(_as(req, torch.float64), stride)
    low = _xattention_brute(req, stride)
    got = xattention_scores(req, stride, chunk_elements=chunk)
    nb = num_blocks(t, bs)
    assert got.shape == (2, 4, nb, nb) and got.dtype == torch.float32
    assert not got[..., ~causal_block_mask(nb)].any()
    _check_close(got, oracle, low)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, nb))


def test_xattention_rejects_a_stride_that_does_not_divide_the_block():
    with pytest.raises(ValueError, match="positive divisor of block_size=16"):
        xattention_scores(_request(40, 16), stride=5)


def test_xattention_antidiagonals_find_a_planted_column():
    """Every query attends to key block 2 (a vertical line, one token wide): it outranks every other block."""
    t, bs, d = 128, 16, 16
    q = torch.zeros(1, 1, t, d)
    k = torch.randn(1, 1, t, d, generator=torch.Generator().manual_seed(3)) * 0.1
    q[..., 0] = 8.0
    k[0, 0, 37, 0] = 2.0  # token 37 is in block 2
    scores = xattention_scores(MaskRequest(0, q, k, 1.0, bs, t))[0, 0]
    for i in range(3, t // bs):
        assert scores[i].argmax().item() == 2, scores[i]


# ------------------------------------------------------------------------------ FlexPrefill scoring
def _flexprefill_brute(req: MaskRequest, tau: float) -> dict:
    """FlexPrefill's estimate with loops: last-block shares, pooled estimate, JS distance, pooled block map."""
    bs, t = req.block_size, req.seq_len
    nb = num_blocks(t, bs)
    b, h = req.q.shape[:2]
    g = h // req.k.shape[1]
    probs = _full_logits(req).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    n_last = min(bs, t)
    last = probs[:, :, t - n_last :]  # [B, H, L, T]
    vertical = last.sum(2) / n_last
    slash = torch.zeros(b, h, t, dtype=probs.dtype)
    for li, i in enumerate(range(t - n_last, t)):
        for j in range(i + 1):
            slash[:, :, i - j] += last[:, :, li, j] / n_last
    true_blocks = torch.stack([vertical[..., j * bs : (j + 1) * bs].sum(-1) for j in range(nb)], -1)
    k_mean = torch.stack([req.k[:, :, j * bs : (j + 1) * bs].mean(2) for j in range(nb)], 2)  # [B, Hkv, NB, D]
    q_mean = torch.stack([req.q[:, :, j * bs : (j + 1) * bs].mean(2) for j in range(nb)], 2)  # [B, Hq, NB, D]
    k_mean = k_mean.repeat_interleave(g, dim=1)
    est = (req.q[:, :, t - n_last :].mean(2, keepdim=True) @ k_mean.transpose(-1, -2) * req.scale)[:, :, 0].softmax(-1)
    js = torch.zeros(b, h, dtype=probs.dtype)
    for bi in range(b):
        for hi in range(h):
            p, r = est[bi, hi], true_blocks[bi, hi]
            m = (p + r) / 2
            kl = sum(float(x) * math.log(float(x) / float(y)) for x, y in zip(p, m, strict=True) if x > 0)
            kl += sum(float(x) * math.log(float(x) / float(y)) for x, y in zip(r, m, strict=True) if x > 0)
            js[bi, hi] = math.sqrt(max(kl / 2, 0.0))
    pooled = (q_mean @ k_mean.transpose(-1, -2) * req.scale).masked_fill(~causal_block_mask(nb), -math.inf)
    return {
        "vertical": vertical,
        "slash": slash,
        "vertical_blocks": true_blocks,
        "js": js,
        "query_aware": js < tau,
        "pooled": pooled.softmax(-1),
    }


@pytest.mark.parametrize(("t", "bs"), [(16 * 6 + 5, 16), (32 * 3 + 7, 32), (64 * 2 + 1, 64)])
def test_flexprefill_estimate_matches_brute_force(t, bs):
    req = _request(t, bs, b=2, hq=6, hkv=2)
    oracle = _flexprefill_brute(_as(req, torch.float64), tau=0.1)
    low = _flexprefill_brute(req, tau=0.1)
    # a tau between the heads' distances, so that both patterns occur
    tau = oracle["js"].flatten().sort().values[5:7].mean().item()
    est = flexprefill_estimate(req, tau)
    for key in ("vertical", "slash", "vertical_blocks", "js", "pooled"):
        _check_close(getattr(est, key), oracle[key], low[key])
    assert torch.equal(est.query_aware, oracle["js"] < tau)
    assert est.query_aware.any() and not est.query_aware.all()
    qa = est.query_aware.view(2, 6, 1, 1).expand_as(est.scores)
    assert torch.equal(est.scores[qa], est.pooled[qa]) and not torch.equal(est.scores[~qa], est.pooled[~qa])


def test_last_query_lines_sum_to_one():
    req = _request(75, 16)
    vertical, slash = last_query_lines(req, 16)
    torch.testing.assert_close(vertical.sum(-1), torch.ones(1, 4))
    torch.testing.assert_close(slash.sum(-1), torch.ones(1, 4))


# ---------------------------------------------------------------------------- native selection
def _cover_brute(values: list[float], p: float) -> set[int]:
    """Indices of the fewest largest values whose sum reaches p of the total (ties: lower index first)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    total, acc, kept = sum(values), 0.0, set()
    for i in order:
        if acc >= p * total:
            break
        kept.add(i)
        acc += values[i]
    return kept


@pytest.mark.parametrize(("t", "bs", "tau"), [(16 * 8 + 5, 16, 0.9), (32 * 4, 32, 0.5)])
def test_xattention_native_keeps_the_fewest_blocks_reaching_the_threshold(t, bs, tau):
    req = _request(t, bs)
    scores = xattention_scores(req)
    mask = build_mask("xattention_top_p", req, tau).to_dense()
    nb = num_blocks(t, bs)
    for h in range(4):
        for i in range(nb):
            want = _cover_brute(scores[0, h, i, : i + 1].tolist(), tau) | {0, i}
            assert set(mask[0, h, i].nonzero().flatten().tolist()) == want, (h, i)


def _flexprefill_native_brute(est, t: int, bs: int, gamma: float, min_budget: int) -> torch.Tensor:
    b, h, nb = est.vertical_blocks.shape
    keep = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    m = min(nb, -(-min_budget // bs))
    for bi in range(b):
        for hi in range(h):
            if est.query_aware[bi, hi]:
                cells = [(i, j) for i in range(nb) for j in range(i + 1)]
                for c in _cover_brute([est.pooled[bi, hi, i, j].item() for i, j in cells], gamma):
                    keep[bi, hi, cells[c][0], cells[c][1]] = True
            else:
                cols = _cover_brute(est.vertical[bi, hi].tolist(), gamma)
                offs = _cover_brute(est.slash[bi, hi].tolist(), gamma)
                for i in range(nb):
                    for j in range(i + 1):
                        tokens_i, tokens_j = range(i * bs, (i + 1) * bs), range(j * bs, (j + 1) * bs)
                        crossed = {a - c for a in tokens_i for c in tokens_j}
                        if any(c // bs == j for c in cols) or crossed & offs:
                            keep[bi, hi, i, j] = True
            top_v = sorted(range(nb), key=lambda j: -est.vertical_blocks[bi, hi, j].item())[:m]
            top_s = sorted(range(nb), key=lambda d: -est.slash_blocks[bi, hi, d].item())[:m]
            for i in range(nb):
                for j in range(i + 1):
                    if j in top_v or i - j in top_s or j == 0 or j == i:
                        keep[bi, hi, i, j] = True
    return keep


@pytest.mark.parametrize(("gamma", "min_budget"), [(0.9, 0), (0.6, 0), (0.9, 48)])
def test_flexprefill_native_matches_brute_force_selection(gamma, min_budget):
    t, bs = 16 * 7 + 6, 16
    req = _request(t, bs, b=2, hq=6, hkv=2, seed=4)
    est0 = flexprefill_estimate(req)
    tau = est0.js.flatten().sort().values[5:7].mean().item()  # both head kinds
    est = flexprefill_estimate(req, tau)
    assert est.query_aware.any() and not est.query_aware.all()
    got = flexprefill_native_mask(est, req, gamma, min_budget).to_dense()
    assert torch.equal(got, _flexprefill_native_brute(est, t, bs, gamma, min_budget))


def test_flexprefill_native_maps_planted_lines_to_the_blocks_they_cross():
    """A vertical-slash head whose last queries look at one key (token 37, block 2) and one offset (24:
    between block diagonals 1 and 2), and a query-aware head with all its pooled mass on block (5, 3)."""
    from seerattn.eval.peers import FlexPrefillEstimate

    t, bs, nb = 16 * 6, 16, 6
    req = _request(t, bs, hq=2, hkv=1)
    vertical, slash = torch.zeros(1, 2, t), torch.zeros(1, 2, t)
    vertical[0, :, 37] = 1.0
    slash[0, :, 24] = 1.0
    pooled = torch.zeros(1, 2, nb, nb)
    pooled[0, :, 5, 3] = 1.0
    zeros = torch.zeros(1, 2, nb)
    est = FlexPrefillEstimate(
        torch.tensor([[False, True]]), torch.zeros(1, 2), vertical, slash, zeros, zeros, pooled, pooled
    )
    got = flexprefill_native_mask(est, req, 0.9, min_budget=0).to_dense()[0]
    for i in range(nb):
        vs = {0, i} | ({2} if i >= 2 else set()) | {i - d for d in (1, 2) if i - d >= 0}
        assert set(got[0, i].nonzero().flatten().tolist()) == vs, i
        assert set(got[1, i].nonzero().flatten().tolist()) == {0, i} | ({3} if i == 5 else set()), i


def test_flexprefill_native_rejects_bad_values():
    req = _request(40, 16)
    est = flexprefill_estimate(req)
    with pytest.raises(ValueError, match="gamma must be in"):
        flexprefill_native_mask(est, req, 1.5)
    with pytest.raises(ValueError, match="min_budget"):
        flexprefill_native_mask(est, req, 0.9, -1)


# ------------------------------------------------------------------------- registry and budgets
@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize(("t", "bs"), [(16 * 12 + 5, 16), (32 * 7 + 3, 32), (64 * 4 + 9, 64), (128 * 2 + 1, 128)])
@pytest.mark.parametrize("density", [0.5, 0.2])
def test_density_mode_keeps_the_same_blocks_per_row_as_every_method(name, t, bs, density):
    req = _request(t, bs, b=2)
    mask = build_mask(name, req, density)
    nb = num_blocks(t, bs)
    dense = mask.to_dense()
    assert mask.shape == (2, 4, nb, nb) and mask.seq_len == t
    assert not (dense & ~causal_block_mask(nb)).any()
    counts = realised_row_counts(mask)
    for other in ("streaming", "random", "vertical_slash"):
        assert torch.equal(counts, realised_row_counts(build_mask(other, req, density)))
    forced = torch.tensor([1] + [2] * (nb - 1))
    assert torch.equal(counts, torch.maximum(density_row_budget(nb, density), forced).expand_as(counts))
    assert dense[..., 0].all() and dense.diagonal(dim1=-2, dim2=-1).all()


@pytest.mark.parametrize("name", [f"{p}_top_p" for p in PEERS])
@pytest.mark.parametrize(("t", "bs"), [(16 * 12 + 5, 16), (64 * 3 + 9, 64)])
def test_native_mode_keeps_sink_and_diagonal_and_no_empty_row(name, t, bs):
    req = _request(t, bs, b=2)
    mask = build_mask(name, req, 0.9)
    nb = num_blocks(t, bs)
    dense = mask.to_dense()
    assert not (dense & ~causal_block_mask(nb)).any()
    assert (realised_row_counts(mask) >= 1).all()
    assert dense[..., 0].all() and dense.diagonal(dim1=-2, dim2=-1).all()
    assert 0 < mask.density() <= 1


def test_native_methods_take_top_p_values_and_density_methods_densities():
    got = expand_settings(["xattention", "xattention_top_p", "flexprefill_top_p"], [0.1], top_ps=[0.9, 0.95])
    assert [s.label for s in got] == [
        "xattention@0.1",
        "xattention_top_p@0.9",
        "xattention_top_p@0.95",
        "flexprefill_top_p@0.9",
        "flexprefill_top_p@0.95",
    ]
    assert got[1].policy.kind == "top_p" and got[0].policy.kind == "density"
    with pytest.raises(ValueError, match="needs at least one top_p"):
        expand_settings(["flexprefill_top_p"], [0.1])


def test_flexprefill_min_budget_default_is_the_papers():
    assert FLEX_MIN_BUDGET == 1024


# ------------------------------------------------------------------------------- end to end (CLI)
def test_cli_eval_ppl_runs_xattention_and_flexprefill(tmp_path):
    """``seerattn eval ppl --methods dense,xattention,flexprefill,...`` on a tiny saved Llama (with a
    byte-level tokenizer without merges built here), density and native settings reported."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from hf_models import make_model
    from transformers import PreTrainedTokenizerFast

    from seerattn.cli import main

    if not (BOOKS / "MANIFEST.tsv").is_file():
        pytest.skip(f"books corpus not found at {BOOKS}")
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))  # no merges: one token per byte
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    model = make_model("llama", vocab_size=len(fast), max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    model.save_pretrained(tmp_path / "model")
    fast.save_pretrained(tmp_path / "model")
    args = ["eval", "ppl", "--model", str(tmp_path / "model"), "--data", str(BOOKS), "--max-books", "1"]
    args += ["--block-size", "16", "--no-progress", "--contexts", "144", "--samples", "1", "--densities", "0.3"]
    args += ["--methods", "dense,xattention,flexprefill,xattention_top_p,flexprefill_top_p", "--top-p", "0.9"]
    assert main([*args, "-o", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "ppl.json").read_text())["results"]
    by = {r["label"]: r for r in rows}
    assert set(by) == {"dense", "xattention@0.3", "flexprefill@0.3", "xattention_top_p@0.9", "flexprefill_top_p@0.9"}
    nb = num_blocks(144, 16)
    forced = torch.tensor([1] + [2] * (nb - 1))
    want = torch.maximum(density_row_budget(nb, 0.3), forced).sum().item() / (nb * (nb + 1) / 2)
    for label in ("xattention@0.3", "flexprefill@0.3"):
        assert by[label]["density"] == pytest.approx(want, abs=1e-9), label
        assert math.isfinite(by[label]["ppl"]) and by[label]["ppl"] > 1
    for label in ("xattention_top_p@0.9", "flexprefill_top_p@0.9"):
        assert 0 < by[label]["density"] <= 1 and math.isfinite(by[label]["ppl"])


# ---------------------------------------------------------------------------------- benchmarks
def test_benchmarks_run_in_their_cpu_smoke_configuration(tmp_path):
    """``benchmarks.mask_cost --smoke`` and ``benchmarks.prefill --smoke`` run every peer and write run records."""
    pytest.importorskip("transformers")
    from benchmarks import mask_cost, prefill
    from seerattn.record import read_record

    methods = "seer,xattention,xattention_top_p,flexprefill,flexprefill_top_p"
    assert (
        mask_cost.main(
            ["--smoke", "--seqlens", "80", "--reps", "1", "--methods", methods, "--json", str(tmp_path / "m.json")]
        )
        == 0
    )
    rows = read_record(tmp_path / "m.json")["results"]
    assert {r["method"] for r in rows} == {
        "seer@0.1",
        "seer@0.1/kv",
        "xattention@0.1",
        "xattention (score)",
        "xattention_top_p@0.9",
        "flexprefill@0.1",
        "flexprefill (score)",
        "flexprefill_top_p@0.9",
    }
    assert all(r["ms"] > 0 for r in rows)
    args = ["--smoke", "--seqlens", "96", "--layers", "1", "--block-sizes", "16", "--methods", methods]
    assert prefill.main([*args, "--densities", "0.3", "--json", str(tmp_path / "p.json")]) == 0
    rows = read_record(tmp_path / "p.json")["results"]
    by = {r["method"]: r for r in rows}
    assert set(by) == {"sdpa", "seer@0.3/b16", "xattention@0.3/b16", "xattention_top_p@0.9/b16"} | {
        "flexprefill@0.3/b16",
        "flexprefill_top_p@0.9/b16",
    }
    nb = num_blocks(96, 16)
    want = torch.maximum(density_row_budget(nb, 0.3), torch.tensor([1] + [2] * (nb - 1))).sum().item()
    for label in ("seer@0.3/b16", "xattention@0.3/b16", "flexprefill@0.3/b16"):
        assert by[label]["density"] == pytest.approx(want / (nb * (nb + 1) / 2)), label
    # every sparse row records the kernel tuner's picks (none on the CPU: tuning is off under the tests)
    assert all(by[label]["tuning"] == {} for label in by if label != "sdpa")
