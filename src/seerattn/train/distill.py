"""Gate distillation: train the AttnGates of a frozen causal LM against its own attention.

Per optimizer step, every process runs ``accumulation_steps`` forwards of ``micro_batch_size``
packed rows through the frozen model in ``mode="distill"``: each attention layer computes its
output with ``attention_with_block_scores`` (Triton on CUDA, reference on CPU), whose block
ground truth is the target of that layer's gate. The loss is

    loss = loss_scale * sum over layers of KL(ground truth || softmax(gate logits))

(per layer: mean over batch, heads and kept query-block rows; the first ``skip_first_rows`` of
the rows are left out). Each layer backpropagates its term into its gate as soon as it is computed
(``SeerState.gate_grad_scale``), so the forward runs under ``no_grad`` and no gate graph outlives its
layer. Only gate parameters receive gradients: the base weights have
``requires_grad=False``, the model is in eval mode, and the gates read detached pre-RoPE Q/K, so
no autograd graph is built through the base model.

The run folder, resuming, data, accumulation and the distributed layout are the shared skeleton's
(:mod:`.trainer`); this task adds ``adapter/``, the trained gates (:func:`seerattn.hf.save_gates`).

Entry point: :func:`distill` (the ``seerattn distill`` command calls it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import DistillConfig
from .distributed import (
    DistContext,
    average_gradients,
    broadcast_parameters,
    check_replicas,
    shard_base_model,
)
from .trainer import Task, TrainResult, autocast, load_model, lr_multiplier, run_training

__all__ = ["DistillTask", "distill", "gate_named_parameters"]

logger = logging.getLogger(__name__)


def gate_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """``[("layers.{i}.{name}", param)]`` of every gate of a prepared model (the checkpoint's names)."""
    from ..hf import gate_modules

    out = []
    for i, gate in gate_modules(model).items():
        for name, p in gate.named_parameters():
            out.append((f"layers.{i}.{name}", p))
    return out


def _gates_state(named) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in named}


def _load_gates_state(named, saved: dict[str, torch.Tensor]) -> None:
    want = {n for n, _ in named}
    if set(saved) != want:
        raise ValueError(f"checkpoint gate keys differ from the model's: {sorted(set(saved) ^ want)[:5]}")
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n])


