"""Decode-gate distillation (``gate_kind: decode``): train SeerAttention-R decode gates against a frozen model.

Every token of a packed training row is taken as a decode query (teacher forcing): per layer and
KV group, the target is the token's attention over the key blocks completed before its own block,
max-pooled inside each block and over the group's query heads, renormalised
(:func:`~seerattn.ops.reference.decode_block_scores`, computed in query chunks); the gate's logits
are :meth:`DecodeGate.forward <seerattn.gate.DecodeGate.forward>` on the same rows, the layout of the
target. The loss is

    loss = loss_scale * sum over layers of decode_gate_loss(logits, target)

(per layer: KL per token row, mean over batch, KV heads and the rows that have a completed block; the
first ``skip_first_rows`` fraction of the rows is left out). The recall metrics use a token budget of
``metric_density`` x each row's context (:func:`~seerattn.gate.decode_gate_metrics`).

The model is not modified: its attention runs as loaded (SDPA), and the task registers its own forward
hooks: on the modules whose outputs are the pre-RoPE q and k (``seerattn.hf.integration.FAMILIES``:
``q_proj``/``k_proj``, or ``q_norm``/``k_norm`` for families with q/k-norm), and after each attention
module, where the layer's loss is computed and backpropagated into its gate right away (autocast off,
grad on, only the gate's parameters as inputs), so the forward runs under ``no_grad`` and no graph
outlives its layer, as in the prefill distillation. The target uses the post-RoPE q/k the model's
attention sees: the captured pre-RoPE tensors rotated with the ``position_embeddings`` the model hands
its attention module, and the module's own ``scaling``.

The gates are plain modules held by the task (one :class:`~seerattn.gate.DecodeGate` per layer, fp32),
checkpointed and resumed by the shared skeleton (:mod:`.trainer`). Output ``adapter/``: an adapter
with a ``decode`` section (:func:`save_decode_adapter`), which :func:`seerattn.hf.from_pretrained` loads.

Shape legend: B rows, Hq / Hkv heads, T tokens (``seq_len``), D head dim, NB blocks per row.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from ..gate import DecodeGate, DecodeGateConfig, apply_rotary, decode_gate_loss, decode_gate_metrics
from ..ops.reference import decode_block_scores
from .distill import DistillTask, _load_gates_state
from .distributed import DistContext, broadcast_parameters, check_replicas, shard_base_model
from .trainer import autocast, load_model

__all__ = ["DecodeDistillTask", "load_decode_gates", "save_decode_adapter"]

logger = logging.getLogger(__name__)


def _decode_gate_named_parameters(gates: torch.nn.ModuleList) -> list[tuple[str, torch.nn.Parameter]]:
    """``[("decode.layers.{i}.{name}", param)]``: the adapter's keys (:data:`seerattn.hf.adapter.DECODE_PREFIX`),
    also the checkpoint's."""
    from ..hf.adapter import DECODE_PREFIX

    return [(f"{DECODE_PREFIX}layers.{i}.{n}", p) for i, g in enumerate(gates) for n, p in g.named_parameters()]


def save_decode_adapter(gates: torch.nn.ModuleList, model, path: str | Path, base_model: str | None) -> Path:
    """Write decode gates as an adapter folder with a ``decode`` section only (:func:`seerattn.hf.write_adapter`:
    ``decode.layers.{i}.*`` tensors; the section holds the gate config and :class:`DecodePolicy`'s defaults)."""
    from ..hf import DecodeConfig, SeerConfig, write_adapter

    config = SeerConfig(gate=None, mode="dense", decode=DecodeConfig(gates[0].config), base_model=base_model)
    return write_adapter(path, model, config, decode_gates=list(gates))


def load_decode_gates(gates: torch.nn.ModuleList, model, path: str | Path) -> None:
    """Copy the decode gates of adapter ``path`` into ``gates`` (strict: model shape, gate config, every
    decode key and shape; nothing changes on an error). Other sections (prefill gates) are left alone."""
    from safetensors.torch import load_file

    from ..hf.adapter import ADAPTER_WEIGHTS, DECODE_PREFIX, _check_model_shape, read_adapter_config

    path = Path(path)
    meta = read_adapter_config(path)
    if meta["decode"] is None:
        raise ValueError(f"adapter {path} has no decode section: no decode gates to start from")
    _check_model_shape(meta, model, path)
    theirs = DecodeGateConfig.from_dict(meta["decode"]["gate"])
    if theirs != gates[0].config:
        raise ValueError(f"adapter {path} decode gate config {theirs} differs from the recipe's {gates[0].config}")
    saved = {k: v for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items() if k.startswith(DECODE_PREFIX)}
    named = _decode_gate_named_parameters(gates)
    bad = [n for n, p in named if n in saved and saved[n].shape != p.shape]
    if bad:
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: decode gate tensors of the wrong shape: {bad[:5]}")
    _load_gates_state(named, saved)  # checks the key set


def _capture(store: dict, layer: int, which: str, _module, _inputs, output) -> None:
    """Forward hook: a layer's pre-RoPE q or k (the producer module's output)."""
    store[(layer, which)] = output


