"""impl="fa4" on the CPU: the checks and their errors, the automatic choice (AUTO_IMPL), and the op's path
(the FlexAttention conversion and call of impl="flex" with the FLASH backend).

FlashAttention-4 itself runs on the GPU only (tests/test_gpu_fa4.py); here its availability, the GPU's
compute capability and PyTorch's FLASH support are monkeypatched.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import rand_mask, rand_qkv, rel

from seerattn import BlockMask
from seerattn.ops import AUTO_IMPL, AttentionCase, auto_impl, block_sparse_attention, fa4, flex, reference, resolve_impl

CUDA = torch.device("cuda")
BF16 = torch.bfloat16


@pytest.fixture
def h200(monkeypatch):
    """FA4 installed, a PyTorch with the FLASH backend and its backward, an sm_90 GPU."""
    monkeypatch.setattr(fa4, "installed", lambda: True)
    monkeypatch.setattr(fa4, "_flex_has_flash_backend", lambda: True)
    monkeypatch.setattr(fa4, "_flex_has_flash_backward", lambda: True)
    monkeypatch.setattr(fa4, "_capability", lambda device: (9, 0))
    return monkeypatch


# ---------------------------------------------------------------------------------------- checks
def test_missing_package_is_an_import_error_naming_it(h200):
    h200.setattr(fa4, "installed", lambda: False)
    with pytest.raises(ImportError, match=r"flash-attn-4 .*pip install"):
        fa4.check(CUDA, 128, 128, BF16)
    assert "not installed" in fa4.unsupported(CUDA, 128, 128, BF16)


def test_cpu_tensors_are_refused_by_the_op():
    q, k, v = rand_qkv(1, 4, 2, 64, 16, torch.float16)
    with pytest.raises(NotImplementedError, match="CUDA tensors only"):
        block_sparse_attention(q, k, v, rand_mask(1, 2, 64, 16), impl="fa4")


def test_a_supported_case_passes(h200):
    assert fa4.unsupported(CUDA, 128, 128, BF16) is None
    assert fa4.unsupported(CUDA, 128, 64, torch.float16, grad=True) is None
    assert fa4.unsupported(CUDA, 64, 128, BF16) is None  # block 64: forward only


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 32}, r"forward takes mask blocks of \[64, 128\] tokens, got 32"),
        ({"block_size": 256}, r"forward takes mask blocks of \[64, 128\] tokens, got 256"),
        ({"block_size": 64, "grad": True}, r"backward takes mask blocks of \[128\] tokens, got 64"),
        ({"dtype": torch.float32}, "float16 or bfloat16"),
        ({"head_dim": 256}, "head dims 8..128"),
        ({"head_dim": 100}, "multiples of 8, got D=100"),
        ({"varlen": True}, "cu_seqlens"),
        ({"grad": True, "return_lse": True}, "does not differentiate through the LSE"),
    ],
    ids=["fwd-block-32", "fwd-block-256", "bwd-block-64", "fp32", "D256", "D100", "varlen", "grad-lse"],
)
def test_cases_fa4_does_not_take(h200, kwargs, match):
    args = {"block_size": 128, "head_dim": 128, "dtype": BF16, "grad": False, "varlen": False} | kwargs
    with pytest.raises(NotImplementedError, match=match):
        fa4.check(CUDA, **args)


def test_gpu_family_and_sm100_blocks(h200):
    h200.setattr(fa4, "_capability", lambda device: (8, 0))
    assert "sm_80" in fa4.unsupported(CUDA, 128, 128, BF16)
    h200.setattr(fa4, "_capability", lambda device: (10, 0))
    # sm_100's forward runs two 128-row query tiles per CTA: 128-token query blocks are refused
    assert "[256]" in fa4.unsupported(CUDA, 128, 128, BF16)
    assert fa4.unsupported(CUDA, 256, 128, BF16, grad=True) is None


def test_pytorch_without_the_flash_backend_or_its_backward(h200):
    h200.setattr(fa4, "_flex_has_flash_backward", lambda: False)
    assert fa4.unsupported(CUDA, 128, 128, BF16) is None  # the forward does not need it
    assert "has no backward" in fa4.unsupported(CUDA, 128, 128, BF16, grad=True)
    h200.setattr(fa4, "_flex_has_flash_backend", lambda: False)
    assert "FLASH backend" in fa4.unsupported(CUDA, 128, 128, BF16)


def test_deterministic_backward_is_refused(h200):
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert fa4.unsupported(CUDA, 128, 128, BF16) is None  # the forward is deterministic
        assert "use_deterministic_algorithms" in fa4.unsupported(CUDA, 128, 128, BF16, grad=True)
        assert auto_impl(CUDA, AttentionCase(128, 128, BF16, grad=True)) == "triton"
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def test_flex_call_refuses_an_unknown_backend():
    q, k, v = rand_qkv(1, 2, 1, 32, 16, torch.float32)
    fm = flex.to_flex_block_mask(rand_mask(1, 1, 32, 16), 2, exact_mask_mod=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        flex.flex_attention_call(q, k, v, fm, 0.25, False, backend="flash")


def test_compiled_flex_calls_raise_past_the_recompile_limit_instead_of_running_eagerly():
    """On CUDA the FlexAttention call runs with dynamo's fail-on-limit switch and a limit of at least
    RECOMPILE_LIMIT entries (one per length / block / backend); both are restored after the call."""
    config = torch._dynamo.config
    before = (config.fail_on_recompile_limit_hit, config.recompile_limit)
    with flex._no_eager_fallback(CUDA):
        assert config.fail_on_recompile_limit_hit is True
        assert config.recompile_limit >= flex.RECOMPILE_LIMIT == 64
    assert (config.fail_on_recompile_limit_hit, config.recompile_limit) == before


# ---------------------------------------------------------------------------------------- automatic choice
def test_rule_table_values():
    assert set(AUTO_IMPL.values()) <= {"triton", "fa4"}
    assert AUTO_IMPL[(128, False)] == "fa4" and AUTO_IMPL[(128, True)] == "fa4"


@pytest.mark.parametrize(
    "case,expected",
    [
        (AttentionCase(128, 128, BF16), "fa4"),
        (AttentionCase(128, 128, BF16, grad=True), "fa4"),
        (AttentionCase(64, 128, BF16), "triton"),  # not in the table (FA4 runs it, but is not ahead)
        (AttentionCase(64, 128, BF16, grad=True), "triton"),
        (AttentionCase(32, 128, BF16), "triton"),
        (AttentionCase(128, 128, torch.float32), "triton"),  # listed, but FA4 does not take fp32
        (AttentionCase(128, 256, BF16), "triton"),
        (AttentionCase(128, 128, BF16, varlen=True), "triton"),
        (AttentionCase(128, 128, BF16, return_lse=True), "fa4"),
        (AttentionCase(128, 128, BF16, grad=True, return_lse=True), "triton"),  # FA4's backward: no dLSE
    ],
)
def test_auto_choice_on_an_h200_with_fa4(h200, case, expected):
    assert auto_impl(CUDA, case) == expected
    assert resolve_impl(None, CUDA, "block_sparse_attention", case=case) == expected


def test_auto_choice_without_fa4_or_on_other_gpus(h200):
    case = AttentionCase(128, 128, BF16)
    h200.setattr(fa4, "installed", lambda: False)
    assert auto_impl(CUDA, case) == "triton"
    h200.setattr(fa4, "installed", lambda: True)
    h200.setattr(fa4, "_capability", lambda device: (8, 0))
    assert auto_impl(CUDA, case) == "triton"


def test_auto_choice_follows_the_table(h200):
    case = AttentionCase(64, 128, BF16)
    assert auto_impl(CUDA, case) == "triton"
    h200.setitem(AUTO_IMPL, (64, False), "fa4")
    assert auto_impl(CUDA, case) == "fa4"
    h200.setitem(AUTO_IMPL, (128, False), "triton")
    assert auto_impl(CUDA, AttentionCase(128, 128, BF16)) == "triton"


def test_explicit_impl_and_other_ops_are_untouched(h200):
    case = AttentionCase(128, 128, BF16)
    for impl in ("triton", "flex", "reference", "fa4"):
        assert resolve_impl(impl, CUDA, "block_sparse_attention", case=case) == impl
    assert auto_impl(CUDA) == "triton"  # attention_with_block_scores, decode: no case, no FA4
    assert auto_impl(torch.device("cpu"), case) == "reference"
    with pytest.raises(ValueError, match=r"impl must be one of \('reference', 'triton'\)"):
        resolve_impl("fa4", CUDA, "attention_with_block_scores", allowed=("reference", "triton"))


# ---------------------------------------------------------------------------------------- the op's path
@pytest.mark.parametrize("mh", ["hq", "hkv"])
def test_fa4_op_is_the_flex_path_with_the_flash_backend(monkeypatch, mh):
    """With the checks passed (monkeypatched), impl="fa4" converts the mask as impl="flex" does and calls
    FlexAttention with backend FLASH; on the CPU that call runs the eager path instead (spy), which gives
    the reference's output and lse, GQA 2, an empty row, T not a multiple of the block."""
    calls = []
    original = flex.flex_attention_call

    def spy(q, k, v, flex_mask, scale, return_lse, backend="TRITON"):
        calls.append((backend, flex_mask.BLOCK_SIZE, flex_mask.kv_num_blocks.shape))
        return original(q, k, v, flex_mask, scale, return_lse)

    monkeypatch.setattr(fa4, "check", lambda *args: None)
    monkeypatch.setattr(flex, "flex_attention_call", spy)
    t, hq, hkv, bs = 100, 4, 2, 16
    q, k, v = rand_qkv(1, hq, hkv, t, 16, torch.float32, seed=3)
    dense = rand_mask(1, hq if mh == "hq" else hkv, t, bs, density=0.5, seed=3).to_dense()
    dense[:, 0, 2] = False  # an empty row
    mask = BlockMask.from_dense(dense, bs, t)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="fa4")
    assert calls == [("FLASH", (bs, bs), (1, hq, 7))]  # per-group masks repeated over the query heads
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, mask, return_lse=True)
    assert rel(out, ref_out) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.isinf(lse[0, 0, 2 * bs]).item()
    fin = ~torch.isinf(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < 1e-5


def test_fa4_lse_is_divided_back_where_pytorch_scales_it_by_ln2(monkeypatch):
    """A PyTorch whose flex_attention multiplies every backend's LSE by ln 2 (torch 2.11 on the H200: the
    FLASH backend's LSE came back as ln 2 times the reference's) gets it divided back; outputs untouched."""
    original = flex.flex_attention_call

    def scaled(q, k, v, flex_mask, scale, return_lse, backend="TRITON"):
        out, lse = original(q, k, v, flex_mask, scale, return_lse)
        return out, lse * math.log(2.0)

    monkeypatch.setattr(fa4, "check", lambda *args: None)
    monkeypatch.setattr(fa4, "_lse_scaled_by_ln2", lambda: True)
    monkeypatch.setattr(flex, "flex_attention_call", scaled)
    q, k, v = rand_qkv(1, 4, 2, 64, 16, torch.float32, seed=5)
    mask = rand_mask(1, 2, 64, 16, density=0.6, seed=5)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, impl="fa4")
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, mask, return_lse=True)
    fin = ~torch.isinf(ref_lse)
    assert rel(out, ref_out) < 1e-5 and (lse[fin] - ref_lse[fin]).abs().max() < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def test_the_ln2_probe_on_this_pytorch():
    # torch 2.13 (the pinned CPU wheel) converts the LSE per backend (stats_are_log2): nothing to undo
    assert fa4._lse_scaled_by_ln2() is False