class DistillTask(Task):
    """Gates train against the frozen model's ground truth (module docstring)."""

    kind = "distill"

    def build(self, ctx: DistContext, dtype: torch.dtype, start: int) -> None:
        from ..hf import SeerConfig, apply_seer_attention, get_seer_state
        from ..hf.integration import _decoder_layers

        config = self.config
        if self.model is None:
            self.model = load_model(config, dtype)
        model = self.model
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and config.seq_len > max_pos:
            logger.warning("seq_len %d exceeds the model's max_position_embeddings %d", config.seq_len, max_pos)
        model.requires_grad_(False)
        model.eval()
        model.config.use_cache = False
        seer_cfg = SeerConfig(
            gate=config.gate_config(),
            mode="distill",
            impl=config.impl,
            skip_first_rows=config.skip_first_rows,
            metric_density=config.metric_density,
            base_model=config.model,
        )
        apply_seer_attention(model, seer_cfg)
        self.state = get_seer_state(model)
        if config.init_gates is not None:
            from ..hf import load_gates

            load_gates(model, config.init_gates)  # checks the model shape and the gate config
            logger.info("gates start from %s", config.init_gates)
        self.trainable = gate_named_parameters(model)
        params = [p for _, p in self.trainable]
        for p in params:
            p.requires_grad_(True)
        self.base, layers = _decoder_layers(model)
        self.n_layers = len(layers)
        if self.data_parallel() == "fsdp" and ctx.distributed:
            shard_base_model(self.base, layers, set(params), ctx)
        else:
            if self.data_parallel() == "fsdp":
                logger.info("parallel=fsdp with a single process: nothing to shard, running unsharded")
            model.to(ctx.device)
        broadcast_parameters(params, ctx)
        self.device = ctx.device
        logger.info("base frozen (%s, %s); %d layer(s) of gates train", dtype, ctx.device, self.n_layers)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for _, p in self.trainable]}]

    def lr_lambdas(self):
        return [lambda s: lr_multiplier(s, self.config)]

    def micro_step(self, step: int, ids: torch.Tensor, accum: int) -> torch.Tensor:
        n = self.n_layers
        self.state.reset()
        # each layer backpropagates loss_scale / accum x its KL into its gate right away (SeerState.gate_grad_scale):
        # no gate graph outlives its layer, and nothing else needs a graph
        self.state.gate_grad_scale = self.config.loss_scale / accum
        try:
            with autocast(self.config, ids.device), torch.no_grad():
                self.base(input_ids=ids, use_cache=False)
        finally:
            self.state.gate_grad_scale = None
        if len(self.state.losses) != n:
            raise RuntimeError(f"{len(self.state.losses)} of {n} layers recorded a gate loss")
        kl = torch.stack([self.state.losses[i] for i in range(n)])
        metrics = self.state.metrics
        # per layer: KL, mass recall and block recall
        values = torch.cat(
            [
                kl.detach().double(),
                torch.tensor([metrics[i]["mass_recall"] for i in range(n)], dtype=torch.float64, device=ids.device),
                torch.tensor([metrics[i]["block_recall"] for i in range(n)], dtype=torch.float64, device=ids.device),
            ]
        )
        self.state.reset()
        return values

    def reduce_gradients(self, step: int, ctx: DistContext) -> None:
        average_gradients([p for _, p in self.trainable], ctx)

    def step_metrics(self, step: int, values: list[float]) -> dict:
        n = self.n_layers
        kl, mass, block = values[:n], values[n : 2 * n], values[2 * n :]
        return {
            "loss": self.config.loss_scale * sum(kl),
            "kl": sum(kl),
            "mass_recall": sum(mass) / n,
            "block_recall": sum(block) / n,
            "kl_layers": kl,
            "mass_recall_layers": mass,
        }

    def progress(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['loss']:.4f}", "recall": f"{metrics['mass_recall']:.3f}"}

    def tensorboard_scalars(self, metrics: dict) -> dict[str, float]:
        keys = ("loss", "kl", "mass_recall", "block_recall", "lr", "grad_norm", "tokens_per_s")
        out = {f"train/{k}": metrics[k] for k in keys}
        out.update({f"kl_layer/{i}": v for i, v in enumerate(metrics["kl_layers"])})
        out.update({f"mass_recall_layer/{i}": v for i, v in enumerate(metrics["mass_recall_layers"])})
        return out

    def checkpoint_state(self, optimizer, ctx: DistContext) -> dict:
        return {"gates": _gates_state(self.trainable), "optimizer": optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict, optimizer, ctx: DistContext) -> None:
        _load_gates_state(self.trainable, state["gates"])
        optimizer.load_state_dict(state["optimizer"])

    def save_outputs(self, out: Path, ctx: DistContext, tokenizer) -> dict[str, Path]:
        from ..hf import save_gates

        check_replicas([p for _, p in self.trainable], ctx)
        if ctx.is_main:
            save_gates(self.model, out / "adapter")
            logger.info("adapter written to %s", out / "adapter")
        return {"adapter": out / "adapter"}

    def summary(self, final: dict) -> dict:
        return {k: final.get(k) for k in ("loss", "kl", "mass_recall", "block_recall")}

    def model_info(self) -> dict:
        cfg = self.model.config
        return {"path": self.config.model, "model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers}


def distill(
    config: DistillConfig,
    *,
    resume: bool = False,
    model=None,
    tokenizer=None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the gates of ``config.model`` as the recipe says; the adapter lands in ``output_dir/adapter``.

    ``config.gate_kind`` picks the gate: the prefill AttnGates (this module) or the decode gates
    (:mod:`.decode_distill`).

    Args:
        config: the recipe (:func:`~seerattn.train.config.load_recipe`).
        resume: continue from the newest checkpoint in ``output_dir`` (a fresh start, logged, when there
            is none). Without it, an ``output_dir`` that already holds checkpoints is an error.
        model: a transformers causal LM to use instead of loading ``config.model`` (weights are frozen
            and gates attached in place); ``config.model`` is still recorded as the base model id.
        tokenizer: a tokenizer to use instead of loading ``config.tokenizer or config.model``.
        stop_after: stop right after this (1-based) global step without writing a checkpoint or the
            adapter, as if the process had been killed there (used to test resuming).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process calls this; see :mod:`.distributed`.
    """
    if not isinstance(config, DistillConfig):
        raise TypeError(f"distill needs a DistillConfig, got {type(config).__name__} (load_recipe(..., kind=...))")
    if config.gate_kind == "decode":
        from .decode_distill import DecodeDistillTask

        task = DecodeDistillTask(config, model)
    else:
        task = DistillTask(config, model)
    return run_training(task, resume=resume, tokenizer=tokenizer, stop_after=stop_after)