class DecodeDistillTask(DistillTask):
    """Decode gates train against the frozen model's decode target (module docstring).

    The prefill task's optimizer groups, schedule, gradient averaging, checkpoint state and logging apply
    unchanged to the decode gates (``trainable`` holds them); the metrics add the oracle's mass recall.
    """

    def build(self, ctx: DistContext, dtype: torch.dtype, start: int) -> None:
        from ..hf.integration import FAMILIES, _decoder_layers, _family, _heads

        config = self.config
        if self.model is None:
            self.model = load_model(config, dtype)
        model = self.model
        model.requires_grad_(False)
        model.eval()
        model.config.use_cache = False
        _, (q_name, k_name) = _family(model)
        self.base, layers = _decoder_layers(model)
        self.n_layers = len(layers)
        gate_cfg = config.decode_gate_config()
        self.rotary = getattr(self.base, "rotary_emb", None)
        if gate_cfg.use_rope and self.rotary is None:
            raise ValueError(f"{type(model).__name__} has no shared rotary embedding (`.model.rotary_emb`)")
        gates = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            hq, hkv, d = _heads(attn)
            if gate_cfg.use_rope and (gate_cfg.gate_dim or d) != d:
                raise ValueError(f"decode_gate.gate_dim ({gate_cfg.gate_dim}) must equal the head dim ({d}) with RoPE")
            if not hasattr(attn, "scaling"):
                raise ValueError(
                    f"layer {i}'s attention module has no `scaling` (its softmax scale), which the decode target "
                    f"needs; supported families: {sorted(FAMILIES)}"
                )
            gates.append(DecodeGate(hq, hkv, d, gate_cfg))
        self.gates = torch.nn.ModuleList(gates)
        if config.init_gates is not None:
            load_decode_gates(self.gates, model, config.init_gates)
            logger.info("decode gates start from %s", config.init_gates)
        self.trainable = _decode_gate_named_parameters(self.gates)
        params = [p for _, p in self.trainable]
        for p in params:
            p.requires_grad_(True)
        if self.data_parallel() == "fsdp" and ctx.distributed:
            shard_base_model(self.base, layers, set(), ctx)  # the gates are not in the model: nothing to leave out
        else:
            if self.data_parallel() == "fsdp":
                logger.info("parallel=fsdp with a single process: nothing to shard, running unsharded")
            model.to(ctx.device)
        self.gates.to(ctx.device)
        broadcast_parameters(params, ctx)
        self.device = ctx.device
        self._store: dict = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.metrics: dict[int, dict] = {}
        self._grad_scale = 1.0
        self._hooks = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            for name, which in ((q_name, "q"), (k_name, "k")):
                hook = functools.partial(_capture, self._store, i, which)
                self._hooks.append(getattr(attn, name).register_forward_hook(hook))
            hook = functools.partial(self._layer_loss, i)
            self._hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
        logger.info("base frozen (%s, %s); %d layer(s) of decode gates train", dtype, ctx.device, self.n_layers)

    def _layer_loss(self, layer: int, module, _args, kwargs, output) -> None:
        """Forward hook after attention module ``layer``: its loss, gradient and metrics (module docstring)."""
        q_pre, k_pre = self._store.pop((layer, "q")), self._store.pop((layer, "k"))
        rope = kwargs.get("position_embeddings")
        if rope is None:
            raise RuntimeError(
                f"layer {layer}: the attention module was called without position_embeddings (cos, sin) as a "
                "keyword; this transformers version calls attention differently from what decode distillation reads"
            )
        gate = self.gates[layer]
        b, t = q_pre.shape[:2]
        hq, hkv, d = gate.num_q_heads, gate.num_kv_heads, gate.head_dim
        q_pre = q_pre.detach().reshape(b, t, hq, d).transpose(1, 2)
        k_pre = k_pre.detach().reshape(b, t, hkv, d).transpose(1, 2)
        cfg = self.config
        with torch.autocast(q_pre.device.type, enabled=False):
            with torch.no_grad():
                cos, sin = (x.float() for x in rope)
                q, k = apply_rotary(q_pre.float(), cos, sin), apply_rotary(k_pre.float(), cos, sin)
                target = decode_block_scores(q, k, gate.config.block_size, scale=module.scaling)
                del q, k
            with torch.enable_grad():
                logits = gate(q_pre, k_pre, self.rotary)
                loss = decode_gate_loss(logits, target, skip_rows=min(int(cfg.skip_first_rows * t), t - 1))
                torch.autograd.backward(self._grad_scale * loss, inputs=list(gate.parameters()))
        self.losses[layer] = loss.detach()
        self.metrics[layer] = decode_gate_metrics(logits.detach(), target, cfg.metric_density, gate.config.block_size)

    def micro_step(self, step: int, ids: torch.Tensor, accum: int) -> torch.Tensor:
        n = self.n_layers
        self.losses.clear()
        self.metrics.clear()
        self._store.clear()
        self._grad_scale = self.config.loss_scale / accum
        with autocast(self.config, ids.device), torch.no_grad():
            self.base(input_ids=ids, use_cache=False)
        if len(self.losses) != n:
            raise RuntimeError(f"{len(self.losses)} of {n} layers recorded a decode gate loss")
        kl = torch.stack([self.losses[i] for i in range(n)]).double()
        per_layer = {
            key: torch.tensor([self.metrics[i][key] for i in range(n)], dtype=torch.float64, device=ids.device)
            for key in ("mass_recall", "block_recall", "oracle_mass_recall")
        }
        return torch.cat([kl, per_layer["mass_recall"], per_layer["block_recall"], per_layer["oracle_mass_recall"]])

    def step_metrics(self, step: int, values: list[float]) -> dict:
        n = self.n_layers
        out = super().step_metrics(step, values[: 3 * n])
        out["oracle_mass_recall"] = sum(values[3 * n :]) / n
        return out

    def summary(self, final: dict) -> dict:
        return {k: final.get(k) for k in ("loss", "kl", "mass_recall", "block_recall", "oracle_mass_recall")}

    def save_outputs(self, out: Path, ctx: DistContext, tokenizer) -> dict[str, Path]:
        check_replicas([p for _, p in self.trainable], ctx)
        if ctx.is_main:
            save_decode_adapter(self.gates, self.model, out / "adapter", self.config.model)
            logger.info("adapter (decode gates) written to %s", out / "adapter")
        return {"adapter": out / "adapter"}
