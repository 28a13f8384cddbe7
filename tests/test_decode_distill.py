"""Decode-gate distillation: the loss and metrics against brute force, and ``seerattn distill`` with
``gate_kind: decode`` on the tiny Llama of test_distill (CPU, 16-token blocks, rows of 128 tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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


# ---------------------------------------------------------------------------------------- the task
def _decode_recipe(out, **overrides):
    from seerattn.train import load_recipe

    fields = dict(
        model="unused",
        data=["unused"],
        output_dir=str(out),
        seq_len=128,
        batch_size=4,
        micro_batch_size=2,
        steps=12,
        lr=1e-2,
        warmup_steps=2,
        gate_kind="decode",
        decode_gate={"block_size": BS},
        skip_first_rows=0.25,
        metric_density=0.5,  # up to 3 of the 7 completed 16-token blocks of a 128-token row
        save_every=4,
        progress=False,
        tensorboard=False,
    )
    fields.update(overrides)
    return load_recipe(None, fields)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_task_loss_and_gradient_equal_an_independent_computation(tmp_path, family):
    """The task's hooks (pre-RoPE q/k after q-norm, post-RoPE q/k rebuilt from position_embeddings, the
    module's scaling) give the loss and gate gradient computed here from what the model's attention
    function receives (seerattn.hf captures, dense mode)."""
    from hf_models import make_model

    from seerattn.hf import SeerConfig, apply_seer_attention
    from seerattn.train.decode_distill import DecodeDistillTask
    from seerattn.train.distributed import DistContext

    model = make_model(family)
    config = _decode_recipe(tmp_path, loss_scale=3.0)
    task = DecodeDistillTask(config, model)
    task.build(DistContext(0, 1, 0, torch.device("cpu")), torch.float32, 0)
    state = apply_seer_attention(model, SeerConfig(mode="dense"))
    state.capture = True
    ids = torch.randint(0, 128, (2, 128), generator=torch.Generator().manual_seed(0))
    values = task.micro_step(0, ids, accum=2)
    rotary = model.model.rotary_emb
    for i, attn in enumerate(state._attn_modules):
        q_pre, k_pre, q, k = state.captures[i]
        q_pre = q_pre.reshape(2, 128, 4, 16).transpose(1, 2)
        k_pre = k_pre.reshape(2, 128, 2, 16).transpose(1, 2)
        gate = task.gates[i]
        params = list(gate.parameters())
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        target = decode_block_scores(q, k, BS, scale=attn.scaling)
        loss = decode_gate_loss(gate(q_pre, k_pre, rotary), target, skip_rows=32)
        (3.0 / 2 * loss).backward()
        assert task.losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        assert values[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for g_task, p in zip(grads, params, strict=True):
            torch.testing.assert_close(g_task, p.grad, rtol=1e-4, atol=1e-7)
        assert grads[0].abs().sum() > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "seer_gate" not in n)  # base frozen


def test_decode_distillation_trains_resumes_and_the_adapter_reloads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from seerattn.train import distill
    from seerattn.train.decode_distill import load_decode_gates

    fields = dict(model=tiny["model"], data=[tiny["data"]], data_cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = distill(_decode_recipe(out, **fields))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = rows[0]["kl"], sum(r["kl"] for r in rows[-3:]) / 3  # 1.30 -> 0.97 when written
    assert last < 0.85 * first, (first, last)
    assert sum(r["mass_recall"] for r in rows[-3:]) / 3 > rows[0]["mass_recall"]
    assert all(0 < r["mass_recall"] <= r["oracle_mass_recall"] + 1e-6 <= 1 + 1e-6 for r in rows)
    assert all(r["loss"] == pytest.approx(10 * r["kl"]) for r in rows)
    record = _read(out / "summary.json")
    assert record["kind"] == "distill" and record["config"]["gate_kind"] == "decode"
    assert record["results"]["final"]["oracle_mass_recall"] == rows[-1]["oracle_mass_recall"]
    # the adapter: a decode section only, decode.* tensors, loadable into fresh gates and by seerattn.hf
    meta = _read(result.adapter / "seer_config.json")
    assert meta["decode"]["gate"] == DecodeGateConfig(block_size=BS).to_dict() and "prefill" not in meta
    assert meta["decode"]["policy"]["kind"] == "budget" and meta["model"]["num_key_value_heads"] == 2
    assert meta["decode"]["policy"]["bound_slots"] == 2  # DecodeConfig's default policy, written with the gates
    from safetensors.torch import load_file

    saved = load_file(str(result.adapter / "seer_gates.safetensors"))
    assert sorted(saved) == sorted(
        f"decode.layers.{i}.{n}" for i in range(2) for n in ("q_proj", "k_proj", "q_norm.weight", "k_norm.weight")
    )
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    gates = torch.nn.ModuleList(DecodeGate(4, 2, 16, DecodeGateConfig(block_size=BS)) for _ in range(2))
    assert not torch.equal(gates[1].k_proj, saved["decode.layers.1.k_proj"])
    load_decode_gates(gates, model, result.adapter)
    for i in range(2):
        for n, p in gates[i].named_parameters():
            assert torch.equal(p, saved[f"decode.layers.{i}.{n}"])
    from seerattn.hf import decode_gate_modules, from_pretrained

    attached = decode_gate_modules(from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), result.adapter))
    for i in range(2):
        for n, p in attached[i].named_parameters():
            assert torch.equal(p, saved[f"decode.layers.{i}.{n}"])
    with pytest.raises(ValueError, match="decode gate config"):
        load_decode_gates(
            torch.nn.ModuleList(DecodeGate(4, 2, 16, DecodeGateConfig(block_size=32)) for _ in range(2)),
            model,
            result.adapter,
        )
    # killed after step 6 (newest checkpoint: step 4), resumed: bitwise the same gates
    broken = tmp_path / "broken"
    assert distill(_decode_recipe(broken, **fields), stop_after=6).stopped_early
    distill(_decode_recipe(broken, **fields), resume=True)
    again = load_file(str(broken / "adapter" / "seer_gates.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    # a run may start from the decode gates of an adapter
    cont = distill(_decode_recipe(tmp_path / "cont", steps=1, warmup_steps=0, init_gates=str(result.adapter), **fields))
    assert json.loads((cont.output_dir / "metrics.jsonl").read_text().splitlines()[0])["kl"] < rows[0]["kl"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"gate_kind": "both"}, "'gate_kind' must be one of ('prefill', 'decode')"),
        ({"gate": {"block_size": 16}}, "'gate' must be empty with gate_kind: decode"),
        ({"decode_gate": {"block_size": 48}}, "'decode_gate' is invalid: DecodeGateConfig.block_size"),
        ({"decode_gate": {"blocksize": 16}}, "unknown DecodeGateConfig fields ['blocksize']"),
        ({"seq_len": 120}, "'seq_len' must be a multiple of decode_gate.block_size (16)"),
        ({"gate_kind": "prefill"}, "'decode_gate' must be empty unless gate_kind is decode"),
    ],
)
def test_bad_decode_recipes_give_clear_errors(tmp_path, change, message):
    from seerattn.train import ConfigError

    with pytest.raises(ConfigError) as e:
        _decode_recipe(tmp_path, **change)
    assert message in str(e.value)


def test_committed_decode_recipe_is_valid():
    from seerattn.train import load_recipe

    cfg = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "testbed-decode-gates.yaml")
    assert cfg.gate_kind == "decode" and cfg.gate == {} and cfg.model == "testbed/model"
    assert cfg.decode_gate_config() == DecodeGateConfig(block_size=64, k_pooling=("max", "min", "avg"))
    assert (cfg.seq_len, cfg.metric_density) == (8192, 0.125)


def test_a_checkpoint_from_before_gate_kind_resumes(tiny, tmp_path):
    """Checkpoints written before the decode fields existed hold no gate_kind / decode_gate: they ran with the
    defaults and resume (a field they hold with another value still refuses)."""
    from seerattn.train import ConfigError, distill, load_recipe
    from seerattn.train.checkpoint import STATE_FILE, list_checkpoints

    fields = dict(
        model=tiny["model"], data=[tiny["data"]], output_dir=str(tmp_path / "run"), seq_len=128, batch_size=2,
        micro_batch_size=2, steps=4, warmup_steps=1, gate={"block_size": BS}, save_every=2, progress=False,
        tensorboard=False, data_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert distill(load_recipe(None, fields), stop_after=3).stopped_early
    (_, ckpt), *_ = list_checkpoints(tmp_path / "run" / "checkpoints")
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    del state["config"]["gate_kind"], state["config"]["decode_gate"]
    torch.save(state, ckpt / STATE_FILE)
    with pytest.raises(ConfigError, match="cannot resume"):
        distill(
            load_recipe(None, {**fields, "gate_kind": "decode", "gate": {}, "decode_gate": {"block_size": BS}}),
            resume=True,
        )
    assert distill(load_recipe(None, fields), resume=True).start_step == 2


def _worker(rank: int, world: int, ports: list[int], tiny: dict, root: str) -> None:
    """One rank, set up as torchrun would: a DDP-layout then an FSDP-layout decode distillation."""
    import os
    import sys

    from seerattn.train import distill

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    for parallel, port in zip(("ddp", "fsdp"), ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        fields = dict(model=tiny["model"], data=[tiny["data"]], data_cache_dir=str(Path(root) / "cache"))
        distill(_decode_recipe(Path(root) / parallel, steps=4, parallel=parallel, **fields))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as test_distill's workers: skip the gloo teardown race at interpreter exit


@pytest.mark.slow  # ~13 s: two spawned gloo processes, two runs each
def test_two_processes_ddp_and_fsdp_match_one(tiny, tmp_path):
    """The decode gates live outside the model: replicated, averaged, and the same as one process's."""
    import sys

    from safetensors.torch import load_file
    from test_distill import _free_port, spawn_workers

    from seerattn.train import distill

    fields = dict(model=tiny["model"], data=[tiny["data"]], data_cache_dir=str(tmp_path / "cache"))
    single = load_file(
        str(distill(_decode_recipe(tmp_path / "single", steps=4, **fields)).adapter / "seer_gates.safetensors")
    )
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import this module
    spawn_workers(_worker, (2, [_free_port(), _free_port()], tiny, str(tmp_path)), nprocs=2)
    for parallel in ("ddp", "fsdp"):
        saved = load_file(str(tmp_path / parallel / "adapter" / "seer_gates.safetensors"))
        assert saved.keys() == single.keys()
        for k, v in single.items():
            torch.testing.assert_close(saved[k], v, rtol=1e-5, atol=1e-6, msg=f"{parallel} {k}")
        assert _read(tmp_path / parallel / "environment.json")["world_size"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_decode_distillation_and_resume(tiny, tmp_path):
    """On CUDA: bf16 weights and autocast (gates, target and loss in fp32), 64-token blocks at 1k, the KL falls,
    every logged value is finite, resume is exact."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from seerattn.train import distill

    tok = AutoTokenizer.from_pretrained(tiny["model"])

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        )  # fmt: skip
        m = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for layer in m.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.normal_(0.0, 0.15)
        return m.to(torch.bfloat16)

    kw = dict(  # the plain-text corpus: the GPU machine has no `datasets` to read the JSONL one
        model=tiny["model"], data=[tiny["text"]], data_cache_dir=str(tmp_path / "cache"), seq_len=1024,
        decode_gate={"block_size": 64}, steps=10, save_every=4, device="cuda", lr=1e-3, metric_density=0.25,
    )  # fmt: skip
    whole = distill(_decode_recipe(tmp_path / "whole", **kw), model=model(), tokenizer=tok)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["kl"] < rows[0]["kl"]
    distill(_decode_recipe(tmp_path / "broken", **kw), model=model(), tokenizer=tok, stop_after=6)
    distill(_decode_recipe(tmp_path / "broken", **kw), model=model(), tokenizer=tok, resume=True)
    from safetensors.torch import load_file

    a = load_file(str(whole.adapter / "seer_gates.safetensors"))
    b = load_file(str(tmp_path / "broken" / "adapter" / "seer_gates.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
