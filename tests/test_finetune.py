"""Long-context fine-tuning: the ``finetune`` attention mode, YaRN through the config, the trainer.

Integration tests run on the tiny models of ``hf_models`` (2 layers, Hq 4, Hkv 2, head dim 16,
16-token gate blocks, CPU fp32, ``impl="reference"``, which is differentiable through autograd).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hf_models import GATE, documents, input_ids, make_model
from test_distill import _free_port, spawn_workers

import seerattn.hf.integration as integration
from seerattn import SparsityPolicy
from seerattn.hf import SeerConfig, apply_seer_attention, gate_modules, get_seer_state
from seerattn.train.finetune import enable_gradient_checkpointing

T = 150  # 9 full blocks of 16 + a partial block
POLICY = SparsityPolicy("density", 0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _finetune_model(family: str = "llama", mode: str = "finetune", mask_heads: str = "q", seed: int = 0):
    model = make_model(family, seed=seed)
    cfg = SeerConfig(gate=GATE, policy=POLICY, mode=mode, impl="reference", mask_heads=mask_heads)
    apply_seer_attention(model, cfg)
    # trained-looking gates: identity-initialised gates give near-uniform scores and ties
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for g in gate_modules(model).values():
            for p in g.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model


def _split(model):
    gates = {n: p for n, p in model.named_parameters() if "seer_gate" in n}
    weights = {n: p for n, p in model.named_parameters() if "seer_gate" not in n}
    return weights, gates


def _grads(params: dict) -> dict:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in params.items()}


def _spy(monkeypatch, name: str, calls: list, record=lambda *args, **kwargs: 1) -> None:
    """Replace ``integration.<name>`` by a wrapper that appends ``record(*args, **kwargs)`` to ``calls`` on each
    call, then calls the original."""
    real = getattr(integration, name)

    def spy(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, name, spy)


def _in_backward_now(*args, **kwargs) -> bool:
    """A :func:`_spy` record: whether the call ran inside a backward (a checkpoint recompute)."""
    return integration._in_backward()


@pytest.mark.parametrize("mask_heads", ["q", "kv"])
def test_finetune_logits_equal_sparse_mode(mask_heads):
    model = _finetune_model(mask_heads=mask_heads)
    ids = input_ids(T, b=2)
    out_ft = model(input_ids=ids).logits
    state = get_seer_state(model)
    assert set(state.losses) == {0, 1} and all(s["path"] == "finetune" for s in state.stats.values())
    assert all(0 < s["density"] < 1 for s in state.stats.values())
    state.set(mode="sparse")
    state.reset()
    out_sparse = model(input_ids=ids).logits
    torch.testing.assert_close(out_ft, out_sparse, rtol=0, atol=0)


def test_lm_loss_trains_the_model_not_the_gates_and_gate_loss_the_reverse():
    model = _finetune_model()
    weights, gates = _split(model)
    ids = input_ids(T, b=2)
    state = get_seer_state(model)

    out = model(input_ids=ids, labels=ids)
    out.loss.backward(retain_graph=True)
    assert all(p.grad is None for p in gates.values())
    reached = [n for n, p in weights.items() if p.grad is not None and p.grad.abs().sum() > 0]
    # every weight the LM loss depends on: q/k/v/o projections included (the attention is differentiable)
    assert set(reached) == set(weights), sorted(set(weights) - set(reached))
    model.zero_grad(set_to_none=True)

    state.total_gate_loss().backward()
    assert all(p.grad is None for p in weights.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.values())


def test_finetune_attention_gradient_matches_masked_dense_reference():
    """d(LM loss)/d(weights) through the block-sparse op = through a dense softmax with the same token masks."""
    from hf_models import masked_reference

    model = _finetune_model()
    ids = input_ids(T, b=1)
    masks = {}
    real = integration.block_sparse_attention

    def spy(q, k, v, block_mask, **kwargs):
        masks[len(masks)] = block_mask.to_token_mask()
        return real(q, k, v, block_mask, **kwargs)

    integration.block_sparse_attention = spy
    try:
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        integration.block_sparse_attention = real
    ref = masked_reference(make_model("llama", seed=0), masks)
    ref.train()
    ref(input_ids=ids, labels=ids).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in _split(model)[0].items():
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-6, msg=n)


def test_gradient_checkpointing_gives_identical_gradients_and_one_ground_truth_per_layer(monkeypatch):
    calls = []
    _spy(monkeypatch, "attention_with_block_scores", calls)
    recomputes = []
    real_in_backward = integration._in_backward

    def in_backward():
        recomputes.append(real_in_backward())
        return recomputes[-1]

    monkeypatch.setattr(integration, "_in_backward", in_backward)
    ids = input_ids(T, b=2)
    results = []
    for checkpointing in (False, True):
        model = _finetune_model()
        model.train()  # transformers checkpoints only in training mode (dropout is 0 in the tiny config)
        if checkpointing:
            enable_gradient_checkpointing(model)
        state = get_seer_state(model)
        calls.clear()
        recomputes.clear()
        out = model(input_ids=ids, labels=ids)
        losses = dict(state.losses)
        loss = out.loss + 10 * state.total_gate_loss()
        loss.backward()
        # with checkpointing both layers ran again inside the backward, and skipped the ground truth there
        assert recomputes == ([False, False, True, True] if checkpointing else [False, False]), recomputes
        assert len(calls) == 2, (checkpointing, len(calls))
        assert all(state.losses[i] is losses[i] for i in losses)  # not overwritten by the recompute
        assert all(v.grad_fn is not None for v in state.losses.values())
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert g0[n] is not None, n
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("mode", ["finetune", "sparse"])
def test_recompute_replays_the_masks_of_its_forward_whatever_the_order(monkeypatch, mode):
    """Under enable_gradient_checkpointing (checkpoint_context_fn) a recompute runs neither the gate nor the
    policy: it reuses its own forward's mask. Two forwards on different inputs and one backward of both
    losses (the pairing is per checkpointed call, not per layer) give the gradients of a run without
    checkpointing, and each attention call of the backward gets the mask object its forward built."""
    gate_calls, attn_masks = [], []
    _spy(monkeypatch, "_gate_forward", gate_calls, _in_backward_now)
    _spy(
        monkeypatch,
        "block_sparse_attention",
        attn_masks,
        lambda q, k, v, mask, **kw: (integration._in_backward(), mask),
    )
    batches = [input_ids(T, b=1, seed=s) for s in (1, 2)]
    grads = []
    for checkpointing in (False, True):
        model = _finetune_model(mode=mode)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        gate_calls.clear()
        attn_masks.clear()
        loss = sum(model(input_ids=ids, labels=ids).loss for ids in batches)
        loss.backward()
        assert gate_calls == [False] * 4, gate_calls  # 2 layers x 2 forwards, none in the backward
        forward = [m for in_bw, m in attn_masks if not in_bw]
        replayed = [m for in_bw, m in attn_masks if in_bw]
        assert len(forward) == 4 and len(replayed) == (4 if checkpointing else 0)
        # the backward ran the second forward's layers first (autograd order); every replayed mask is one of
        # the forward's objects, each used once
        assert sorted(map(id, replayed)) == (sorted(map(id, forward)) if checkpointing else [])
        assert not torch.equal(forward[0].kv_indices, forward[2].kv_indices)  # the two inputs' masks differ
        grads.append({n: p.grad.clone() for n, p in _split(model)[0].items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7, msg=n)


def test_a_second_backward_through_a_retained_graph_replays_the_masks_again(monkeypatch):
    """backward(retain_graph=True) twice: each backward recomputes the checkpointed layers and each recompute
    replays its forward's masks (no gate call in either backward); the gradients are twice those of one
    backward without checkpointing."""
    gate_calls = []
    _spy(monkeypatch, "_gate_forward", gate_calls, _in_backward_now)
    ids = input_ids(T, b=1, seed=4)
    grads = []
    for checkpointing in (False, True):
        model = _finetune_model(mode="sparse")
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        gate_calls.clear()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(retain_graph=True)
        loss.backward()
        assert gate_calls == [False, False], gate_calls
        grads.append({n: p.grad.clone() for n, p in _split(model)[0].items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7, msg=n)


def test_recompute_without_the_context_fn_rebuilds_the_same_mask(monkeypatch):
    """Checkpointing enabled through transformers alone (no context_fn): the recompute runs the gate again
    (no grad) and the gradients are still those of a run without checkpointing."""
    gate_calls = []
    _spy(monkeypatch, "_gate_forward", gate_calls, _in_backward_now)
    ids = input_ids(T, b=1, seed=3)
    grads = []
    for checkpointing in (False, True):
        model = _finetune_model()
        model.train()
        if checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        gate_calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        assert gate_calls == ([False, False, True, True] if checkpointing else [False, False])
        grads.append({n: p.grad.clone() for n, p in _split(model)[0].items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------- YaRN
def test_apply_rope_scaling_writes_the_config_and_the_gates_follow():
    from hf_models import family_module

    from seerattn.hf.rope import apply_rope_scaling, rope_parameters

    model = make_model("llama", max_position_embeddings=64)
    params = apply_rope_scaling(model, "yarn", 4.0, 64)
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == 64 and model.config.max_position_embeddings == 256
    assert rope_parameters(model.config) == params
    # the rotary module is YaRN's (attention scaling > 1) and the gates' block RoPE is that module
    assert model.model.rotary_emb.attention_scaling > 1
    fresh = type(model.model.rotary_emb)(config=model.config)
    pos = torch.arange(200).unsqueeze(0)
    x = torch.zeros(1, 200, 16)
    for a, b in zip(model.model.rotary_emb(x, pos), fresh(x, pos), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = apply_seer_attention(model, SeerConfig(gate=GATE, mode="finetune", impl="reference"))
    assert state._rotary is model.model.rotary_emb
    assert family_module("llama").apply_rotary_pos_emb is not None
    with pytest.raises(ValueError, match="already uses rope_type 'yarn'; stacking 'yarn'"):
        apply_rope_scaling(model, "yarn", 2.0, 256)


# ---------------------------------------------------------------------------------------- trainer
def _ft_config(tiny: dict, out, **overrides):
    from seerattn.train import FinetuneConfig, load_recipe

    fields = dict(
        model=tiny["model"],
        data=[tiny["data"]],
        output_dir=str(out),
        seq_len=128,
        batch_size=4,
        micro_batch_size=2,
        steps=6,
        distill_steps=2,
        lr=1e-3,
        gate_lr=1e-2,
        warmup_steps=1,
        gate={"block_size": 16},
        rope={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
        policy={"kind": "density", "value": 0.5},
        impl="reference",
        save_every=3,
        progress=False,
        data_cache_dir=str(tiny["root"] / "cache"),
    )
    fields.update(overrides)
    return load_recipe(None, fields, kind=FinetuneConfig)


def _safetensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _ft_metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in rows]


def _eval_books(root) -> Path:
    books = Path(root) / "books"
    books.mkdir(exist_ok=True)
    rows = ["file\tgutenberg_id\ttitle\tauthor\tchars\tsplit\tsource_repo"]
    for i, text in enumerate(documents(3, seed=7)):
        name = f"{i:05d}.txt"
        (books / name).write_text(" ".join([text] * 3))
        rows.append(f"{name}\t{i}\tT{i}\tA\t{len(text)}\ttest\trepo")
    (books / "MANIFEST.tsv").write_text("\n".join(rows) + "\n")
    return books


def test_finetune_trains_model_and_gates_and_eval_runs_on_the_result(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from seerattn.cli import main
    from seerattn.eval import load_eval_model, scaled_rope
    from seerattn.train import finetune

    base = _safetensors(tiny["model"])
    out = tmp_path / "run"
    result = finetune(_ft_config(tiny, out))
    assert result.steps_done == 8 and not result.stopped_early
    metrics = _ft_metrics(out)
    assert [m["phase"] for m in metrics] == ["distill"] * 2 + ["joint"] * 6
    assert all(m["ce"] == 0 and m["lr_0"] == 0 for m in metrics[:2])  # the model is frozen while distilling
    assert all(m["ce"] > 0 and 0.5 <= m["density"] < 1 and m["kl"] > 0 for m in metrics[2:])
    assert all(m["loss"] == pytest.approx(m["ce"] + 10 * m["kl"]) for m in metrics[2:])
    assert metrics[-1]["ce"] < metrics[2]["ce"]
    # outputs: a plain transformers model with the YaRN config, the gates as an adapter, the run record
    saved = _safetensors(out / "model")
    assert saved.keys() == base.keys()  # no gate or LoRA tensors in the model
    assert all(not torch.equal(saved[k], base[k]) for k in base if "layers.0.self_attn.q_proj" in k)
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["max_position_embeddings"] == 128
    assert (out / "model" / "tokenizer.json").is_file() and (out / "adapter" / "seer_gates.safetensors").is_file()
    record = json.loads((out / "summary.json").read_text())
    assert record["kind"] == "finetune" and record["results"]["steps"] == 8
    assert record["model"]["rope_parameters"]["factor"] == 2.0
    assert record["config"]["policy"] == {"kind": "density", "value": 0.5}
    # reloaded, the model runs in sparse mode with the adapter and the same RoPE
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert loaded.model.rotary_emb.rope_type == "yarn"
    # eval reads the saved config: the training length is the scaled one, so no second YaRN is stacked
    em = load_eval_model(out / "model", gates=out / "adapter")
    assert em.train_length == 128
    with scaled_rope(em, 128) as rope:
        assert rope is None
    with pytest.raises(ValueError, match="already uses rope_type 'yarn'"), scaled_rope(em, 256):
        pass
    books = _eval_books(tmp_path)
    ev = tmp_path / "eval"
    args = ["eval", "ppl", "--model", str(out / "model"), "--gates", str(out / "adapter"), "--data", str(books)]
    args += ["--contexts", "128", "--samples", "2", "--methods", "dense,seer", "--densities", "0.5"]
    assert main([*args, "--no-progress", "-o", str(ev)]) == 0
    rows = json.loads((ev / "ppl.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"dense", "seer"} and all(r["rope_scaling"] is None for r in rows)
    assert all(math.isfinite(r["ppl"]) for r in rows)


def test_finetune_kill_and_resume_is_bitwise_identical(tiny, tmp_path):
    from seerattn.train import ConfigError, finetune
    from seerattn.train.checkpoint import list_checkpoints

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    finetune(_ft_config(tiny, whole))
    first = finetune(_ft_config(tiny, broken), stop_after=5)  # killed after step 5: newest checkpoint step 3
    assert first.stopped_early and not (broken / "model").exists()
    assert [s for s, _ in list_checkpoints(broken / "checkpoints")] == [3]
    with pytest.raises(ConfigError, match="cannot resume"):
        finetune(_ft_config(tiny, broken, gate_loss_weight=5.0), resume=True)
    resumed = finetune(_ft_config(tiny, broken), resume=True)
    assert resumed.start_step == 3 and resumed.steps_done == 8
    for folder in ("model", "adapter"):
        a, b = _safetensors(whole / folder), _safetensors(broken / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    assert _ft_metrics(whole) == _ft_metrics(broken)


def test_dense_baseline_trains_the_model_only(tiny, tmp_path):
    from seerattn.train import finetune

    out = tmp_path / "dense"
    result = finetune(_ft_config(tiny, out, attention="dense", distill_steps=0, steps=3))
    assert result.adapter is None and not (out / "adapter").exists()
    metrics = _ft_metrics(out)
    assert all(m["phase"] == "joint" and m["kl"] == 0 and m["density"] == 1 for m in metrics)
    assert metrics[-1]["ce"] < metrics[0]["ce"] and all(m["loss"] == m["ce"] for m in metrics)
    assert _safetensors(out / "model").keys() == _safetensors(tiny["model"]).keys()


def test_lora_trains_adapters_merged_into_the_saved_model(tiny, tmp_path):
    from seerattn.train import finetune

    out = tmp_path / "lora"
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    finetune(_ft_config(tiny, out, lora=lora, lr=1e-2, steps=3, distill_steps=1))
    base, saved = _safetensors(tiny["model"]), _safetensors(out / "model")
    assert saved.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], saved[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    assert _ft_metrics(out)[-1]["ce"] > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention": "dense"}, "attention: dense trains no gates"),
        ({"distill_steps": 0}, "'init_gates' must be an adapter folder, or null with distill_steps > 0"),
        ({"rope": {"rope_type": "yarn", "factor": 4}}, "'rope' must be empty or have exactly the keys"),
        ({"rope": {"rope_type": "ntk", "factor": 4, "original_max_position_embeddings": 8}}, "rope.rope_type"),
        ({"policy": {"kind": "density", "value": 2}}, "'policy' is invalid: density must be in (0, 1]"),
        ({"lora": {"r": 4}}, "'lora' must be empty (full fine-tuning) or have the keys"),
        ({"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}, "parallel": "fsdp"}, "with LoRA"),
        ({"gate_loss_weight": 0}, "'gate_loss_weight' must be a finite float > 0"),
        ({"mask_heads": "x"}, "'mask_heads' must be 'q', 'kv' or null"),
    ],
)
def test_bad_finetune_recipes_give_clear_errors(tiny, tmp_path, change, message):
    from seerattn.train import ConfigError

    with pytest.raises(ConfigError) as e:
        _ft_config(tiny, tmp_path, **change)
    assert message in str(e.value)


def test_seq_len_beyond_the_scaled_context_is_refused(tiny, tmp_path):
    from seerattn.train import ConfigError, finetune

    with pytest.raises(ConfigError, match=r"'seq_len' \(128\) exceeds the model's max_position_embeddings \(96\)"):
        finetune(_ft_config(tiny, tmp_path, rope={**_ft_config(tiny, tmp_path).rope, "factor": 1.5}))


def test_cli_finetune_stop_resume_and_errors(tiny, tmp_path, capsys):
    from seerattn.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_ft_config(tiny, tmp_path / "cli", steps=2, distill_steps=1).to_dict()))
    assert main(["finetune", str(recipe), "--set", "save_every=1", "policy.value=0.25", "--stop-after", "2"]) == 0
    assert not (tmp_path / "cli" / "model").exists()
    assert main(["finetune", str(recipe), "--set", "save_every=1", "policy.value=0.25", "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (tmp_path / "cli" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["config"]["policy"]["value"] == 0.25
    assert main(["finetune", str(recipe), "--set", "lamda=3"]) == 2
    assert "error: unknown recipe field 'lamda'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- 2 processes
def _ft_worker(rank: int, world: int, ports: list[int], tiny: dict, root: str) -> None:
    """One rank as torchrun would set it up: FSDP2 fine-tuning (weights sharded, gates replicated)."""
    import os

    from seerattn.train import finetune

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    # each finetune() call creates (and destroys) its gloo group: a fresh port each time
    runs = [("fsdp", {}), ("fsdp-resumed", {"stop_after": 4}), ("fsdp-resumed", {"resume": True})]
    for (folder, kwargs), port in zip(runs, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        finetune(_ft_config(tiny, Path(root) / folder, parallel="fsdp", steps=3), **kwargs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see test_distill._worker: skip the gloo teardown race at interpreter exit


def test_two_processes_fsdp_match_single_process(tiny, tmp_path):
    from seerattn.train import finetune

    finetune(_ft_config(tiny, tmp_path / "single", steps=3))
    sys.path.insert(0, str(Path(__file__).parent))
    spawn_workers(_ft_worker, (2, [_free_port() for _ in range(3)], tiny, str(tmp_path)), nprocs=2)
    for folder in ("model", "adapter"):
        a, b = _safetensors(tmp_path / "single" / folder), _safetensors(tmp_path / "fsdp" / folder)
        assert a.keys() == b.keys(), folder
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{folder}/{k}")
        # killed after step 4 (checkpoint at step 3), resumed from the sharded checkpoint: the same result
        c = _safetensors(tmp_path / "fsdp-resumed" / folder)
        assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in b), folder
    m1, m2 = _ft_metrics(tmp_path / "single"), _ft_metrics(tmp_path / "fsdp")
    for x, y in zip(m1, m2, strict=True):
        for key in ("ce", "kl", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4), (x["step"], key)
    env = json.loads((tmp_path / "fsdp" / "environment.json").read_text())
    assert env["world_size"] == 2 and env["parallel"] == "fsdp"
    assert list((tmp_path / "fsdp" / "checkpoints").glob("step_*"))


def test_committed_finetune_recipes_are_valid():
    from seerattn.train import DistillConfig, FinetuneConfig, load_recipe

    repo = Path(__file__).resolve().parents[1]
    paper = load_recipe(repo / "recipes" / "llama-3-8b-yarn-32k.yaml", kind=FinetuneConfig)
    assert (paper.steps, paper.batch_size, paper.seq_len, paper.lr, paper.gate_loss_weight) == (400, 8, 32768, 1e-5, 10)
    assert paper.rope == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    testbed = load_recipe(repo / "recipes" / "testbed-yarn-32k.yaml", kind=FinetuneConfig)
    assert testbed.document_separator == "\x00"
    assert testbed.policy == {"kind": "density", "value": 0.1, "allocation": "floor"}
    gates = load_recipe(repo / "recipes" / "testbed-yarn-32k-gates.yaml", kind=DistillConfig)
    # (a), (b50), (b90) and (c) see the same token budget
    budget = testbed.total_steps * testbed.batch_size * testbed.seq_len
    assert gates.steps * gates.batch_size * gates.seq_len == budget
    dense = load_recipe(
        repo / "recipes" / "testbed-yarn-32k.yaml", ["attention=dense", "init_gates=null"], FinetuneConfig
    )
    assert dense.total_steps * dense.batch_size * dense.seq_len == budget
    committed = json.loads((repo / "testbed" / "gates" / "seer_config.json").read_text())["gate"]
    assert {k: v for k, v in committed.items() if v is not None} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in gates.gate_config().to_dict().items() if v is not None
    }


def test_train_step_benchmark_runs_in_its_cpu_smoke_configuration(tmp_path):
    from benchmarks import train_step
    from seerattn.record import read_record

    assert train_step.main(["--smoke", "--seqlens", "192", "--json", str(tmp_path / "t.json")]) == 0
    record = read_record(tmp_path / "t.json")
    assert record["kind"] == "bench-train-step"
    rows = {r["method"]: r for r in record["results"]}
    assert set(rows) == {"sdpa", "seer@0.1"} and all(r["ms"] > 0 and r["seq_len"] == 192 for r in rows.values())
    assert 0.1 <= rows["seer@0.1"]["density"] < 1
    assert (
        train_step.main(["--smoke", "--seqlens", "128", "--target-every", "4", "--json", str(tmp_path / "n.json")]) == 0
    )
    rows = {r["method"]: r for r in read_record(tmp_path / "n.json")["results"]}
    assert set(rows) == {"sdpa", "seer@0.1", "seer@0.1 no-target", "seer@0.1 every-4"}
    every = (rows["seer@0.1"]["ms"] + 3 * rows["seer@0.1 no-target"]["ms"]) / 4
    assert rows["seer@0.1 every-4"]["ms"] == pytest.approx(every)


@pytest.mark.parametrize("mode", ["finetune", "sparse", "distill"])
def test_autocast_with_fp32_master_weights(mode):
    """fp32 weights under bf16 autocast (what the trainer runs): transformers applies RoPE in the residual
    stream's fp32, so q/k arrive as fp32 beside a bf16 v; the attention casts them to the autocast dtype as SDPA
    does (this failed on the H200 with 'q, k, v must share a dtype' before). The result matches the same model
    evaluated in bf16 attention without autocast up to bf16 rounding, and gradients reach the weights."""
    model = _finetune_model(mode=mode)
    ids = input_ids(T, b=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    if mode == "finetune":
        out.loss.backward()
        q = model.model.layers[0].self_attn.q_proj.weight
        assert q.grad is not None and q.grad.abs().sum() > 0
    state = get_seer_state(model)
    state.reset()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss  # fp32 end to end
    assert abs(out.loss.item() - ref.item()) < 0.05 * abs(ref.item())


# ---------------------------------------------------------------------------------------- gate gradient in the layer
def _micro_batches(model, mode: str, in_layer: bool, accum: int, amp: bool, weight: float = 10.0):
    """``accum`` micro-batches of the trainer's objective (CE + weight x gate KL) / accum, gradients accumulated.

    in_layer: each layer backpropagates its gate loss (``SeerState.gate_grad_scale``, what the trainer runs);
    else the recorded losses keep their graphs and one backward per micro-batch covers everything (before).
    Returns the per-layer losses of each micro-batch.
    """
    state = get_seer_state(model)
    losses = []
    for micro in range(accum):
        ids = input_ids(T, b=2, seed=micro + 1)
        state.reset()
        state.gate_grad_scale = weight / accum if in_layer else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            ce = model(input_ids=ids, labels=ids).loss
        state.gate_grad_scale = None
        if in_layer:
            assert all(v.grad_fn is None for v in state.losses.values())
            (ce / accum).backward()
        else:
            ((weight * state.total_gate_loss() + ce) / accum).backward()
        losses.append(torch.stack([state.losses[i].detach() for i in sorted(state.losses)]))
    return losses


@pytest.mark.parametrize("mode", ["finetune", "distill"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_gate_gradient_taken_in_the_layer_equals_the_backward_of_the_recorded_losses(mode, checkpointing, amp):
    """The trainer's in-layer gate backward gives bitwise the gradients of every parameter (gates and weights)
    of one backward of the whole objective, with and without gradient checkpointing (the recompute adds no
    second gate gradient) and under bf16 autocast (the in-layer backward runs outside it, as the later one)."""
    results = {}
    for in_layer in (False, True):
        model = _finetune_model(mode=mode)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        losses = _micro_batches(model, mode, in_layer, accum=2, amp=amp)
        results[in_layer] = (losses, _grads(dict(model.named_parameters())))
    (l0, g0), (l1, g1) = results[False], results[True]
    assert all(torch.equal(a, b) for a, b in zip(l0, l1, strict=True))
    gates = [n for n in g0 if "seer_gate" in n]
    assert gates and all(g0[n] is not None and g0[n].abs().sum() > 0 for n in gates)
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        assert g0[n] is None or torch.equal(g0[n], g1[n]), n


def test_gate_gradient_in_the_layer_with_an_inexact_scale_and_without_checkpointing_difference():
    """accum = 3: weight / accum is not a float32 number, so the two paths round the scale differently (within
    fp32 rounding); gradient checkpointing changes no gate gradient at all."""
    grads = []
    for in_layer, checkpointing in ((False, False), (True, False), (True, True)):
        model = _finetune_model()
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        _micro_batches(model, "finetune", in_layer, accum=3, amp=False)
        grads.append({n: p.grad for n, p in _split(model)[1].items()})
    eps = torch.finfo(torch.float32).eps
    for n, ref in grads[0].items():
        # each of the 3 terms is off by the scale's rounding (<= 1 ulp of it), the sum re-rounds: a few ulps of
        # the largest entry (entries that cancel across micro-batches have a larger relative error)
        err = (grads[1][n] - ref).abs().max().item()
        assert err <= 3 * 4 * eps * ref.abs().max().item(), (n, err)
        assert torch.equal(grads[2][n], grads[1][n]), n


@pytest.mark.parametrize("mode", ["finetune", "distill"])
def test_no_gate_graph_outlives_its_layer(monkeypatch, mode):
    """What the gate's graph saves (window scores [B, Hq, NB, 4, NB] fp32 with q_subblock 4, logits...) is freed
    before the layer returns when the gradient is taken in the layer; the recorded-loss path keeps it until the
    step's backward (the extra memory measured on the H200)."""
    import weakref

    from seerattn.gate import GateConfig

    gate = GateConfig(block_size=16, q_pooling=("avg", "max", "min"), q_subblock=4)
    kept: dict[bool, list] = {}
    for in_layer in (False, True):
        saved = []

        def pack(x, saved=saved):
            if not isinstance(x, torch.nn.Parameter):
                saved.append((weakref.ref(x), tuple(x.shape), x.numel() * x.element_size()))
            return x

        monkeypatch.setattr(integration, "_keep_saved", pack)
        model = make_model("llama")
        apply_seer_attention(model, SeerConfig(gate=gate, policy=POLICY, mode=mode, impl="reference"))
        model.train()
        enable_gradient_checkpointing(model)
        state = get_seer_state(model)
        state.gate_grad_scale = 1.0 if in_layer else None
        ids = input_ids(T, b=2)
        out = model(input_ids=ids, labels=ids)
        alive = [(shape, size) for ref, shape, size in saved if ref() is not None]
        kept[in_layer] = alive
        assert len(state.losses) == 2 and saved
        if in_layer:
            assert all(p.grad is not None for n, p in model.named_parameters() if "seer_gate" in n)
        del out
    nb = -(-T // 16)
    # the window scores [B, Hq, NB, 4 windows, NB] (padded to whole blocks) of both layers, and more
    assert [s for s, _ in kept[False]].count((2, 4, nb, 4, nb)) == 2
    assert sum(size for _, size in kept[False]) > 2 * (2 * 4 * nb * 4 * nb * 4)
    assert kept[True] == []


# ---------------------------------------------------------------------------------------- gate_target_every
def test_gate_target_every_skips_the_ground_truth_and_leaves_the_gates_alone(tiny, tmp_path, monkeypatch):
    """gate_target_every: 2 after one distillation step: joint steps 1, 3 (0-based 0, 2) have a gate target, 2 and
    4 do not. Those run no ground-truth pass, the gates get no gradient, and AdamW (here with weight decay) leaves
    gates and moments untouched while the weights train; resuming between them is bitwise exact."""
    from seerattn.train import finetune

    calls = []
    _spy(monkeypatch, "attention_with_block_scores", calls)
    kw = dict(steps=4, distill_steps=1, gate_target_every=2, weight_decay=0.1, save_every=1, keep_checkpoints=10)
    whole = tmp_path / "whole"
    finetune(_ft_config(tiny, whole, **kw))
    # 2 layers x 2 micro-batches per step with a target (the distillation step and joint steps 1 and 3)
    assert len(calls) == 3 * 2 * 2
    metrics = _ft_metrics(whole)
    assert [m["gate_target"] for m in metrics] == [True, True, False, True, False]
    for m in metrics[1:]:
        if m["gate_target"]:
            assert m["kl"] > 0 and m["loss"] == pytest.approx(m["ce"] + 10 * m["kl"])
        else:
            assert m["kl"] is None and m["mass_recall"] is None and m["kl_layers"] is None and m["loss"] == m["ce"]
        assert 0.5 <= m["density"] < 1
    states = {s: torch.load(whole / "checkpoints" / f"step_{s:07d}" / "state.pt") for s in range(1, 6)}
    gate_keys = [k for k in states[1]["task"]["model"] if k.startswith("layers.")]  # gate_named_parameters
    weight_keys = [k for k in states[1]["task"]["model"] if k.startswith("model.")]
    assert gate_keys and weight_keys

    def same(a, b, keys):
        return all(torch.equal(states[a]["task"]["model"][k], states[b]["task"]["model"][k]) for k in keys)

    for before, after, trains_gates in ((2, 3, False), (3, 4, True), (4, 5, False)):
        assert same(before, after, gate_keys) != trains_gates, (before, after)
        assert not same(before, after, weight_keys), (before, after)
    # Adam's per-parameter step counts: gates stepped on the 3 steps with a target, the weights on the 4 joint steps
    opt = states[5]["task"]["optimizer"]
    gate_ids, weight_ids = opt["param_groups"][1]["params"], opt["param_groups"][0]["params"]
    assert {float(opt["state"][i]["step"]) for i in gate_ids} == {3.0}
    assert {float(opt["state"][i]["step"]) for i in weight_ids} == {4.0}
    # killed after step 4 (checkpoint 3): resumed, bitwise the uninterrupted run
    broken = tmp_path / "broken"
    finetune(_ft_config(tiny, broken, **kw), stop_after=4)
    finetune(_ft_config(tiny, broken, **kw), resume=True)
    for folder in ("model", "adapter"):
        a, b = _safetensors(whole / folder), _safetensors(broken / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    assert _ft_metrics(whole) == _ft_metrics(broken)


def test_gate_target_every_is_checked(tiny, tmp_path):
    from seerattn.train import ConfigError

    with pytest.raises(ConfigError, match="'gate_target_every' must be an int >= 1"):
        _ft_config(tiny, tmp_path, gate_target_every=0)
    with pytest.raises(ConfigError, match="'gate_target_every' must be 1 with attention: dense"):
        _ft_config(tiny, tmp_path, attention="dense", distill_steps=0, gate_target_every=2)
