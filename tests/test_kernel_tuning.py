"""The block-sparse forward's tuning does not depend on call order: the choice is keyed by the mask's
kind (:func:`seerattn.ops._triton.config.mask_key`), so two masks of one shape are timed separately
and each keeps its own best tile whichever comes first. Timings are fake (a patched timer), the
kernels run under the interpreter."""

from __future__ import annotations

import os

import pytest
import torch

from seerattn import BlockMask, SparsityPolicy, mask_from_scores

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("interpreter tests run on CPU-only machines (set TRITON_INTERPRET=1 to force)", allow_module_level=True)
pytest.importorskip("triton")

from seerattn.ops import block_sparse_attention  # noqa: E402
from seerattn.ops._triton import config as kcfg  # noqa: E402
from seerattn.ops._triton import sparse_fwd  # noqa: E402

T, BS, H = 256, 32, 2  # NQ = 8
WIDE, NARROW = kcfg.KernelConfig(32, 32, 1, 4, 1), kcfg.KernelConfig(16, 16, 1, 4, 1)


def _dense_mask():
    nb = T // BS
    return BlockMask.from_dense(torch.ones(1, H, nb, nb, dtype=torch.bool).tril(), BS, T)


def _scattered_mask():
    """About 10 %: the diagonal and one far block per row, different in consecutive rows."""
    nb = T // BS
    dense = torch.eye(nb, dtype=torch.bool).expand(1, H, nb, nb).clone()
    for i in range(2, nb):
        dense[..., i, (i * 3) % (i - 1)] = True
    return BlockMask.from_dense(dense, BS, T)


