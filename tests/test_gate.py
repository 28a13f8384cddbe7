"""AttnGate, block pooling, RoPE of gate vectors, distillation loss and metrics (no transformers).

Every expected value is computed here by hand (loops over blocks, explicit formulas); nothing reuses
the library's code path it checks, except ``apply_rotary`` inside the logits check (tested itself
against the complex-number form of RoPE first).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from seerattn.gate import AttnGate, GateConfig, apply_rotary, gate_loss, gate_metrics, pool_blocks

torch.set_default_dtype(torch.float32)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _brute_pool(x: torch.Tensor, bs: int, poolings) -> torch.Tensor:
    """Per-block loop: x [B, H, T, D] -> [B, H, NB, len(poolings) * D]."""
    t = x.shape[2]
    blocks = []
    for s in range(0, t, bs):
        chunk = x[:, :, s : min(s + bs, t)]
        parts = []
        for p in poolings:
            if p == "avg":
                parts.append(chunk.sum(2) / chunk.shape[2])
            elif p == "max":
                parts.append(chunk.max(2).values)
            else:
                parts.append(chunk.min(2).values)
        blocks.append(torch.cat(parts, -1))
    return torch.stack(blocks, 2)


def _rope_tables(positions: torch.Tensor, dim: int, theta: float = 10000.0):
    """cos, sin [1, N, dim] in HF's layout (frequencies repeated on both halves)."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = positions.double()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos()[None], emb.sin()[None]


