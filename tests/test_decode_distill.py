"""Decode-gate distillation: the loss and metrics against brute force, and ``seerattn distill`` with
``gate_kind: decode`` on the tiny Llama of test_distill (CPU, 16-token blocks, rows of 128 tokens).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from seerattn.gate import DecodeGate, DecodeGateConfig, decode_gate_loss, decode_gate_metrics
from seerattn.ops.reference import decode_block_scores

BS = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(t=70, hkv=2, seed=0):
    """Decode-gate logits of a random gate and the decode target of random q/k: [1, Hkv, T, NB] each."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gate = DecodeGate(2 * hkv, hkv, 8, DecodeGateConfig(block_size=BS, use_rope=False)).double()
    q = torch.randn(1, 2 * hkv, t, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, hkv, t, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return gate(q, k), decode_block_scores(3 * q, k, BS)  # 3 q: a peaked target


def test_decode_gate_loss_equals_brute_force_and_ignores_rows_without_blocks():
    logits, target = _pair()
    logits.requires_grad_(True)
    for skip in (0, 20):
        loss = decode_gate_loss(logits, target, skip_rows=skip)
        rows = []
        for h in range(2):
            for i in range(max(skip, BS), 70):  # rows < BS score no block: excluded
                n = i // BS
                p = torch.softmax(logits[0, h, i, :n].detach(), -1)
                t = target[0, h, i, :n]
                rows.append(sum(float(t[j] * math.log(t[j] / p[j])) for j in range(n) if t[j] > 0))
        assert loss.item() == pytest.approx(sum(rows) / len(rows), rel=1e-6)  # fp32 loss
    loss.backward()
    assert torch.isfinite(logits.grad).all()  # the empty rows' -inf logits give no NaN
    assert (logits.grad[:, :, :BS] == 0).all() and logits.grad[:, :, BS:].abs().sum() > 0
    # the target itself is the minimum: KL 0
    perfect = torch.where(target > 0, target.log(), float("-inf")).masked_fill(~torch.isfinite(logits), float("-inf"))
    assert decode_gate_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        decode_gate_loss(logits, target[..., :-1])


def test_decode_gate_metrics_equal_brute_force():
    t = 200
    logits, target = _pair(t=t, hkv=1, seed=3)
    budget = 0.25
    got = decode_gate_metrics(logits, target, budget, BS)
    mass, oracle, hits, total, n_rows = 0.0, 0.0, 0, 0, 0
    for i in range(BS, t):
        n = i // BS  # completed blocks
        slots = max(int(budget * (i + 1)) // BS - 1, 1)  # the current block takes one of the K slots
        lg, tg = logits[0, 0, i, :n], target[0, 0, i, :n]
        pred = {0, *(1 + lg[1:].argsort(descending=True)[: slots - 1]).tolist()}
        true = {0, *(1 + tg[1:].argsort(descending=True)[: slots - 1]).tolist()}
        mass += float(tg[sorted(pred)].sum())
        oracle += float(tg[sorted(true)].sum())
        hits, total, n_rows = hits + len(pred & true), total + len(true), n_rows + 1
    assert got["mass_recall"] == pytest.approx(mass / n_rows, rel=1e-6)
    assert got["oracle_mass_recall"] == pytest.approx(oracle / n_rows, rel=1e-6)
    assert got["block_recall"] == pytest.approx(hits / total, rel=1e-6)
    assert got["mass_recall"] < got["oracle_mass_recall"] < 1.0
    # a larger budget keeps more (the current, partial block takes a whole slot: 1.0 is not everything)
    more = decode_gate_metrics(logits, target, 1.0, BS)
    assert got["mass_recall"] < more["mass_recall"] < 1.0 and more["oracle_mass_recall"] > got["oracle_mass_recall"]
    with pytest.raises(ValueError, match="budget"):
        decode_gate_metrics(logits, target, 0.0, BS)


def _read(path):
    return json.loads(path.read_text())