@pytest.fixture
def fake_tuning(monkeypatch):
    """Two candidates; the wide tile is 'faster' on the dense mask, the narrow one elsewhere. Returns
    the list of (mask name, chosen config) of each call."""
    monkeypatch.setenv("SEERATTN_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(sparse_fwd, "sparse_configs", lambda *a: [WIDE, NARROW])
    monkeypatch.setattr(kcfg, "_TUNED", {})
    monkeypatch.setattr(kcfg, "_TIMINGS", {})
    current = {}
    timed = []

    def fake_bench(launch, config):
        timed.append((current["name"], config))
        return {("dense", WIDE): 1.0, ("dense", NARROW): 2.0}.get((current["name"], config), 3.0 - (config is NARROW))

    monkeypatch.setattr(kcfg, "_bench", fake_bench)
    chosen = []
    real_pick = sparse_fwd.pick_config

    def spy(*args, **kwargs):
        cfg = real_pick(*args, **kwargs)
        chosen.append((current["name"], cfg))
        return cfg

    monkeypatch.setattr(sparse_fwd, "pick_config", spy)
    return current, chosen, timed


def _run(current, name, mask):
    current["name"] = name
    q = torch.randn(1, H, T, 16)
    block_sparse_attention(q, q, q, mask, impl="triton")


@pytest.mark.parametrize("order", [("dense", "scattered"), ("scattered", "dense")])
def test_each_mask_gets_its_own_tile_in_any_order(fake_tuning, order):
    current, chosen, timed = fake_tuning
    masks = {"dense": _dense_mask(), "scattered": _scattered_mask()}
    for name in (*order, *order):  # the second round hits the cache
        _run(current, name, masks[name])
    assert dict(chosen) == {"dense": WIDE, "scattered": NARROW}
    assert len(timed) == 4 and len(kcfg._TUNED) == 2, "each mask kind is timed once, on itself"
    # the log a benchmark records: each key's pick and every candidate's time when it was tuned
    log = kcfg.tuning_log(timings=True)
    assert sorted(entry["pick"] for entry in log.values()) == sorted([WIDE.short(), NARROW.short()])
    assert sorted(tuple(sorted(entry["ms"].values())) for entry in log.values()) == [(1.0, 2.0), (2.0, 3.0)]
    assert {k: e["pick"] for k, e in log.items()} == kcfg.tuning_log()


def test_policy_masks_are_keyed_by_their_policy_without_reading_the_device():
    """mask_key of a policy-built mask never touches its tensors (meta tensors: any read would raise)."""
    meta = torch.empty(1, 2, 8, dtype=torch.int32, device="meta")
    idx = torch.empty(1, 2, 8, 8, dtype=torch.int32, device="meta")
    for policy in (SparsityPolicy("density", 0.1), SparsityPolicy("density", 0.12), SparsityPolicy("top_p", 0.9)):
        source = mask_from_scores(torch.rand(1, 2, 8, 8), policy, T, BS).source
        assert source == ("policy", policy.kind, policy.value, policy.allocation)
        kcfg.mask_key(source, meta, idx)
    a, b, c = (kcfg.mask_key(("policy", "density", v, "row"), meta, idx) for v in (0.1, 0.12, 0.05))
    assert a == b != c  # 0.1 and 0.12 share a density bucket, 0.05 does not


def test_measured_key_separates_dense_structured_and_scattered_masks():
    dense, scattered = _dense_mask(), _scattered_mask()
    nb = T // BS
    band = torch.ones(nb, nb, dtype=torch.bool).tril() & ~torch.ones(nb, nb, dtype=torch.bool).tril(-3)
    structured = BlockMask.from_dense(band.expand(1, H, nb, nb), BS, T)  # consecutive rows share blocks
    keys = [kcfg.mask_key(None, m.kv_num_blocks, m.kv_indices) for m in (dense, scattered, structured)]
    assert keys[0] == ("measured", 5, 3)
    assert keys[1][2] < keys[2][2], "the scattered mask's rows overlap less than the band's"
    assert len(set(keys)) == 3


def test_no_key_is_computed_without_tuning(monkeypatch):
    monkeypatch.setenv("SEERATTN_TRITON_AUTOTUNE", "0")

    def never():
        raise AssertionError("the mask key was computed with tuning off")

    assert kcfg.pick_config(("k",), [WIDE, NARROW], lambda c: None, extra_key=never) is WIDE


def test_a_measured_mask_is_read_once_per_mask_not_per_call(fake_tuning, monkeypatch):
    """With tuning on, every call asks for the mask's kind; a mask without a policy source is measured
    on its device (a reduction and a host sync), so the key is kept on the mask (BlockMask.memo): three
    calls with one mask measure it once, a second mask with the same lists is measured again."""
    current, chosen, _ = fake_tuning
    reads = []
    real = kcfg.mask_key

    def counting(source, kv_num_blocks, kv_indices):
        reads.append(kv_indices.data_ptr())
        return real(source, kv_num_blocks, kv_indices)

    monkeypatch.setattr(kcfg, "mask_key", counting)
    mask = _scattered_mask()
    for _ in range(3):
        _run(current, "scattered", mask)
    assert len(reads) == 1 and len(chosen) == 3
    assert mask.memo == {"tuning_key": real(None, mask.kv_num_blocks, mask.kv_indices)}
    _run(current, "scattered", _scattered_mask())
    assert len(reads) == 2
    # without a memo (direct kernel calls that pass none) the key is measured every time
    kcfg.memo_mask_key(None, None, mask.kv_num_blocks, mask.kv_indices)
    kcfg.memo_mask_key(None, None, mask.kv_num_blocks, mask.kv_indices)
    assert len(reads) == 4


def test_hopper_ws_config_is_a_candidate_only_when_asked_for(monkeypatch):
    """The Gluon forward's config is appended (after the Triton tiles: never the untuned default) when the caller
    found the case supported, and never offered under the interpreter (Gluon has none)."""
    assert not any(c.hopper_ws for c in kcfg.sparse_configs(64, 4, 128, True))  # interpreter: one Triton config
    monkeypatch.setattr(kcfg, "interpreting", lambda: False)
    plain = kcfg.sparse_configs(64, 4, 128)
    with_ws = kcfg.sparse_configs(64, 4, 128, True)
    assert not any(c.hopper_ws for c in plain) and with_ws[: len(plain)] == plain
    ws = with_ws[len(plain) :]  # per group: 64-key steps (a kept block) and 128-key steps (two)
    assert [c.block_n for c in ws] == [64, 128] and all(c.hopper_ws and c.pack == 4 for c in ws)
    assert ws[0].num_stages > ws[1].num_stages  # a 128-key slot takes twice the shared memory
    assert ws[0].short().endswith("/hopper-ws")
    # per query head: two heads a program, a ring each (fewer slots, 64-key steps), and the union kernel (two query
    # blocks of a head, one ring of the per-group kernel's 128-key slots: two blocks of the union a step)
    per_head = kcfg.sparse_configs(64, 1, 128, True)
    pair, union = [c for c in per_head if c.hopper_ws]
    assert per_head[-2:] == [pair, union] and not pair.union and union.union
    assert pair.pack == union.pack == 1 and pair.block_n == 64 and pair.num_stages < ws[0].num_stages
    assert (union.block_n, union.num_stages) == (128, ws[1].num_stages)
    assert union.short().endswith("/hopper-ws-union") and pair.short().endswith("/hopper-ws")
    with pytest.raises(ValueError, match="union=True .* needs hopper_ws=True"):
        kcfg.KernelConfig(128, 64, union=True)
    at128 = kcfg.sparse_configs(128, 4, 128, True)  # 128-token blocks per group: 128-key steps
    assert [(c.block_n, c.num_stages) for c in at128 if c.hopper_ws] == [(128, ws[1].num_stages)]
    # per query head at 128-token blocks: the per-group kernel with one head a tile, 128-key steps
    at128_heads = kcfg.sparse_configs(128, 1, 128, True)
    assert [(c.block_n, c.pack, c.num_stages) for c in at128_heads if c.hopper_ws] == [(128, 1, ws[1].num_stages)]