def test_fa4_op_checks_before_converting(monkeypatch):
    """The op asks check() with the call's block size, head dim, dtype, gradients and varlen flag."""
    seen = []

    def check(*args):
        seen.append(args)
        raise NotImplementedError("refused")

    monkeypatch.setattr(fa4, "check", check)
    q, k, v = rand_qkv(1, 4, 2, 64, 16, torch.float16)
    with pytest.raises(NotImplementedError, match="refused"):
        block_sparse_attention(q, k, v, rand_mask(1, 2, 64, 32), impl="fa4")
    assert seen == [(q.device, 32, 16, torch.float16, False, False, False)]


# ---------------------------------------------------------------------------------------- prefill benchmark
def test_prefill_benchmark_records_the_attention_impl_and_why_fa4_did_not_run(tmp_path):
    """benchmarks.prefill --attn-impls auto,fa4 on the CPU smoke model: the auto row records the impl that
    ran; the fa4 row is kept, with no time and the reason (CPU tensors)."""
    import json

    from benchmarks import prefill

    out = tmp_path / "p.json"
    argv = ["--smoke", "--seqlens", "96", "--layers", "1", "--block-sizes", "32", "--gate-impls", "eager"]
    assert prefill.main([*argv, "--attn-impls", "auto,fa4", "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["seer@0.1/b32/eager"]["attn_impl"] == "reference" and rows["seer@0.1/b32/eager"]["ms"] > 0
    fa4_row = rows["seer@0.1/b32/eager/fa4"]
    assert fa4_row["attn_impl"] == "fa4" and fa4_row["ms"] is None and "CUDA tensors only" in fa4_row["error"]
    with pytest.raises(ValueError, match="--attn-impls"):
        prefill.main([*argv, "--attn-impls", "fa5"])


def test_auto_choice_compiles_fa4_for_a_bounded_number_of_shapes(h200, caplog):
    """Each new call shape compiles FA4 once: the automatic choice takes FA4 for AUTO_FA4_SHAPES distinct
    shapes, then runs ours for new ones (one warning), and keeps FA4 for the shapes it compiled."""
    import seerattn.ops as ops

    h200.setattr(ops, "AUTO_FA4_SHAPES", 2)
    h200.setattr(ops, "_auto_fa4_shapes", set())
    h200.setattr(ops, "_auto_fa4_warned", [False])

    def case(t):
        return AttentionCase(128, 128, BF16, shape=((1, 32, t, 128), (1, 8, t, 128), 128, BF16, False, False))

    for t in (1000, 2000, 1000):
        assert auto_impl(CUDA, case(t)) == "fa4"
        ops._note_auto_fa4("fa4", case(t))
    with caplog.at_level("WARNING", logger="seerattn.ops"):
        for t in (3000, 4000):
            assert auto_impl(CUDA, case(t)) == "triton"
            ops._note_auto_fa4("triton", case(t))
    assert [r.message.count("new shapes run seerattn's Triton kernel") for r in caplog.records] == [1]
    assert auto_impl(CUDA, case(2000)) == "fa4" and auto_impl(CUDA, AttentionCase(128, 128, BF16)) == "fa4"
    assert resolve_impl("fa4", CUDA, "block_sparse_attention", case=case(5000)) == "fa4"  # explicit: not limited
