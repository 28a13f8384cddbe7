"""Fine-tuning on several processes (issue 18), on CPU with gloo: what can be shown without several GPUs.

- 2 and 3 FSDP2 ranks give the loss curve (CE, gate KL, gradient norm, every logged step) and the final
  weights of one process with the same global batch, seed and data order, within fp32 rounding. The
  rounding allowance is measured, not guessed: one process with micro-batches of 2 instead of 1 computes the
  same mathematics grouped differently, and its distance from the micro-batch-1 run sets the scale.
- A run on 2 ranks killed after a checkpoint and resumed (``resume=True``) continues bitwise.
- FSDP2 shards: after the run each rank holds its ``torch.chunk`` share (dim 0) of every weight, in storage of
  that size, and the gates stay whole (replicated) tensors.

The tiny saved Llama of ``hf_models.make_tiny`` (2 layers, hidden 64, Hq 4, Hkv 2, head dim 16), rows of 128
tokens, 16-token gate blocks, the trainer of ``seerattn finetune`` with ``parallel: fsdp``; one distillation
step then 3 joint steps of a global batch of 6 rows (1 process x 6 micro-batches, 2 x 3, 3 x 2).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from test_distill import _free_port, spawn_workers
from test_finetune import _ft_config, _ft_metrics, _safetensors

from seerattn.train.data import sample_range

# checkpoints at 2 and 4; the LM loss in 37-token chunks (4 per row): the chunked loss reads the LM head's weight that
# FSDP2 gathered for the root unit's forward, and its gradient must reach the sharded weight
RUN = dict(steps=3, distill_steps=1, batch_size=6, micro_batch_size=1, save_every=2, loss_chunk_tokens=37)
TOTAL = RUN["steps"] + RUN["distill_steps"]
CURVE_KEYS = ("loss", "ce", "kl", "grad_norm", "mass_recall", "density")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory) -> dict:
    """One process: the reference (micro-batch 1), the rounding yardstick (micro-batch 2, same global batch) and a
    control with another data order (seed 1: what a data-order fault would look like)."""
    from seerattn.train import finetune

    root = tmp_path_factory.mktemp("single")
    finetune(_ft_config(tiny, root / "mb1", **RUN))
    finetune(_ft_config(tiny, root / "mb2", **{**RUN, "micro_batch_size": 2}))
    finetune(_ft_config(tiny, root / "other_order", **{**RUN, "seed": 1}))
    return {"mb1": root / "mb1", "mb2": root / "mb2", "other_order": root / "other_order"}


def _shard_report(model) -> dict:
    """Per parameter: whether it is a DTensor, its full and local shapes, the bytes of its local storage."""
    from torch.distributed.tensor import DTensor, Shard

    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            local = p.to_local()
            out[name] = {
                "sharded": True,
                "placements": [isinstance(pl, Shard) and pl.dim == 0 for pl in p.placements],
                "full": list(p.shape),
                "local": list(local.shape),
                "storage_bytes": local.untyped_storage().nbytes(),
                "itemsize": local.element_size(),
            }
        else:
            out[name] = {"sharded": False, "full": list(p.shape), "local": list(p.shape)}
    return out


def _worker(rank: int, world: int, ports: list[int], tiny: dict, root: str, plan: list) -> None:
    """One rank as torchrun sets it up (environment only); runs ``plan``: [(folder, finetune kwargs)]."""
    from transformers import AutoModelForCausalLM

    from seerattn.train import finetune

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    for (folder, kwargs), port in zip(plan, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)  # each finetune() call creates and destroys its gloo group
        # the model is handed in (as the GPU benchmark does) so that its sharded parameters can be inspected after
        model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
        finetune(_ft_config(tiny, Path(root) / folder, parallel="fsdp", **RUN), model=model, **kwargs)
        report = _shard_report(model)
        (Path(root) / folder / f"shards-rank{rank}.json").write_text(json.dumps(report))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see test_distill._worker: skip the gloo teardown race at interpreter exit


def _spawn(world: int, root: Path, tiny: dict, plan: list) -> None:
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import this module
    ports = [_free_port() for _ in plan]
    spawn_workers(_worker, (world, ports, tiny, str(root), plan), nprocs=world)


def _assert_same_curve_and_weights(single: dict, run: Path, base_model: str) -> None:
    """``run`` vs one process: every logged value within the measured rounding scale, final tensors far closer to
    the reference than a different data order puts them."""
    ref, yard, got = (_ft_metrics(p) for p in (single["mb1"], single["mb2"], run))
    assert [m["step"] for m in got] == list(range(1, TOTAL + 1))
    assert [m["phase"] for m in got] == ["distill"] + ["joint"] * RUN["steps"]
    for key in CURVE_KEYS:
        # the one-process regrouping's largest distance over the run: the scale of fp32 rounding for this value
        rounding = max(abs(b[key] - a[key]) for a, b in zip(ref, yard, strict=True))
        for a, c in zip(ref, got, strict=True):
            tol = 4 * rounding + 8 * 2.0**-23 * abs(a[key]) + 1e-12  # floored at a few fp32 ulps of the value
            assert abs(c[key] - a[key]) <= tol, (a["step"], key, c[key], a[key], rounding)
    for a, c in zip(ref, got, strict=True):
        assert c["kl_layers"] == pytest.approx(a["kl_layers"], rel=1e-5)
    assert ref[-1]["ce"] < ref[1]["ce"]  # the curve being compared moves: the model trains
    base = _safetensors(base_model)
    for folder in ("model", "adapter"):
        a, other, c = (_safetensors(p / folder) for p in (single["mb1"], single["other_order"], run))
        assert a.keys() == c.keys(), folder
        if folder == "model":
            assert a.keys() == base.keys() and all(not torch.equal(a[k], base[k]) for k in a if "proj" in k)
        for k in a:
            # Adam divides each gradient element by its own running size, so elements with a near-zero gradient turn
            # fp32 rounding into visible update differences (the regrouped one-process run is no ceiling here); what
            # a real fault (a lost or repeated sample, a wrong average) does is what another data order does
            wrong = (other[k] - a[k]).abs().max().item()
            err = (c[k] - a[k]).abs().max().item()
            assert wrong > 0 and err <= 1e-3 * wrong, (folder, k, err, wrong)


def _assert_sharded(run: Path, world: int) -> None:
    """Every weight Shard(0) with rank r's torch.chunk rows, backed by that much storage; gates whole on each rank."""
    reports = [json.loads((run / f"shards-rank{r}.json").read_text()) for r in range(world)]
    names = reports[0].keys()
    weights = [n for n in names if "seer_gate" not in n]
    gates = [n for n in names if "seer_gate" in n]
    assert weights and gates
    for n in gates:  # replicated: ordinary tensors of full shape on every rank
        assert all(not rep[n]["sharded"] and rep[n]["local"] == rep[n]["full"] for rep in reports), n
    layer_share = {}
    for n in weights:
        full = reports[0][n]["full"]
        rows = [rep[n]["local"][0] if rep[n]["local"] else 0 for rep in reports]
        chunk = math.ceil(full[0] / world)
        assert rows == [max(0, min(chunk, full[0] - r * chunk)) for r in range(world)], (n, rows, full)
        per_row = math.prod(full[1:])
        for rep in reports:
            info = rep[n]
            assert info["sharded"] and info["placements"] == [True], (n, info)
            assert info["local"][1:] == full[1:], n
            # the rank's storage is its (padded) chunk, not the whole tensor
            assert info["storage_bytes"] <= chunk * per_row * info["itemsize"] < math.prod(full) * info["itemsize"], n
        if ".layers." in n:
            layer = n.split(".layers.")[1].split(".")[0]
            full_n, first = layer_share.get(layer, (0, [0] * world))
            layer_share[layer] = (full_n + math.prod(full), [f + x * per_row for f, x in zip(first, rows, strict=True)])
    assert len(layer_share) == 2
    for layer, (full_n, local) in layer_share.items():
        assert sum(local) == full_n
        # each rank holds about 1/world of the layer (exactly, up to the chunks' rounding of each weight's rows)
        assert all(abs(x / full_n - 1 / world) < 0.5 / world for x in local), (layer, local, full_n)


