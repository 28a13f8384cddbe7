"""The chunked causal LM loss (``seerattn.train.lm_loss``) and its use by ``seerattn finetune``.

The oracle is what the trainer computed before: transformers' ``ForCausalLMLoss`` on the full logits
(``F.linear(hidden, weight)``), or the model's own ``model(input_ids, labels=ids).loss``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import FAMILY_NAMES, input_ids, make_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.loss.loss_utils import ForCausalLMLoss

from seerattn.hf.lm_head import final_hidden_states, linear_lm_head
from seerattn.train.lm_loss import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, H, V = 2, 75, 16, 37  # N = 150 positions


def _problem(seed: int = 0, dtype=torch.float32):
    """hidden [B, T, H], weight [V, H] (leaves), labels [B, T] with ignore_index runs (and the shift's own)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g, dtype=dtype)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 10:30] = -100  # a masked span (e.g. a prompt)
    labels[1, ::7] = -100  # scattered
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 37, 149, 150, 1000])
def test_loss_and_gradients_equal_the_full_logit_loss(chunk):
    hidden, weight, labels = _problem()
    ref = _loss_and_grads(lambda h, w: ForCausalLMLoss(F.linear(h, w), labels, V), hidden, weight)
    got = _loss_and_grads(lambda h, w: causal_lm_loss(h, w, labels, chunk), hidden, weight)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    for name, a, b in zip(("hidden", "weight"), got[1:], ref[1:], strict=True):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    # rows whose target is ignored (the masked span's predecessors, each row's last position) get no gradient
    assert got[1][0, 9:29].abs().max() == 0 and got[1][:, -1].abs().max() == 0
    assert got[1][0, 30].abs().max() > 0


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 9), generator=g)
    labels[0, 3] = labels[1, 5] = -100
    assert torch.autograd.gradcheck(lambda h, w: causal_lm_loss(h, w, labels, 4), (hidden, weight))


def test_only_the_gradients_asked_for_are_computed():
    """LoRA freezes the LM head: no weight gradient (none is built); the hidden states' is unchanged."""
    hidden, weight, labels = _problem()
    full = _loss_and_grads(lambda h, w: causal_lm_loss(h, w, labels, 16), hidden, weight)
    frozen = weight.detach()
    hidden.grad = None
    causal_lm_loss(hidden, frozen, labels, 16).backward()
    torch.testing.assert_close(hidden.grad, full[1], rtol=0, atol=0)


def test_bf16_autocast_logits_in_bf16_and_log_sum_exp_in_fp32():
    """Under bf16 autocast (what the trainer runs on CUDA) the loss is what transformers' path computes: bf16
    logits cast to fp32. Computing the logits in fp32 instead would differ from it by the bf16 rounding (the
    reference's own error), a bf16 log-sum-exp by more. Gradients: within 3x the reference's error."""
    g = torch.Generator().manual_seed(3)
    h64, w64 = torch.randn(2, 200, 64, generator=g, dtype=torch.float64), 0.3 * torch.randn(1000, 64, generator=g)
    labels = torch.randint(0, 1000, (2, 200), generator=g)

    def run(fn, dtype, amp):
        h = h64.to(dtype).clone().requires_grad_()
        w = w64.to(dtype).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = fn(h, w)
        loss.backward()
        return loss.detach().double(), h.grad, w.grad

    full = lambda h, w: ForCausalLMLoss(F.linear(h, w), labels, 1000)  # noqa: E731
    oracle = run(full, torch.float64, False)
    ref = run(full, torch.float32, True)
    got = run(lambda h, w: causal_lm_loss(h, w, labels, 37), torch.float32, True)
    # the same bf16 logits and fp32 log-sum-exps, summed in another order: a few fp32 ulps apart. An fp32 matmul
    # would land the reference's own bf16 error away (> 1e-5 relative here); a bf16 log-sum-exp ~1e-4
    eps = torch.finfo(torch.float32).eps
    assert (ref[0] - oracle[0]).abs().item() > 100 * eps * ref[0].abs().item()
    assert (got[0] - ref[0]).abs().item() <= 8 * eps * ref[0].abs().item()
    for name, a, r, o in zip(("hidden", "weight"), got[1:], ref[1:], oracle[1:], strict=True):
        assert a.dtype == torch.float32, name
        limit = 3 * (r.double() - o).abs().max().item() + 1e-7
        assert (a.double() - o).abs().max().item() <= limit, name


