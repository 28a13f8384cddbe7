"""Decode steps replayed from a CUDA graph (``SeerState.cuda_graphs``, :mod:`seerattn.hf.graphs`).

On the CPU: the model's forward is wrapped only with a decode section and put back by remove (signature
kept: transformers reads it to decide what to pass), what a step may take, and the refusals. On the GPU
(``-m gpu``): generate with the steps replayed equals eager generate, sparse and dense decode, equal and
left-padded prompts; one capture per generate, every later step a replay; the state's statistics follow.
"""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
from hf_models import GATE, LAYERS, input_ids, make_model

from seerattn.decode_policy import DecodePolicy
from seerattn.gate import DecodeGateConfig, GateKeyCache
from seerattn.hf import DecodeConfig, SeerConfig, apply_seer_attention, decode_gate_modules, remove_seer_attention
from seerattn.hf.graphs import DecodeGraphs, _flatten, _unflatten

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 16
DECODE = DecodeConfig(DecodeGateConfig(block_size=BS), DecodePolicy("budget", 48))  # K = 3 blocks
PROMPT, NEW = 70, 24


def _prepared(decode=DECODE, **cfg):
    model = make_model("llama")
    state = apply_seer_attention(model, SeerConfig(gate=GATE, mode="dense", decode=decode, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking gates: selections that differ from the identity init's
        for gate in decode_gate_modules(model).values():
            gate.q_proj.add_(torch.randn(gate.q_proj.shape, generator=g) * 0.3)
            gate.k_proj.add_(torch.randn(gate.k_proj.shape, generator=g) * 0.3)
    return model, state


def _generate(model, ids, mask, cache="static", new=NEW):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if cache is not None:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def test_the_forward_is_wrapped_with_a_decode_section_only_and_restored():
    model = make_model("llama")
    own = inspect.signature(model.forward)
    apply_seer_attention(model, SeerConfig(gate=GATE))
    assert "forward" not in model.__dict__  # prefill only: nothing to capture
    remove_seer_attention(model)
    state = apply_seer_attention(model, SeerConfig(gate=GATE, decode=DECODE))
    assert isinstance(model.forward, DecodeGraphs)
    # transformers decides from these whether to pass logits_to_keep, position_ids, ... (a wrapper that hid them
    # would make generate compute the prompt's logits at every position)
    assert inspect.signature(model.forward) == own and model._supports_logits_to_keep()
    twin = copy.deepcopy(model)  # a copy's forward runs the copy with the copy's state
    assert twin.forward._forward.__self__ is twin and twin.forward._state() is twin._seer_state is not state
    remove_seer_attention(model)
    assert "forward" not in model.__dict__ and inspect.signature(model.forward) == own

    def mine(*args, **kwargs):  # an instance forward of the model's own (accelerate's device-map hooks set one)
        return type(model).forward(model, *args, **kwargs)

    model.forward = mine
    apply_seer_attention(model, SeerConfig(gate=GATE, decode=DECODE))
    assert model.forward._forward is mine
    remove_seer_attention(model)
    assert model.forward is mine


def test_graphs_automatic_by_default_eager_on_the_cpu_and_refused_when_required():
    model, state = _prepared()
    ids = input_ids(PROMPT, b=2)
    mask = torch.ones_like(ids)
    assert state.cuda_graphs is None
    auto = _generate(model, ids, mask, new=4)  # the CPU: every step eager
    assert (model.forward.captures, model.forward.replays) == (0, 0)
    state.cuda_graphs = True
    with pytest.raises(ValueError, match="cuda_graphs=True but .* the step runs on cpu, not CUDA"):
        _generate(model, ids, mask, new=4)
    state.cuda_graphs = False
    state.reset()
    off = _generate(model, ids, mask, new=4)  # the refused call changed nothing that a new generate reads
    assert torch.equal(off[0], auto[0]) and torch.equal(off[1], auto[1])


def test_flattened_step_arguments():
    mask = {"full_attention": torch.ones(2, 1, 1, 8), "sliding_attention": None}
    kwargs = {"input_ids": torch.ones(2, 1, dtype=torch.long), "attention_mask": mask, "use_cache": True}
    kwargs["past_key_values"] = object()  # never a graph input
    tensors, plain, odd = _flatten({**kwargs, "extra": [1]})
    assert list(tensors) == ["attention_mask.full_attention", "input_ids"] and odd == ["extra (list)"]
    assert plain == (("attention_mask.sliding_attention", None), ("use_cache", True))
    buffers = {n: t.clone() for n, t in tensors.items()}
    rebuilt = _unflatten(kwargs, buffers)
    assert rebuilt["attention_mask"]["full_attention"] is buffers["attention_mask.full_attention"]
    assert rebuilt["input_ids"] is buffers["input_ids"] and rebuilt["past_key_values"] is kwargs["past_key_values"]
    assert kwargs["attention_mask"] is mask and mask["full_attention"] is not buffers["attention_mask.full_attention"]


def test_a_replayed_append_past_the_capacity_is_refused():
    model, _ = _prepared()
    gate = decode_gate_modules(model)[0]
    keys = GateKeyCache(gate, batch=1, max_tokens=2 * BS)
    keys.prefill(torch.randn(1, gate.num_kv_heads, 2 * BS - 1, gate.head_dim), rotary=model.model.rotary_emb)
    keys.count_replayed_append()  # the last token that fits
    with pytest.raises(RuntimeError, match="past the capacity"):
        keys.count_replayed_append()


def _on_gpu():
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


needs_gpu = pytest.mark.skipif(not _on_gpu(), reason="needs a CUDA GPU and the compiled kernels (no TRITON_INTERPRET)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("padded", [False, True], ids=["equal", "left-padded"])
@pytest.mark.parametrize(
    "decode", ["sparse", "dense", "half_shift", "bound"], ids=["sparse-decode", "dense-decode", "half-shift", "bound"]
)
def test_gpu_replayed_steps_equal_eager_generate(decode, padded):
    model, state = _prepared()
    model.to("cuda", torch.float16)
    sparse = decode != "dense"
    state.set_decode(enabled=sparse)
    if decode == "half_shift":  # the shifted windows' eager append and the unfused selection, replayed
        state.set_decode(policy=DecodePolicy("budget", DECODE.policy.value, half_shift=True))
    if decode == "bound":  # the key bounds' update and picks beside the fused selection, replayed
        state.set_decode(policy=DecodePolicy("budget", DECODE.policy.value, bound_slots=1))
    ids = input_ids(PROMPT, b=3).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :13] = 0
        mask[2, :40] = 0
    state.cuda_graphs = False
    eager = _generate(model, ids, mask)
    density = state.mean_density()
    state.cuda_graphs = None  # the default: captured where it can be
    graphs: DecodeGraphs = model.forward
    replayed = _generate(model, ids, mask)
    # one capture; steps 1 .. NEW - 1 are forwards: the first eager, the second captured, the rest replayed
    assert (graphs.captures, graphs.replays) == (1, NEW - 3)
    assert torch.equal(replayed[0], eager[0])
    torch.testing.assert_close(replayed[1], eager[1], atol=0, rtol=0)
    assert state.mean_density() == pytest.approx(density)  # the last step's statistics, from the replay
    assert all(s["path"] == ("sparse-decode" if sparse else "dense-decode") for s in state.stats.values())
    assert len(state.stats) == LAYERS
    again = _generate(model, ids, mask)  # a new generate: a new cache, a new capture
    assert (graphs.captures, graphs.replays) == (2, 2 * (NEW - 3)) and torch.equal(again[0], eager[0])


@pytest.mark.gpu
@needs_gpu
def test_gpu_steps_that_cannot_be_captured_run_eagerly_by_default_and_raise_when_required():
    model, state = _prepared()
    model.to("cuda", torch.float16)
    ids = input_ids(PROMPT, b=2).cuda()
    mask = torch.ones_like(ids)
    graphs: DecodeGraphs = model.forward
    dynamic = _generate(model, ids, mask, cache=None, new=6)  # a growing cache: eager
    seen = []
    state.decode_observer = seen.append  # Python in every step: eager, and it sees every step
    observed = _generate(model, ids, mask, new=6)
    assert graphs.captures == 0 and len(seen) == LAYERS * 5 and torch.equal(observed[0], dynamic[0])
    state.cuda_graphs = True
    with pytest.raises(ValueError, match="decode_observer is set"):
        _generate(model, ids, mask, new=6)
    state.decode_observer = None
    state.reset()
    with pytest.raises(ValueError, match="DynamicCache, whose tensors grow"):
        _generate(model, ids, mask, cache=None, new=6)


def test_generate_benchmark_refuses_graph_configs_without_a_static_cache_on_the_gpu(capsys):
    from benchmarks import generate

    for argv in (["--smoke", "--configs", "decode,decode-graph"], ["--configs", "dense-graph", "--cache", "dynamic"]):
        with pytest.raises(SystemExit):
            generate.main(argv)
        assert "['" in (err := capsys.readouterr().err) and "a GPU run (not --smoke) with --cache static" in err


def test_a_replayed_steps_output_is_copied_inside_tuples():
    from seerattn.hf.graphs import _copied

    a, b = torch.ones(2), torch.zeros(3)
    out = _copied((a, [b, 1], None))
    assert isinstance(out, tuple) and isinstance(out[1], list) and out[1][1] == 1 and out[2] is None
    assert torch.equal(out[0], a) and out[0].data_ptr() != a.data_ptr() and out[1][0].data_ptr() != b.data_ptr()


def test_a_decode_steps_density_is_computed_when_read():
    """A sparse decode step records its density's inputs, not the density (no reductions in every generate step):
    the value read equals the density of the blocks the step's kernel read."""
    import seerattn.hf.integration as integration

    model, state = _prepared()
    seen = []
    state.decode_observer = seen.append
    ids = input_ids(PROMPT, b=2)
    _generate(model, ids, torch.ones_like(ids), cache=None, new=3)
    raw = state._stats[0]["density"]
    assert not isinstance(raw, (float, torch.Tensor)) and callable(raw)
    last = seen[-LAYERS]  # layer 0 of the last step
    want = integration._decode_density(last.blocks.unsqueeze(2), last.cache_seqlens.view(-1, 1), last.block_size)
    assert state.stats[0]["density"] == pytest.approx(want.item()) and 0 < want.item() < 1
    assert isinstance(state._stats[0]["density"], float)  # computed once, kept as a number


@pytest.mark.parametrize(
    "rope",
    [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}],
    ids=["default", "yarn"],
)
def test_rotary_table_rows_equal_the_models_rotary(rope):
    from seerattn.gate.decode_gate import RotaryTable

    rotary = make_model("llama", rope=rope).model.rotary_emb
    table = RotaryTable(rotary, 300, 16, torch.float32, torch.device("cpu"))
    positions = torch.tensor([[0, 7, 299], [64, 63, 128]])
    x = torch.empty(2, 3, 3, 16)
    cos, sin = rotary(x, positions)
    got = table(x, positions)
    assert torch.equal(got[0], cos) and torch.equal(got[1], sin)  # bit for bit: each position computed alone
    with pytest.raises(ValueError, match="made for torch.float32"):
        table(x.double(), positions)
    dynamic = make_model("llama", rope={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}).model.rotary_emb
    with pytest.raises(ValueError, match="does not depend on the length|do not depend on the length"):
        RotaryTable(dynamic, 300, 16, torch.float32, torch.device("cpu"))


def test_static_cache_steps_rotate_with_one_shared_table_bit_for_bit(monkeypatch):
    """A static cache's steps take the gate's RoPE from one table over its positions (all layers share it); the
    same generate with the model's rotary called in every step gives the same logits bit for bit; a DynamicCache's
    steps call the model's rotary."""
    import seerattn.hf.integration as integration
    from seerattn.gate.decode_gate import RotaryTable

    model, state = _prepared()
    ids = input_ids(PROMPT, b=2)
    mask = torch.ones_like(ids)
    table = _generate(model, ids, mask, cache="static")
    assert len({id(e.rotary) for e in state._decode.values()}) == 1
    assert isinstance(state._decode[0].rotary, RotaryTable)
    monkeypatch.setattr(integration, "_step_rotary", lambda *args: None)
    called = _generate(model, ids, mask, cache="static")
    assert all(e.rotary is None for e in state._decode.values())
    assert torch.equal(table[0], called[0]) and torch.equal(table[1], called[1])
    monkeypatch.undo()
    _generate(model, ids, mask, cache=None, new=3)
    assert all(e.rotary is None for e in state._decode.values())