# ------------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("t", [1, 15, 16, 17, 40, 64])
@pytest.mark.parametrize("poolings", [("avg",), ("max", "min", "avg"), ("min", "max")])
def test_pool_blocks_matches_per_block_loop(t, poolings):
    x = _randn(2, 3, t, 8, seed=t)
    got = pool_blocks(x, 16, poolings)
    want = _brute_pool(x, 16, poolings)
    assert got.shape == (2, 3, -(-t // 16), len(poolings) * 8)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_pool_blocks_partial_last_block_uses_only_its_tokens():
    # 20 tokens in blocks of 16: the last block has 4 tokens; padding must not leak into avg/max/min.
    x = -torch.ones(1, 1, 20, 2, dtype=torch.float64)
    x[..., 16:, :] = torch.tensor([-3.0, -5.0], dtype=torch.float64)
    out = pool_blocks(x, 16, ("avg", "max", "min"))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([-3.0, -5.0, -3.0, -5.0, -3.0, -5.0], dtype=torch.float64))


@pytest.mark.parametrize("t", [16, 37])
def test_pool_blocks_reads_low_precision_strided_input_into_an_fp32_result(t):
    """The gate pools bf16 activations in their [B, T, H, D] layout (a transposed view) straight into
    fp32: the same as pooling an fp32 copy (sums accumulate in fp32, max/min are exact)."""
    x = _randn(2, t, 3, 8, seed=t).to(torch.bfloat16).transpose(1, 2)  # [B, H, T, D], not contiguous
    got = pool_blocks(x, 16, ("avg", "max", "min"), torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _brute_pool(x.double(), 16, ("avg", "max", "min")).float(), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- RoPE
def test_apply_rotary_equals_complex_rotation():
    d, n = 8, 5
    x = _randn(1, 2, n, d, seed=3)
    pos = torch.arange(n) * 16
    cos, sin = _rope_tables(pos, d)
    got = apply_rotary(x, cos, sin)
    # HF rotate-half pairs channel i with i + d/2: (a + i b) * exp(i * angle).
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(
        torch.ones(n, d // 2, dtype=torch.float64), pos.double()[:, None] * inv
    )
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------- AttnGate
def _hand_logits(gate: AttnGate, q, k, cos, sin):
    """pool -> repeat K over the GQA group -> per-head projection -> RoPE -> QK^T / sqrt(Dg), causal."""
    cfg = gate.config
    hq, hkv = q.shape[1], k.shape[1]
    qp = _brute_pool(q, cfg.block_size, cfg.q_pooling)
    kp = _brute_pool(k, cfg.block_size, cfg.k_pooling)
    kp = torch.stack([kp[:, h // (hq // hkv)] for h in range(hq)], 1)
    kw = gate.k_proj.detach().double()
    kg = torch.stack([kp[:, h] @ kw[h] for h in range(hq)], 1)
    if gate.q_proj is not None:
        qw = gate.q_proj.detach().double()
        qg = torch.stack([qp[:, h] @ qw[h] for h in range(hq)], 1)
    else:
        qg = qp
    if cfg.use_rope:
        qg, kg = apply_rotary(qg, cos, sin), apply_rotary(kg, cos, sin)
    nb = qg.shape[2]
    logits = torch.full((q.shape[0], hq, nb, nb), float("-inf"), dtype=torch.float64)
    for i in range(nb):
        for j in range(i + 1):
            logits[:, :, i, j] = (qg[:, :, i] * kg[:, :, j]).sum(-1) / math.sqrt(gate.gate_dim)
    return logits


@pytest.mark.parametrize(
    "hq,hkv,cfg",
    [
        (4, 2, GateConfig(block_size=16)),
        (4, 1, GateConfig(block_size=16, q_pooling=("avg", "max"), gate_dim=8)),
        (2, 2, GateConfig(block_size=8, k_pooling=("avg",), use_rope=False)),
    ],
    ids=["default-gqa2", "qproj-dg8-gqa4", "norope-mha"],
)
def test_attn_gate_logits_equal_hand_computation(hq, hkv, cfg):
    d, t, b = 16, 45, 2
    gate = AttnGate(hq, hkv, d, cfg).double()
    with torch.no_grad():  # random weights, not the identity init, so every channel matters
        gate.k_proj.normal_(generator=torch.Generator().manual_seed(5))
        if gate.q_proj is not None:
            gate.q_proj.normal_(generator=torch.Generator().manual_seed(6))
    q, k = _randn(b, hq, t, d, seed=1), _randn(b, hkv, t, d, seed=2)
    nb = -(-t // cfg.block_size)
    cos, sin = _rope_tables(torch.arange(nb) * cfg.block_size, gate.gate_dim) if cfg.use_rope else (None, None)
    got = gate(q, k, cos, sin)
    want = _hand_logits(gate, q, k, cos, sin)
    assert got.dtype == torch.float32 and got.shape == (b, hq, nb, nb)
    above = ~torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.isneginf(got[..., above]).all() and torch.isfinite(got[..., ~above]).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_untrained_gate_scores_avg_pooled_q_dot_avg_pooled_k():
    gate = AttnGate(2, 1, 8, GateConfig(block_size=4, use_rope=False)).double()
    q, k = _randn(1, 2, 12, 8, seed=7), _randn(1, 1, 12, 8, seed=8)
    qa, ka = _brute_pool(q, 4, ("avg",)), _brute_pool(k, 4, ("avg",))
    want = (qa @ ka.transpose(-1, -2)) / math.sqrt(8)
    got = gate(q, k)
    tri = torch.ones(3, 3, dtype=torch.bool).tril()
    torch.testing.assert_close(got[..., tri].double(), want.expand(1, 2, 3, 3)[..., tri], atol=1e-6, rtol=1e-6)


def test_q_projection_rules():
    d = 16
    assert AttnGate(4, 2, d, GateConfig()).q_proj is None  # avg-only Q at the head width: no projection
    g = AttnGate(4, 2, d, GateConfig(q_pooling=("avg", "max")))
    assert g.has_q_proj and tuple(g.q_proj.shape) == (4, 2 * d, d)
    g = AttnGate(4, 2, d, GateConfig(gate_dim=8))
    assert tuple(g.q_proj.shape) == (4, d, 8) and tuple(g.k_proj.shape) == (4, 3 * d, 8)
    # An explicit identity-initialised q projection changes nothing.
    q, k = _randn(1, 4, 20, d, seed=1).float(), _randn(1, 2, 20, d, seed=2).float()
    plain = AttnGate(4, 2, d, GateConfig(block_size=8, use_rope=False))
    with_q = AttnGate(4, 2, d, GateConfig(block_size=8, use_rope=False, q_projection=True))
    assert with_q.q_proj is not None
    torch.testing.assert_close(with_q(q, k), plain(q, k), atol=1e-6, rtol=0)
    for bad in (
        GateConfig(q_pooling=("avg", "max"), q_projection=False),
        GateConfig(gate_dim=8, q_projection=False),
    ):
        with pytest.raises(ValueError, match="q_projection=False"):
            AttnGate(4, 2, d, bad)


def test_attn_gate_bad_inputs():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttnGate(3, 2, 16)
    gate = AttnGate(4, 2, 16, GateConfig(block_size=16))
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError, match="built for Hq=4"):
        gate(q, torch.randn(1, 4, 32, 16))
    with pytest.raises(ValueError, match="needs cos and sin"):
        gate(q, k)
    cos = torch.ones(1, 3, 16)
    with pytest.raises(ValueError, match="cos/sin must be"):
        gate(q, k, cos, cos)


def _hand_window_logits(gate: AttnGate, q, k, positions):
    """q_subblock gate by loops: per block I and key block J <= I, log(sum over I's query windows w of
    exp(q_w . k_J / sqrt(Dg))), q_w pooled over its window and rotated at the window's first token."""
    cfg = gate.config
    hq, hkv, t = q.shape[1], k.shape[1], q.shape[2]
    bs, step = cfg.block_size, cfg.q_subblock
    kp = _brute_pool(k, bs, cfg.k_pooling)
    kw = gate.k_proj.detach().double()
    kg = torch.stack([kp[:, h // (hq // hkv)] @ kw[h] for h in range(hq)], 1)  # [B, Hq, NB, Dg]
    qp = _brute_pool(q, step, cfg.q_pooling)
    qg = qp if gate.q_proj is None else torch.stack([qp[:, h] @ gate.q_proj.detach().double()[h] for h in range(hq)], 1)
    if cfg.use_rope:
        qg = apply_rotary(qg, *_rope_tables(positions[::step], gate.gate_dim))
        kg = apply_rotary(kg, *_rope_tables(positions[::bs], gate.gate_dim))
    nb = kg.shape[2]
    logits = torch.full((q.shape[0], hq, nb, nb), float("-inf"), dtype=torch.float64)
    for i in range(nb):
        windows = range(i * bs // step, min((i + 1) * bs, t + step - 1) // step)
        for j in range(i + 1):
            s = torch.stack([(qg[:, :, w] * kg[:, :, j]).sum(-1) for w in windows], -1) / math.sqrt(gate.gate_dim)
            logits[:, :, i, j] = s.exp().sum(-1).log()
    return logits


@pytest.mark.parametrize(
    "t,cfg",
    [
        (45, GateConfig(block_size=16, q_subblock=4)),  # partial last block and partial last window
        (64, GateConfig(block_size=16, q_subblock=1, q_pooling=("avg", "max"), gate_dim=8)),  # token queries
        (37, GateConfig(block_size=8, q_subblock=2, use_rope=False)),
    ],
    ids=["w4-rope", "w1-qproj", "w2-norope"],
)
def test_query_windows_equal_hand_computation(t, cfg):
    hq, hkv, d, b = 4, 2, 16, 2
    gate = AttnGate(hq, hkv, d, cfg).double()
    with torch.no_grad():
        gate.k_proj.normal_(generator=torch.Generator().manual_seed(5))
        if gate.q_proj is not None:
            gate.q_proj.normal_(generator=torch.Generator().manual_seed(6))
    q, k = _randn(b, hq, t, d, seed=1), _randn(b, hkv, t, d, seed=2)
    positions = torch.arange(t) + 3  # not starting at 0: tables must follow the positions given
    cos, sin = _rope_tables(positions[:: cfg.q_subblock], gate.gate_dim) if cfg.use_rope else (None, None)
    got = gate(q, k, cos, sin)
    want = _hand_window_logits(gate, q, k, positions)
    nb = -(-t // cfg.block_size)
    assert got.shape == (b, hq, nb, nb)
    above = ~torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.isneginf(got[..., above]).all() and torch.isfinite(got[..., ~above]).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_query_windows_of_one_block_size_are_the_plain_gate_and_gradients_stay_finite():
    q, k = _randn(1, 4, 40, 16, seed=3).float(), _randn(1, 2, 40, 16, seed=4).float()
    cos, sin = _rope_tables(torch.arange(0, 40, 8), 16)
    plain = AttnGate(4, 2, 16, GateConfig(block_size=8))
    same = AttnGate(4, 2, 16, GateConfig(block_size=8, q_subblock=8))
    same.load_state_dict(plain.state_dict())
    assert torch.equal(same(q, k, cos.float(), sin.float()), plain(q, k, cos.float(), sin.float()))
    # Identical queries in every window: log-sum-exp over r equal windows = plain logit + log r, and
    # the softmax over key blocks does not change.
    qrep = q[:, :, ::8].repeat_interleave(8, dim=2)  # one query per block of 8
    win = AttnGate(4, 2, 16, GateConfig(block_size=8, q_subblock=4, use_rope=False))
    flat = AttnGate(4, 2, 16, GateConfig(block_size=8, use_rope=False))
    win.load_state_dict(flat.state_dict())
    torch.testing.assert_close(win(qrep, k).softmax(-1), flat(qrep, k).softmax(-1), atol=1e-6, rtol=0)
    win.k_proj.data.normal_()
    loss = win(q, k).softmax(-1).mul(torch.rand(5, 5)).sum()  # -inf entries get zero weight
    loss.backward()
    assert torch.isfinite(win.k_proj.grad).all() and win.k_proj.grad.abs().sum() > 0


def test_query_windows_need_one_rotary_entry_per_window():
    gate = AttnGate(4, 2, 16, GateConfig(block_size=16, q_subblock=4))
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    cos = torch.ones(1, 2, 16)  # one per block: too few
    with pytest.raises(ValueError, match="NS=8.*4-token query window"):
        gate(q, k, cos, cos)


# ------------------------------------------------------------------------------------- GateConfig
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 0}, "power of two"),
        ({"block_size": 48}, "power of two"),
        ({"block_size": "64"}, "power of two"),
        ({"q_pooling": ()}, "non-empty"),
        ({"k_pooling": ("max", "sum")}, "drawn from"),
        ({"k_pooling": ("max", "max")}, "repeated"),
        ({"gate_dim": 7}, "even int"),
        ({"gate_dim": 0}, "even int"),
        ({"q_subblock": 0}, "q_subblock must be"),
        ({"q_subblock": 24}, "q_subblock must be"),
        ({"block_size": 16, "q_subblock": 32}, "q_subblock must be"),
        ({"q_subblock": True}, "q_subblock must be"),
    ],
)
def test_gate_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GateConfig(**kwargs)


def test_gate_config_dict_round_trip():
    cfg = GateConfig(
        block_size=128, q_pooling=("avg", "max"), k_pooling=("min", "avg"), gate_dim=32, use_rope=False, q_subblock=16
    )
    d = json.loads(json.dumps(cfg.to_dict()))  # through JSON: tuples come back as lists
    assert d["q_pooling"] == ["avg", "max"]
    back = GateConfig.from_dict(d)
    assert back == cfg and isinstance(back.k_pooling, tuple)
    with pytest.raises(ValueError, match="unknown GateConfig fields"):
        GateConfig.from_dict({**d, "bias": True})


# ------------------------------------------------------------------------------------- loss
def _target(b, h, nb, seed=0, zeros=True):
    """Random ground truth: causal rows summing to 1, some exact zeros below the diagonal."""
    t = _randn(b, h, nb, nb, seed=seed).abs()
    if zeros:
        t = t * (_randn(b, h, nb, nb, seed=seed + 1) > -0.3)
    tri = torch.ones(nb, nb, dtype=torch.bool).tril()
    t = t.masked_fill(~tri, 0.0)
    t[..., torch.arange(nb), torch.arange(nb)] += 0.1  # every row has mass
    return t / t.sum(-1, keepdim=True)


def _hand_kl(logits, target):
    """Per-row KL with loops over rows: [B, H, NB]."""
    b, h, nb, _ = logits.shape
    out = torch.zeros(b, h, nb, dtype=torch.float64)
    for i in range(nb):
        lq = torch.log_softmax(logits[..., i, : i + 1].double(), -1)
        t = target[..., i, : i + 1].double()
        terms = torch.where(t > 0, t * (t.clamp_min(1e-300).log() - lq), torch.zeros_like(t))
        out[..., i] = terms.sum(-1)
    return out


def test_gate_loss_zero_at_the_target_and_positive_elsewhere():
    target = _target(2, 3, 6)
    logits = target.log().float()  # -inf where the target is 0 (incl. above the diagonal)
    assert gate_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    logits = _randn(2, 3, 6, 6, seed=4).float()
    loss = gate_loss(logits, target)
    assert loss.item() > 1e-3
    torch.testing.assert_close(loss.double(), _hand_kl(logits, target).mean(), atol=1e-5, rtol=1e-5)


def test_gate_loss_skip_first_rows_and_finite_gradient():
    target = _target(1, 2, 8, seed=9)
    logits = _randn(1, 2, 8, 8, seed=10).float()
    logits = logits.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf")).requires_grad_(True)
    loss = gate_loss(logits, target, skip_first_rows=3)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), _hand_kl(logits.detach(), target)[..., 3:].mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[..., :3, :].abs().sum() == 0  # skipped rows get no gradient
    assert logits.grad[..., 3:, :].abs().sum() > 0


def test_gate_loss_with_zero_targets_is_not_nan():
    target = torch.zeros(1, 1, 4, 4)
    target[..., 0] = 1.0  # everything on the sink block: zeros everywhere else
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    loss = gate_loss(logits, target)
    loss.backward()
    # Row i has i+1 causal blocks with uniform q: KL = log(i+1); mean over 4 rows.
    assert loss.item() == pytest.approx(sum(math.log(i + 1) for i in range(4)) / 4, rel=1e-5)
    assert torch.isfinite(logits.grad).all()


def test_gate_loss_bad_inputs():
    with pytest.raises(ValueError, match="one shape"):
        gate_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 3))
    with pytest.raises(ValueError, match="skip_first_rows"):
        gate_loss(torch.zeros(1, 1, 4, 4), _target(1, 1, 4).float(), skip_first_rows=4)


# ------------------------------------------------------------------------------------- metrics
def test_gate_metrics_recall_one_when_gate_equals_target():
    target = _target(1, 2, 10, seed=11, zeros=False).float()
    m = gate_metrics(target, target, density=0.3, seq_len=160, block_size=16)
    assert m["block_recall"] == 1.0
    # Hand: per row keep the top max(round(0.3 n), 1) ground-truth blocks; mass = their sum.
    mass = []
    for i in range(10):
        k = max(round(0.3 * (i + 1)), 1)
        mass.append(target[..., i, : i + 1].topk(k, -1).values.sum(-1))
    assert m["mass_recall"] == pytest.approx(torch.stack(mass, -1).mean().item(), rel=1e-6)
    assert gate_metrics(target, target, 1.0, 160, 16)["mass_recall"] == pytest.approx(1.0, abs=1e-6)
    # An inverted gate keeps the worst blocks: recall drops.
    worse = gate_metrics(-target, target, 0.3, 160, 16)
    assert worse["block_recall"] < 1.0 and worse["mass_recall"] < m["mass_recall"]


def test_gate_logits_stay_fp32_under_autocast():
    """Distillation runs the model under bf16 autocast; the gate must not be computed in bf16."""
    torch.manual_seed(0)
    gate = AttnGate(4, 2, 16, GateConfig(block_size=16))
    with torch.no_grad():
        gate.k_proj.normal_()
    q, k = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16)
    cos, sin = torch.randn(1, 7, 16), torch.randn(1, 7, 16)
    ref = gate(q, k, cos, sin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gate(q.bfloat16(), k.bfloat16(), cos, sin)
    assert out.dtype == torch.float32
    # Only the bf16 rounding of the inputs differs; a bf16 matmul would be off by ~1e-2 relative.
    expected = gate(q.bfloat16().float(), k.bfloat16().float(), cos, sin)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    assert not torch.equal(out, ref)  # the inputs really were rounded