class _LargestTensor(TorchDispatchMode):
    """The largest tensor (elements) any op creates while active, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), (str(func), tuple(t.shape))
        return out


def _largest(fn, hidden, weight):
    """(largest tensor created by any op, largest tensor saved for the backward) of one forward + backward."""
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with _LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(hidden, weight).backward()
    return mode.numel, max(saved)


@pytest.mark.parametrize("tokens", [128, 1024])
def test_memory_does_not_grow_with_tokens_times_vocabulary(tokens):
    """Every tensor of the chunked loss's forward and backward is at most [chunk, V] (the logits of one chunk)
    or as large as an input, whatever T: counted op by op (a TorchDispatchMode), and over what autograd saves. The
    same count on transformers' loss finds [T, V] tensors (the measure can fail)."""
    vocab, hid, chunk = 512, 16, 32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, hid, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hid, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    biggest, saved = _largest(lambda h, w: causal_lm_loss(h, w, labels, chunk), hidden, weight)
    assert biggest == chunk * vocab, biggest
    assert saved <= max(tokens * hid, vocab * hid)
    biggest, saved = _largest(lambda h, w: ForCausalLMLoss(F.linear(h, w), labels, vocab), hidden, weight)
    assert biggest >= tokens * vocab and saved >= tokens * vocab


# ---------------------------------------------------------------------------------------- on models
@pytest.mark.parametrize("family,tied", [*((f, False) for f in FAMILY_NAMES), ("llama", True), ("qwen3", True)])
def test_each_family_matches_its_own_loss_and_every_gradient(family, tied):
    """final_hidden_states + the LM head's weight + the chunked loss = ``model(ids, labels=ids).loss``, and every
    parameter's gradient (the embedding, the LM head, and with tied embeddings their one shared weight, which
    gets both contributions)."""
    grads, losses = [], []
    for chunked in (False, True):
        model = make_model(family, tie_word_embeddings=tied)
        model.train()  # dropout 0 in the tiny configs
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        ids = input_ids(100, b=2)
        if chunked:
            loss = causal_lm_loss(final_hidden_states(model, ids), linear_lm_head(model).weight, ids, 37)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    assert grads[0].keys() == grads[1].keys() and any("lm_head" in n or "embed" in n for n in grads[0])
    for n in grads[0]:
        assert grads[0][n] is not None and grads[0][n].abs().max() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_heads_that_are_more_than_one_linear_layer_are_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    assert gemma.config.final_logit_softcapping  # the reason it is refused
    with pytest.raises(ValueError, match="family 'gemma2' is not known to be a plain linear layer"):
        linear_lm_head(gemma)
    lora = get_peft_model(make_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"lm_head is peft\.tuners\.lora\.layer\.Linear; .* plain bias-free"):
        linear_lm_head(lora.get_base_model())
    plain = get_peft_model(make_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert linear_lm_head(plain.get_base_model()) is plain.get_base_model().lm_head
    biased = make_model("llama")
    biased.lm_head = torch.nn.Linear(64, 128, bias=True)
    with pytest.raises(ValueError, match="with a bias"):
        linear_lm_head(biased)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(chunk_tokens=0), "chunk_tokens must be an int >= 1"),
        (dict(labels=torch.full((B, T), V)), r"1 id\(s\)|outside the vocabulary \[0, 37\)"),
        (dict(labels=torch.zeros(B, T, dtype=torch.int32)), "labels must be int64"),
        (dict(weight=torch.zeros(V, H + 1)), r"weight must be \[V, H\] with H = 16"),
    ],
)
def test_bad_inputs_are_refused(change, message):
    hidden, weight, labels = _problem()
    kwargs = dict(hidden=hidden, weight=weight, labels=labels, chunk_tokens=8) | change
    with pytest.raises(ValueError, match=message):
        causal_lm_loss(**kwargs)


