"""Long-context fine-tuning with YaRN and SeerAttention: the model and its gates trained together.

A :class:`FinetuneTask` on the shared trainer skeleton (:mod:`.trainer`):

1. the model is loaded in ``model_dtype`` (float32 master weights by default; bf16 autocast on CUDA),
   its RoPE scaled through its own config (``rope``: YaRN factor and original length), which the
   gates' block RoPE follows because it calls the model's rotary module;
2. gates are attached (:func:`seerattn.hf.apply_seer_attention`) and loaded from ``init_gates``, or
   start fresh and are distilled first for ``distill_steps`` (model frozen by construction: the
   ``distill`` mode's output carries no gradient to the weights);
3. joint steps run the model in ``finetune`` mode: block-sparse attention with the gates' mask in
   forward and backward, gate inputs detached, the gate's target from the ground-truth kernel under
   ``no_grad``; ``loss = CE + gate_loss_weight * sum over layers of the gate KL`` (each layer takes its
   KL's gradient in its own forward: ``SeerState.gate_grad_scale``). The CE comes from the final hidden states
   through the LM head over ``loss_chunk_tokens`` positions at a time (:mod:`.lm_loss`: no ``[B, T, V]`` logits;
   0/null = transformers' full-logit loss). With ``gate_target_every: N`` the
   ground truth and the gate loss run on every N-th joint step only, the others in ``sparse`` mode (the
   gate for the mask only). With ``attention: dense`` the same loop runs SDPA and trains the model alone
   (the dense baseline);
4. model weights train in full or through LoRA (``peft``); gradient checkpointing per decoder layer;
   under ``torchrun`` replicated (``ddp``: gradients all-reduced) or FSDP2-sharded per decoder layer
   (``fsdp``: weight gradients reduce-scattered by FSDP; the gates stay replicated, their gradients
   all-reduced, as in distillation: they are a few MB, and each layer takes its gate loss's gradient
   inside its own forward (``SeerState.gate_grad_scale``), outside FSDP's per-layer gradient hooks);
5. outputs: ``model/`` (``save_pretrained``: safetensors, LoRA merged, the scaled RoPE in its
   config, the tokenizer) and ``adapter/`` (the gates, :func:`seerattn.hf.save_gates`), so that
   ``seerattn eval ppl --model OUT/model --gates OUT/adapter`` runs on the result.

Entry point: :func:`finetune` (the ``seerattn finetune`` command calls it).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .config import ConfigError, FinetuneConfig
from .distill import _gates_state, _load_gates_state, gate_named_parameters
from .distributed import DistContext, average_gradients, broadcast_parameters, check_replicas, shard_base_model
from .lm_loss import causal_lm_loss
from .trainer import Task, TrainResult, autocast, load_model, run_training, schedule_multiplier

__all__ = ["FinetuneTask", "enable_gradient_checkpointing", "finetune"]

logger = logging.getLogger(__name__)

_GATE_KEY = ".seer_gate."  # in the model's parameter names


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward (transformers' non-reentrant ``torch.utils.checkpoint``).

    transformers 5.18+ calls it ``activation_checkpointing_enable``; older releases
    ``gradient_checkpointing_enable`` (deprecated since). With seer attention attached (before or after
    this call), a recompute reuses the block masks of its forward instead of running the gate and the
    policy again (:func:`seerattn.hf.integration.checkpoint_context_fn`).
    """
    from ..hf.integration import checkpoint_context_fn

    kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn(model)}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class FinetuneTask(Task):
    """Joint fine-tuning of a causal LM and its gates (module docstring)."""

    kind = "finetune"

    # ------------------------------------------------------------------------------ build
    def build(self, ctx: DistContext, dtype: torch.dtype, start: int) -> None:
        from ..hf import SeerConfig, apply_seer_attention, get_seer_state, load_gates, read_adapter_config
        from ..hf.integration import _decoder_layers
        from ..hf.lm_head import linear_lm_head
        from ..hf.rope import apply_rope_scaling

        config: FinetuneConfig = self.config
        if self.model is None:
            self.model = load_model(config, dtype)
        self.rope = None
        if config.rope:
            r = config.rope
            self.rope = apply_rope_scaling(
                self.model, r["rope_type"], float(r["factor"]), r["original_max_position_embeddings"]
            )
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos is not None and config.seq_len > max_pos:
            raise ConfigError(
                f"recipe field 'seq_len' ({config.seq_len}) exceeds the model's max_position_embeddings ({max_pos}) "
                "after RoPE scaling; set rope (e.g. {rope_type: yarn, factor: 4, original_max_position_embeddings: "
                f"{max_pos}}}) or lower seq_len"
            )
        self.model.config.use_cache = False
        self.peft = None
        if config.lora:
            from peft import LoraConfig, get_peft_model

            lora = config.lora
            # before the gates: peft replaces q_proj/k_proj with wrappers, and the pre-RoPE hooks
            # must sit on the wrappers (whose output includes the LoRA update)
            self.peft = get_peft_model(
                self.model,
                LoraConfig(
                    r=lora["r"],
                    lora_alpha=lora["alpha"],
                    target_modules=list(lora["target_modules"]),
                    lora_dropout=float(lora.get("dropout", 0.0)),
                    bias="none",
                ),
            )
            self.lm = self.peft.get_base_model()
        else:
            self.lm = self.model
            self.lm.requires_grad_(True)
        self.head = None
        if config.loss_chunk_tokens:
            # checked here, after LoRA wraps its targets (lm_head among them would be refused) and before sharding
            try:
                self.head = linear_lm_head(self.lm)
            except ValueError as e:
                raise ConfigError(
                    f"recipe field 'loss_chunk_tokens' ({config.loss_chunk_tokens}): {e}; set loss_chunk_tokens=null "
                    "for transformers' full-logit loss"
                ) from e
        sparse = config.attention == "sparse"
        gate_cfg, mask_heads = config.gate_config(), config.mask_heads or "q"
        if config.init_gates is not None:
            prefill = read_adapter_config(config.init_gates)["prefill"]
            if prefill is None:
                raise ConfigError(
                    f"init_gates ({config.init_gates}) holds no prefill gates (a decode-only adapter); fine-tuning "
                    "starts from prefill gates"
                )
            from ..gate import GateConfig

            adapter_gate = GateConfig.from_dict(prefill["gate"])
            if config.gate and config.gate_config() != adapter_gate:
                raise ConfigError(
                    f"recipe field 'gate' {config.gate} differs from the gates of init_gates ({config.init_gates}: "
                    f"{prefill['gate']}); leave 'gate' empty to take the adapter's"
                )
            gate_cfg, mask_heads = adapter_gate, config.mask_heads or prefill["mask_heads"]
            if config.seq_len % gate_cfg.block_size:
                raise ConfigError(
                    f"recipe field 'seq_len' ({config.seq_len}) must be a multiple of the adapter's block size "
                    f"({gate_cfg.block_size})"
                )
        seer_cfg = SeerConfig(
            gate=gate_cfg,
            policy=config.sparsity_policy() if sparse else SeerConfig().policy,
            mode=self._mode(start),
            impl=config.impl,
            mask_heads=mask_heads,
            skip_first_rows=config.skip_first_rows,
            metric_density=config.metric_density,
            base_model=config.model,
        )
        apply_seer_attention(self.lm, seer_cfg)
        self.state = get_seer_state(self.lm)
        if config.init_gates is not None:
            load_gates(self.lm, config.init_gates)
        self.gates = gate_named_parameters(self.lm)
        for _, p in self.gates:
            p.requires_grad_(sparse)
        self.lm.train()
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.lm)
        base, layers = _decoder_layers(self.lm)
        self.n_layers = len(layers)
        self.fsdp = self.data_parallel() == "fsdp" and ctx.distributed
        if self.fsdp:
            # the whole causal LM is the root unit (embeddings, final norm and the LM head, tied or not)
            shard_base_model(self.lm, layers, {p for _, p in self.gates}, ctx)
        else:
            if self.data_parallel() == "fsdp":
                logger.info("parallel=fsdp with a single process: nothing to shard, running unsharded")
            self.lm.to(ctx.device)
        # after sharding: fully_shard replaces the module's parameters with sharded ones (DTensors)
        self.weights = [(n, p) for n, p in self.lm.named_parameters() if p.requires_grad and _GATE_KEY not in f".{n}"]
        self.trainable = self.weights + (self.gates if sparse else [])
        if not self.fsdp:
            broadcast_parameters([p for _, p in self.weights], ctx)
        broadcast_parameters([p for _, p in self.gates], ctx)
        logger.info(
            "finetune: %s attention%s, %s weights (%s), RoPE %s, gates %s",
            config.attention,
            f" at {config.policy}" if sparse else "",
            "LoRA" if self.peft is not None else "all",
            dtype,
            self.rope or "unchanged",
            config.init_gates or (f"fresh, distilled for {config.distill_steps} steps" if sparse else "unused"),
        )

    def _phase(self, step: int) -> str:
        return "distill" if step < self.config.distill_steps else "joint"

    def _gate_target(self, step: int) -> bool:
        """Whether 0-based ``step`` trains the gates: each distillation step, every ``gate_target_every``-th joint
        one (the first included)."""
        c = self.config
        return c.attention == "sparse" and (
            step < c.distill_steps or (step - c.distill_steps) % c.gate_target_every == 0
        )

    def _mode(self, step: int) -> str:
        """The attention mode of ``step``: ``distill``; ``finetune`` (with the gate's target) or ``sparse`` (the
        gate for the mask only, under no_grad; same mask, attention differentiable the same way); ``dense``."""
        if self.config.attention == "dense":
            return "dense"
        if self._phase(step) == "distill":
            return "distill"
        return "finetune" if self._gate_target(step) else "sparse"

    def data_parallel(self) -> str:
        return "ddp" if self.config.parallel == "auto" else self.config.parallel

    # ------------------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for _, p in self.weights], "lr": self.config.lr}]
        if self.config.attention == "sparse":
            groups.append({"params": [p for _, p in self.gates], "lr": self.config.gate_lr})
        return groups

    def lr_lambdas(self):
        c = self.config
        d = c.distill_steps

        def weights(step: int) -> float:  # warmup and decay over the joint steps only
            return (
                0.0 if step < d else schedule_multiplier(step - d, c.warmup_steps, c.steps, c.schedule, c.min_lr_ratio)
            )

        def gates(step: int) -> float:
            return schedule_multiplier(step, c.warmup_steps, c.total_steps, c.schedule, c.min_lr_ratio)

        return [weights, gates] if c.attention == "sparse" else [weights]

    def micro_step(self, step: int, ids: torch.Tensor, accum: int) -> torch.Tensor:
        c, state, n = self.config, self.state, self.n_layers
        phase, target, mode = self._phase(step), self._gate_target(step), self._mode(step)
        if state.config.mode != mode:
            if (state.config.mode == "distill") != (phase == "distill"):
                logger.info("step %d: %s phase (attention mode %s)", step + 1, phase, mode)
            state.set(mode=mode)
        state.reset()
        # each layer takes its gate loss's gradient itself (SeerState.gate_grad_scale): no gate graph outlives
        # its layer; the scale is what (gate_loss_weight * sum of the losses / accum).backward() would give
        state.gate_grad_scale = c.gate_loss_weight / accum if target else None
        try:
            with autocast(c, ids.device):
                if phase == "distill":
                    # no graph through the frozen model (the gates' gradients are taken in the layers), and the
                    # LM head of one position only: the distillation loss needs the layers, not the logits
                    with torch.no_grad():
                        self.lm(input_ids=ids, use_cache=False, logits_to_keep=1)
                    ce = torch.zeros((), device=ids.device)
                else:
                    ce = self._lm_loss(ids)
        finally:
            state.gate_grad_scale = None
        if phase == "joint":
            (ce / accum).backward()
        if len(state.losses) != (n if target else 0):
            raise RuntimeError(f"{len(state.losses)} of {n} layers recorded a gate loss at step {step + 1} ({mode})")
        if target:
            kl = torch.stack([state.losses[i] for i in range(n)])
            mass = [state.metrics[i]["mass_recall"] for i in range(n)]
        else:  # dense attention (0: no gate), or no gate target this step (NaN: logged as null)
            nothing = 0.0 if c.attention == "dense" else math.nan
            kl = torch.full((n,), nothing, device=ids.device)
            mass = [1.0 if c.attention == "dense" else math.nan] * n
        density = [state.stats[i].get("density", 1.0) for i in range(n)] if c.attention == "sparse" else [1.0] * n
        values = torch.cat(
            [
                ce.detach().double().reshape(1),
                kl.double(),
                torch.tensor(mass + density, dtype=torch.float64, device=ids.device),
            ]
        )
        state.reset()
        return values

    def _lm_loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``ids`` [b, T] (the labels are the ids: packed rows are scored across
        document boundaries), chunked (``loss_chunk_tokens``) or transformers' full-logit loss."""
        if self.head is None:
            return self.lm(input_ids=ids, labels=ids, use_cache=False).loss
        from torch.distributed.tensor import DTensor

        from ..hf.lm_head import final_hidden_states

        hidden = final_hidden_states(self.lm, ids)
        # read after the forward: under FSDP2 the root unit (embeddings, norm, LM head) is gathered by its forward and
        # stays gathered until its backward, so this is the whole weight
        weight = self.head.weight
        if isinstance(weight, DTensor):
            raise RuntimeError(
                "the LM head's weight is still sharded after the causal LM's forward (FSDP2 resharded "
                "the root unit); the chunked LM loss needs the gathered weight"
            )
        return causal_lm_loss(hidden, weight, ids, self.config.loss_chunk_tokens)

    def reduce_gradients(self, step: int, ctx: DistContext) -> None:
        if self._gate_target(step):  # else the gates have no gradient (gate_target_every)
            average_gradients([p for _, p in self.gates], ctx)
        if not self.fsdp and self._phase(step) == "joint":  # FSDP reduce-scatters the weights' gradients itself
            average_gradients([p for _, p in self.weights], ctx)

    def step_metrics(self, step: int, values: list[float]) -> dict:
        n, c = self.n_layers, self.config
        ce, kl, mass, density = values[0], values[1 : 1 + n], values[1 + n : 1 + 2 * n], values[1 + 2 * n :]
        phase, target = self._phase(step), self._gate_target(step) or c.attention == "dense"
        return {
            "phase": phase,
            "gate_target": self._gate_target(step),
            "loss": (ce if phase == "joint" else 0.0) + (c.gate_loss_weight * sum(kl) if target else 0.0),
            "ce": ce,
            # null on joint steps without a gate target (gate_target_every): nothing was measured
            "kl": sum(kl) if target else None,
            "mass_recall": sum(mass) / n if target else None,
            "density": sum(density) / n,
            "kl_layers": kl if target else None,
            "mass_recall_layers": mass if target else None,
        }

    def progress(self, metrics: dict) -> dict:
        return {
            "ce": f"{metrics['ce']:.3f}",
            "kl": "-" if metrics["kl"] is None else f"{metrics['kl']:.3f}",
            "density": f"{metrics['density']:.2f}",
        }

    def tensorboard_scalars(self, metrics: dict) -> dict[str, float]:
        keys = ("loss", "ce", "kl", "mass_recall", "density", "lr", "grad_norm", "tokens_per_s")
        out = {f"train/{k}": metrics[k] for k in keys if metrics[k] is not None}
        out.update({f"kl_layer/{i}": v for i, v in enumerate(metrics["kl_layers"] or [])})
        return out

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, optimizer, ctx: DistContext) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            return {
                "model": get_model_state_dict(self.lm, options=opts),
                "optimizer": get_optimizer_state_dict(self.lm, optimizer, options=opts),
            }
        return {
            "model": _gates_state(self.trainable),  # every trainable tensor by its model name
            "optimizer": optimizer.state_dict(),
        }

    def load_checkpoint_state(self, state: dict, optimizer, ctx: DistContext) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
            set_model_state_dict(self.lm, state["model"], options=opts)
            set_optimizer_state_dict(self.lm, optimizer, state["optimizer"], options=opts)
            return
        _load_gates_state(self.trainable, state["model"])
        optimizer.load_state_dict(state["optimizer"])

    # ------------------------------------------------------------------------------ outputs
    def save_outputs(self, out: Path, ctx: DistContext, tokenizer) -> dict[str, Path]:
        from ..hf import remove_seer_attention, save_gates

        c = self.config
        sparse = c.attention == "sparse"
        if sparse:
            check_replicas([p for _, p in self.gates], ctx)
        full = None
        if self.fsdp:  # a collective: every rank takes part, rank 0 keeps the gathered tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        outputs = {"model": out / "model"}
        if sparse:
            outputs["adapter"] = out / "adapter"
        if ctx.is_main:
            if sparse:
                save_gates(self.lm, out / "adapter")
            lm = self.lm
            lm.config.use_cache = True  # off for training only; generation wants it
            if full is None:
                remove_seer_attention(lm)  # the saved model is a plain transformers model
                if self.peft is not None:
                    lm = self.peft.merge_and_unload()
                lm.save_pretrained(out / "model", max_shard_size=c.max_shard_size)
            else:
                weights = {k: v for k, v in full.items() if _GATE_KEY not in f".{k}"}
                lm.config._attn_implementation = self.state._original_impl
                lm.save_pretrained(out / "model", state_dict=weights, max_shard_size=c.max_shard_size)
            tokenizer.save_pretrained(out / "model")
            logger.info("model written to %s%s", out / "model", f", gates to {out / 'adapter'}" if sparse else "")
        ctx.barrier()
        return outputs

    def summary(self, final: dict) -> dict:
        return {k: final.get(k) for k in ("loss", "ce", "kl", "mass_recall", "density")}

    def model_info(self) -> dict:
        cfg = self.lm.config
        return {
            "path": self.config.model,
            "model_type": cfg.model_type,
            "num_hidden_layers": cfg.num_hidden_layers,
            "rope_parameters": self.rope,
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
            "init_gates": self.config.init_gates,
            "lora": self.config.lora or None,
        }


def finetune(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    model=None,
    tokenizer=None,
    stop_after: int | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` and its gates as the recipe says (module docstring).

    Args:
        config: the recipe (``load_recipe(path, overrides, kind=FinetuneConfig)``).
        resume: continue from the newest checkpoint in ``output_dir``.
        model: a transformers causal LM to use instead of loading ``config.model`` (modified in place:
            RoPE scaling, LoRA, gates); ``config.model`` is still recorded.
        tokenizer: a tokenizer instead of loading ``config.tokenizer or config.model`` (saved with the model).
        stop_after: stop right after this (1-based) global step without a checkpoint or outputs, as if killed.

    Returns:
        :class:`~seerattn.train.trainer.TrainResult`; ``result.model`` / ``result.adapter`` are the outputs.
    """
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"finetune needs a FinetuneConfig, got {type(config).__name__} (load_recipe(..., kind=...))")
    return run_training(FinetuneTask(config, model), resume=resume, tokenizer=tokenizer, stop_after=stop_after)
