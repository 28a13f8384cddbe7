"""GPU tests of impl="fa4" (FlashAttention-4's block-sparse kernels through FlexAttention's FLASH backend)
in bf16 against the fp32 reference, with the tolerance rule of tests/test_gpu_kernels.py: the relative
error is at most 2x (outputs) / 3x (gradients) that of plain bf16 PyTorch SDPA on the same inputs, plus
a small epsilon.

Run on the H200 with FA4 installed: ``pytest -m gpu tests/test_gpu_fa4.py``; skipped where
``flash_attn.cute`` is not importable.
"""

from __future__ import annotations

import os

import pytest
import torch

from seerattn.ops import fa4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="GPU tests run the compiled kernels"
    ),
    pytest.mark.skipif(not fa4.installed(), reason="flash_attn.cute (flash-attn-4) is not importable"),
]

from test_gpu_kernels import EPS, make_qkv, rel, sdpa_bf16_error, sdpa_bf16_grad_errors, structured_mask  # noqa: E402

from seerattn import BlockMask  # noqa: E402
from seerattn.ops import AttentionCase, block_sparse_attention, reference, resolve_impl  # noqa: E402

T = 4096 + 77  # not a multiple of the block
HQ, HKV, D = 16, 4, 128  # GQA 4


def with_empty_row(mask: BlockMask) -> tuple[BlockMask, int]:
    """The mask with head 0's block row 2 emptied; returns (mask, first token of that row)."""
    dense = mask.to_dense()
    dense[:, 0, 2] = False
    return BlockMask.from_dense(dense, mask.block_size, mask.seq_len), 2 * mask.block_size


@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("mh", ["hq", "hkv"])
def test_fa4_forward_bf16(bs, mh):
    if fa4.unsupported(torch.device("cuda"), bs, D, torch.bfloat16) is not None:
        pytest.skip(fa4.unsupported(torch.device("cuda"), bs, D, torch.bfloat16))
    q, k, v = make_qkv(1, HQ, HKV, T, D, seed=bs)
    mask, row = with_empty_row(structured_mask(1, HQ if mh == "hq" else HKV, T, bs, 0.2, seed=bs))
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="fa4")
    ref_out, ref_lse = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask, return_lse=True)
    tol = 2 * sdpa_bf16_error(q, k, v) + EPS
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel(out, ref_out) <= tol, (rel(out, ref_out), tol)
    empty = slice(row, row + bs)
    assert (out[0, 0, empty] == 0).all() and torch.isneginf(lse[0, 0, empty]).all()  # the empty row
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 1e-2
    triton = block_sparse_attention(q, k, v, mask, impl="triton")
    assert rel(out, triton) <= tol


@pytest.mark.parametrize("t", [1, 100, 129])
def test_fa4_short_prompts_and_batch_2(t):
    """Prompts shorter than one or two 128-token blocks (what impl=None sends to FA4 for short prompts), a
    batch of 2 with different masks."""
    q, k, v = make_qkv(2, HQ, HKV, t, D, seed=t)
    mask = structured_mask(2, HKV, t, 128, 0.5, seed=t)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="fa4")
    ref_out, ref_lse = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask, return_lse=True)
    assert rel(out, ref_out) <= 2 * sdpa_bf16_error(q, k, v) + EPS
    assert (lse - ref_lse).abs().max().item() < 1e-2


@pytest.mark.parametrize("mh", ["hq", "hkv"])
def test_fa4_gradients_bf16(mh):
    bs = 128
    q, k, v = make_qkv(1, HQ, HKV, T, D, seed=7)
    mask, row = with_empty_row(structured_mask(1, HQ if mh == "hq" else HKV, T, bs, 0.2, seed=7))
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(7))

    def grads(impl, dtype=None, return_lse=False):
        xs = [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in (q, k, v)]
        res = block_sparse_attention(*xs, mask, return_lse=return_lse, impl=impl)
        out = res[0] if return_lse else res
        return torch.autograd.grad(out, xs, dout.to(out.dtype))

    got = grads("fa4")
    ref = grads("reference", torch.float32)
    lowp = sdpa_bf16_grad_errors(q, k, v, dout)
    for name, x, r, lp in zip(("dq", "dk", "dv"), got, ref, lowp, strict=True):
        assert not torch.isnan(x).any(), name
        assert rel(x, r) <= 3 * lp + EPS, (name, rel(x, r), lp)
    assert (got[0][0, 0, row : row + bs] == 0).all()  # no key, no gradient for the empty row's queries
    with pytest.raises(NotImplementedError, match="does not differentiate through the LSE"):
        grads("fa4", return_lse=True)  # FlexAttention's FLASH backward has no dLSE (seen on torch 2.11)


def test_fa4_backward_refuses_64_token_blocks():
    q, k, v = make_qkv(1, 4, 2, 1024, 128)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backward takes mask blocks"):
        block_sparse_attention(q, k, v, structured_mask(1, 2, 1024, 64, 0.3), impl="fa4")


def test_automatic_choice_runs_fa4_at_block_128_on_this_gpu(monkeypatch):
    """impl=None on an sm_90 / sm_100 GPU with FA4: block 128 runs FA4 (same output bit for bit), block 64
    runs ours. The automatic choice's budget of compiled shapes starts empty here (earlier tests of the
    process may have spent it)."""
    import seerattn.ops as ops

    monkeypatch.setattr(ops, "_auto_fa4_shapes", set())
    cuda = torch.device("cuda")
    if fa4.unsupported(cuda, 128, D, torch.bfloat16) is not None:
        pytest.skip(fa4.unsupported(cuda, 128, D, torch.bfloat16))
    assert resolve_impl(None, cuda, "block_sparse_attention", case=AttentionCase(128, D, torch.bfloat16)) == "fa4"
    assert resolve_impl(None, cuda, "block_sparse_attention", case=AttentionCase(64, D, torch.bfloat16)) == "triton"
    q, k, v = make_qkv(1, HQ, HKV, T, D, seed=3)
    mask = structured_mask(1, HKV, T, 128, 0.1, seed=3)
    assert torch.equal(block_sparse_attention(q, k, v, mask), block_sparse_attention(q, k, v, mask, impl="fa4"))