# ---------------------------------------------------------------------------------------- the trainer
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # seer attention, gates distilled then trained jointly, gradient checkpointing
        {"attention": "dense", "distill_steps": 0, "gradient_checkpointing": False},
        {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "lr": 1e-2},
    ],
    ids=["sparse", "dense-no-checkpointing", "lora"],
)
def test_finetune_with_the_chunked_loss_follows_the_full_logit_run(tiny, tmp_path, overrides):
    """The trainer with 37-token chunks (7 chunks per micro-batch of 2 x 128) and with transformers' loss: the
    same curve (CE, gate KL, gradient norm each step) and the same fine-tuned weights, within fp32 rounding."""
    from test_finetune import _ft_config, _ft_metrics, _safetensors

    from seerattn.train import finetune

    runs = {}
    for chunk in (None, 37):
        out = tmp_path / f"chunk-{chunk}"
        fields = {"steps": 3, "distill_steps": 1, "loss_chunk_tokens": chunk, **overrides}
        finetune(_ft_config(tiny, out, **fields))
        runs[chunk] = (_ft_metrics(out), _safetensors(out / "model"))
    (m_full, w_full), (m_chunk, w_chunk) = runs[None], runs[37]
    assert [m["step"] for m in m_chunk] == [m["step"] for m in m_full]
    for a, b in zip(m_full, m_chunk, strict=True):
        for key in ("ce", "kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["step"], key)
    assert m_full[-1]["ce"] != m_full[0]["ce"]
    assert w_full.keys() == w_chunk.keys()
    base = _safetensors(tiny["model"])
    for k in w_full:
        # Adam moves each element by ~lr whatever its gradient's size, so rounding-level gradient differences of
        # near-zero elements show up at a small fraction of the update, not at fp32 resolution
        update = (w_full[k] - base[k]).abs().max().item()
        err = (w_chunk[k] - w_full[k]).abs().max().item()
        assert err <= 1e-2 * update, (k, err, update)  # frozen tensors (LoRA): both 0


def test_finetune_refuses_a_head_the_chunked_loss_cannot_take(tiny, tmp_path):
    from test_finetune import _ft_config

    from seerattn.train import ConfigError, finetune

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "lm_head"]}
    with pytest.raises(ConfigError, match="'loss_chunk_tokens' \\(4096\\): .*lm_head is peft.*loss_chunk_tokens=null"):
        finetune(_ft_config(tiny, tmp_path / "a", lora=lora))
    with pytest.raises(ConfigError, match="'loss_chunk_tokens' must be an int >= 1 .* or 0 / null"):
        _ft_config(tiny, tmp_path / "b", loss_chunk_tokens=-1)


def test_benchmark_runs_in_its_cpu_smoke_configuration(tmp_path):
    from benchmarks import lm_loss
    from seerattn.record import read_record

    assert lm_loss.main(["--smoke", "--json", str(tmp_path / "l.json")]) == 0
    rows = read_record(tmp_path / "l.json")["results"]
    assert [(r["seq_len"], r["loss_chunk_tokens"]) for r in rows] == [(300, 0), (300, 64), (300, 100)]
    assert all(r["ms"] > 0 and not r["oom"] for r in rows)
    for r in rows[1:]:  # fp32 on the CPU: the chunked loss is the full one within rounding
        assert r["vs"] == "full" and max(r[k] for k in r if k.endswith("rel_diff")) < 1e-5, r