def test_global_batch_takes_the_same_samples_in_the_same_order_for_any_world_size():
    """What makes the curves comparable: step s consumes the same rows, grouped the same, for 1, 2 or 3 ranks."""
    b = RUN["batch_size"]
    for step in range(TOTAL):
        one = [list(sample_range(step, m, 0, 1, 1, b)) for m in range(b)]
        for world in (2, 3):
            accum = b // world
            many = [sample_range(step, m, r, world, 1, b) for m in range(accum) for r in range(world)]
            assert [list(x) for x in many] == one, (step, world)


def test_two_fsdp_processes_match_one_and_resume_exactly(tiny, single, tmp_path):
    plan = [("full", {}), ("killed", {"stop_after": 3}), ("killed", {"resume": True})]
    _spawn(2, tmp_path, tiny, plan)
    full, killed = tmp_path / "full", tmp_path / "killed"
    _assert_same_curve_and_weights(single, full, tiny["model"])
    env = json.loads((full / "environment.json").read_text())
    assert (env["world_size"], env["parallel"], env["accumulation_steps"]) == (2, "fsdp", 3)
    # killed after step 3 (newest checkpoint: step 2), resumed from the FSDP checkpoint: bitwise the same run
    assert (killed / "environment-resume-2.json").is_file()
    assert _ft_metrics(killed) == _ft_metrics(full)
    for folder in ("model", "adapter"):
        a, b = _safetensors(full / folder), _safetensors(killed / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    _assert_sharded(full, 2)


def test_three_fsdp_processes_match_one(tiny, single, tmp_path):
    _spawn(3, tmp_path, tiny, [("full", {})])
    _assert_same_curve_and_weights(single, tmp_path / "full", tiny["model"])
    env = json.loads((tmp_path / "full" / "environment.json").read_text())
    assert (env["world_size"], env["accumulation_steps"]) == (3, 2)
    _assert_sharded(tmp_path / "full", 3)  # uneven: 64 rows split 22/22/20
