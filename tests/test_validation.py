"""Bad inputs fail early with an error that names what is wrong (each case matches a phrase)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from seerattn import BlockMask, SparsityPolicy, attention_with_block_scores, block_sparse_attention
from seerattn import mask_from_scores as mfs


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def _mask(b=1, h=2, t=32, bs=16):
    nb = -(-t // bs)
    return BlockMask.from_dense(torch.ones(b, h, nb, nb, dtype=torch.bool), bs, t)


Q, K, V = _t(1, 4, 32, 8), _t(1, 2, 32, 8), _t(1, 2, 32, 8)
CU_OK_MASK = _mask(b=2, h=2, t=20)  # two packed sequences of at most 20 tokens


def bsa(q=Q, k=K, v=V, mask=None, **kw):
    return block_sparse_attention(q, k, v, _mask() if mask is None else mask, **kw)


def i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def packed(cu_seqlens, b: int = 1, t: int = 40):
    """block_sparse_attention on [b, 4 | 2, t, 8] q/k/v with CU_OK_MASK and ``cu_seqlens`` as given."""
    return bsa(q=_t(b, 4, t, 8), k=_t(b, 2, t, 8), v=_t(b, 2, t, 8), mask=CU_OK_MASK, cu_seqlens=cu_seqlens)


def awbs(q=Q, k=K, v=V, **kw):
    return attention_with_block_scores(q, k, v, **kw)


def esc(s: str) -> str:
    return re.escape(s)


CASES = [
    # --- q / k / v ranks, types, dtypes, devices, shapes
    ("q_rank3", lambda: bsa(q=_t(4, 32, 8)), ValueError, "q must be 4-D"),
    ("k_rank5", lambda: awbs(k=_t(1, 1, 2, 32, 8)), ValueError, "k must be 4-D"),
    ("q_not_tensor", lambda: awbs(q=[[0.0]]), TypeError, "q must be a torch.Tensor"),
    ("v_int", lambda: bsa(v=_t(1, 2, 32, 8, dtype=torch.int64)), TypeError, "v must be floating point"),
    ("dtype_mismatch", lambda: awbs(k=_t(1, 2, 32, 8, dtype=torch.float64)), TypeError, "must share a dtype"),
    ("device_mismatch", lambda: bsa(k=_t(1, 2, 32, 8, device="meta")), ValueError, "must be on one device"),
    ("kv_shape_mismatch", lambda: bsa(v=_t(1, 2, 32, 4)), ValueError, "k and v must have the same shape"),
    (
        "qk_len_mismatch",
        lambda: awbs(k=_t(1, 2, 31, 8), v=_t(1, 2, 31, 8)),
        ValueError,
        "same batch and length",
    ),
    (
        "qk_batch_mismatch",
        lambda: awbs(k=_t(2, 2, 32, 8), v=_t(2, 2, 32, 8)),
        ValueError,
        "same batch and length",
    ),
    ("head_dim_mismatch", lambda: awbs(k=_t(1, 2, 32, 4), v=_t(1, 2, 32, 4)), ValueError, "head dims differ"),
    (
        "gqa_not_multiple",
        lambda: awbs(q=_t(1, 3, 32, 8)),
        ValueError,
        "must be a multiple of key/value heads",
    ),
    ("empty_seq", lambda: awbs(q=_t(1, 4, 0, 8), k=_t(1, 2, 0, 8), v=_t(1, 2, 0, 8)), ValueError, ">= 1"),
    # --- block sizes
    ("awbs_block_0", lambda: awbs(block_size=0), ValueError, "block_size must be a positive power of two"),
    ("awbs_block_48", lambda: awbs(block_size=48), ValueError, "block_size must be a positive power of two"),
    ("awbs_block_float", lambda: awbs(block_size=64.0), ValueError, "positive power of two"),
    (
        "from_dense_block_48",
        lambda: BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 48),
        ValueError,
        "block_size must be a positive power of two",
    ),
    (
        "ctor_block_0",
        lambda: BlockMask(_t(1, 1, 1, dtype=torch.int32), _t(1, 1, 1, 1, dtype=torch.int32), 0, 1),
        ValueError,
        "positive power of two",
    ),
    # --- impl selection: never a silent fallback
    ("bsa_impl_cuda", lambda: bsa(impl="cuda"), ValueError, "impl must be one of"),
    ("bsa_impl_unknown", lambda: bsa(impl="fast"), ValueError, "impl must be one of"),
    ("awbs_impl_flex", lambda: awbs(impl="flex"), ValueError, "impl must be one of ('reference', 'triton')"),
    ("awbs_impl_cuda", lambda: awbs(impl="cuda"), ValueError, "got 'cuda'"),
    # --- block mask vs q/k
    ("mask_heads_3", lambda: bsa(mask=_mask(h=3)), ValueError, "block_mask has 3 heads; accepted: Hq=4"),
    ("mask_heads_1", lambda: bsa(mask=_mask(h=1)), ValueError, "or Hkv=2"),
    ("mask_batch", lambda: bsa(mask=_mask(b=2)), ValueError, "block_mask batch 2 != q batch 1"),
    ("mask_seq_len", lambda: bsa(mask=_mask(t=31)), ValueError, "covers 31 tokens but q has T=32"),
    (
        "mask_not_blockmask",
        lambda: bsa(mask=torch.ones(1, 2, 2, 2, dtype=torch.bool)),
        TypeError,
        "seerattn.BlockMask",
    ),
    ("mask_device", lambda: bsa(mask=_mask().to("meta")), ValueError, "block_mask is on meta"),
    # --- BlockMask construction
    (
        "from_dense_not_bool",
        lambda: BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.uint8), 16),
        ValueError,
        "expects a bool",
    ),
    (
        "from_dense_float",
        lambda: BlockMask.from_dense(torch.ones(1, 1, 2, 2), 16),
        ValueError,
        "expects a bool [B, H, NQ, NQ]",
    ),
    (
        "from_dense_rank3",
        lambda: BlockMask.from_dense(torch.ones(1, 2, 2, dtype=torch.bool), 16),
        ValueError,
        "expects a bool",
    ),
    (
        "from_dense_not_square",
        lambda: BlockMask.from_dense(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16),
        ValueError,
        "[B, H, NQ, NQ]",
    ),
    (
        "ctor_int64",
        lambda: BlockMask(torch.ones(1, 1, 2, dtype=torch.int64), torch.zeros(1, 1, 2, 2, dtype=torch.int64), 16, 32),
        TypeError,
        "must be int32",
    ),
    (
        "ctor_rank",
        lambda: BlockMask(_t(1, 2, dtype=torch.int32), _t(1, 1, 2, 2, dtype=torch.int32), 16, 32),
        ValueError,
        "expects kv_num_blocks [B, H, NQ]",
    ),
    (
        "ctor_leading_dims",
        lambda: BlockMask(_t(1, 2, 2, dtype=torch.int32), _t(1, 1, 2, 2, dtype=torch.int32), 16, 32),
        ValueError,
        "leading dims",
    ),
    (
        "ctor_seq_len_blocks",
        lambda: BlockMask(_t(1, 1, 2, dtype=torch.int32), _t(1, 1, 2, 2, dtype=torch.int32), 16, 33),
        ValueError,
        "needs NQ = NK = 3",
    ),
    (
        "from_dense_seq_len_too_short",
        lambda: BlockMask.from_dense(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, 32),
        ValueError,
        "needs NQ = NK = 2",
    ),
    ("expand_heads_bad", lambda: _mask(h=2).expand_heads(3), ValueError, "cannot expand a mask with 2 heads"),
    # --- varlen cu_seqlens
    ("cu_int64", lambda: packed(torch.tensor([0, 20, 40])), TypeError, "cu_seqlens must be a 1-D int32 tensor"),
    ("cu_list", lambda: packed([0, 20, 40]), TypeError, "cu_seqlens must be a 1-D int32 tensor"),
    (
        "cu_wrong_count",
        lambda: packed(i32(0, 10, 20, 40)),
        ValueError,
        "describes 3 sequences but block_mask has batch 2",
    ),
    ("cu_not_ending_at_T", lambda: packed(i32(0, 20, 39)), ValueError, "end at T=40"),
    ("cu_not_starting_at_0", lambda: packed(i32(1, 20, 40)), ValueError, "must start at 0"),
    ("cu_decreasing", lambda: packed(i32(0, 41, 40)), ValueError, "non-decreasing"),
    ("cu_batch_2", lambda: packed(i32(0, 10, 20), b=2, t=20), ValueError, "with cu_seqlens the batch must be 1"),
    (
        "cu_sequence_longer_than_mask",
        lambda: packed(i32(0, 5, 40)),
        ValueError,
        "needs more blocks than block_mask has",
    ),
    # --- sparsity policies
    ("policy_kind", lambda: SparsityPolicy("topk", 0.1), ValueError, "kind must be one of"),
    (
        "policy_threshold_1.5",
        lambda: SparsityPolicy("threshold", 1.5),
        ValueError,
        "threshold must be in [0, 1]",
    ),
    (
        "policy_threshold_neg",
        lambda: SparsityPolicy("threshold", -0.1),
        ValueError,
        "threshold must be in [0, 1]",
    ),
    ("policy_density_0", lambda: SparsityPolicy("density", 0.0), ValueError, "density must be in (0, 1]"),
    ("policy_density_2", lambda: SparsityPolicy("density", 2.0), ValueError, "density must be in (0, 1]"),
    ("policy_top_p_0", lambda: SparsityPolicy("top_p", 0), ValueError, "top_p must be in (0, 1]"),
    ("policy_nan", lambda: SparsityPolicy("density", math.nan), ValueError, "must be a finite number"),
    ("policy_inf", lambda: SparsityPolicy("threshold", math.inf), ValueError, "must be a finite number"),
    ("policy_str_value", lambda: SparsityPolicy("density", "0.1"), ValueError, "must be a finite number"),
    ("policy_bool_value", lambda: SparsityPolicy("density", True), ValueError, "must be a finite number"),
    (
        "policy_allocation_unknown",
        lambda: SparsityPolicy("density", 0.1, allocation="column"),
        ValueError,
        "allocation must be one of ('row', 'uniform', 'floor', 'head')",
    ),
    (
        "policy_allocation_threshold",
        lambda: SparsityPolicy("threshold", 0.01, allocation="head"),
        ValueError,
        "kind 'threshold' takes only 'row'",
    ),
    (
        "policy_last_rows",
        lambda: SparsityPolicy(dense_last_rows=-1),
        ValueError,
        "dense_last_rows must be an int",
    ),
    (
        "policy_override_type",
        lambda: SparsityPolicy(layer_overrides={0: {"kind": "dense"}}),
        ValueError,
        "layer_overrides must map layer index",
    ),
    (
        "policy_override_key",
        lambda: SparsityPolicy(layer_overrides={-1: SparsityPolicy()}),
        ValueError,
        "layer_overrides must map layer index",
    ),
    (
        "policy_unknown_field",
        lambda: SparsityPolicy.from_dict({"kind": "density", "valeu": 0.1}),
        ValueError,
        "unknown SparsityPolicy fields ['valeu']",
    ),
    (
        "policy_unknown_nested_field",
        lambda: SparsityPolicy.from_dict({"layer_overrides": {"2": {"sink": True}}}),
        ValueError,
        "unknown SparsityPolicy fields ['sink']",
    ),
    # --- policy flags and overrides (issue 14): no string or number passes as a bool, no override is ignored
    ("policy_keep_sink_str", lambda: SparsityPolicy(keep_sink="false"), ValueError, "keep_sink must be True or False"),
    ("policy_keep_diagonal_int", lambda: SparsityPolicy(keep_diagonal=0), ValueError, "keep_diagonal must be True or"),
    (
        "policy_last_rows_bool",
        lambda: SparsityPolicy(dense_last_rows=True),
        ValueError,
        "dense_last_rows must be an int",
    ),
    (
        "policy_override_bool_key",
        lambda: SparsityPolicy(layer_overrides={True: SparsityPolicy()}),
        ValueError,
        "layer_overrides must map layer index",
    ),
    (
        "policy_override_not_dict",
        lambda: SparsityPolicy(layer_overrides=[SparsityPolicy()]),
        ValueError,
        "layer_overrides must be a dict",
    ),
    (
        "policy_override_nested",
        lambda: SparsityPolicy(layer_overrides={0: SparsityPolicy(layer_overrides={1: SparsityPolicy()})}),
        ValueError,
        "layer_overrides[0] has layer_overrides of its own",
    ),
    (
        "policy_from_dict_null",
        lambda: SparsityPolicy.from_dict(None),
        ValueError,
        "a SparsityPolicy is given as an object of fields",
    ),
    (
        "policy_from_dict_keep_sink_str",
        lambda: SparsityPolicy.from_dict({"keep_sink": "false"}),
        ValueError,
        "keep_sink must be True or False, got 'false'",
    ),
    (
        "policy_from_dict_override_key",
        lambda: SparsityPolicy.from_dict({"layer_overrides": {"x": {"kind": "dense"}}}),
        ValueError,
        "layer_overrides key 'x' is not a layer index",
    ),
    (
        "policy_from_dict_override_null",
        lambda: SparsityPolicy.from_dict({"layer_overrides": {"1": None}}),
        ValueError,
        "layer_overrides['1']: a SparsityPolicy is given as an object of fields",
    ),
    (
        "policy_from_dict_overrides_list",
        lambda: SparsityPolicy.from_dict({"layer_overrides": [{"kind": "dense"}]}),
        ValueError,
        "layer_overrides must be an object",
    ),
    (
        "policy_from_dict_override_twice",
        lambda: SparsityPolicy.from_dict({"layer_overrides": {"1": {}, "01": {}}}),
        ValueError,
        "layer_overrides names layer 1 twice",
    ),
    (
        "policy_override_past_depth",
        lambda: SparsityPolicy(layer_overrides={5: SparsityPolicy("dense")}).check_num_layers(2),
        ValueError,
        "layer_overrides has layer 5 but the model has 2 layers (0..1)",
    ),
    # --- mask_from_scores
    (
        "scores_rank3",
        lambda: mfs(torch.rand(1, 2, 2), SparsityPolicy(), 32, 16),
        ValueError,
        "scores must be [B, H, NQ, NQ]",
    ),
    (
        "scores_not_square",
        lambda: mfs(torch.rand(1, 1, 2, 3), SparsityPolicy(), 32, 16),
        ValueError,
        "scores must be",
    ),
    (
        "scores_int",
        lambda: mfs(torch.ones(1, 1, 2, 2, dtype=torch.int32), SparsityPolicy(), 32, 16),
        TypeError,
        "scores must be floating point",
    ),
    (
        "scores_nq_mismatch",
        lambda: mfs(torch.rand(1, 1, 2, 2), SparsityPolicy(), 64, 16),
        ValueError,
        "scores have NQ=2 blocks but seq_len=64",
    ),
    (
        "scores_block_48",
        lambda: mfs(torch.rand(1, 1, 2, 2), SparsityPolicy(), 96, 48),
        ValueError,
        "power of two",
    ),
]


@pytest.mark.parametrize("call,exc,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(call, exc, phrase):
    with pytest.raises(exc, match=esc(phrase)):
        call()


def test_enough_cases():
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)


def test_good_inputs_pass_validation():
    """The fixtures above are valid apart from the one thing each case breaks."""
    out = bsa()
    assert out.shape == Q.shape
    assert packed(i32(0, 20, 40)).shape == (1, 4, 40, 8)
    assert awbs(block_size=16)[2].shape == (1, 4, 2, 2)


def test_cu_seqlens_read_once_per_tensor_version(monkeypatch):
    """One cu_seqlens tensor handed to every layer is read by the host once; an in-place change is checked again."""
    import seerattn.ops as ops

    reads = []
    diff = torch.Tensor.diff
    monkeypatch.setattr(torch.Tensor, "diff", lambda self, *a, **k: reads.append(1) or diff(self, *a, **k))
    cu = i32(0, 20, 40)
    for _ in range(3):
        assert packed(cu).shape == (1, 4, 40, 8)
    assert len(reads) == 1
    assert packed(i32(0, 20, 40)).shape == (1, 4, 40, 8)  # another tensor: read again
    assert len(reads) == 2
    cu[1] = 41  # in place: its version moves, so it is checked again (and now refused)
    with pytest.raises(ValueError, match="non-decreasing"):
        packed(cu)
    key = id(cu)
    assert key in ops._CU_SEQLENS_CHECKED
    del cu
    assert key not in ops._CU_SEQLENS_CHECKED  # the entry dies with its tensor
    with torch.inference_mode():  # no version counter: checked on every call, never cached
        cu = i32(0, 20, 40)
        reads.clear()
        for _ in range(2):
            assert packed(cu).shape == (1, 4, 40, 8)
        assert len(reads) == 2 and id(cu) not in ops._CU_SEQLENS_CHECKED
        cu[1] = 41
        with pytest.raises(ValueError, match="non-decreasing"):
            packed(cu)
