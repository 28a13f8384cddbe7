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
checkpointed and resumed by the shared skeleton (:mod:`.trainer`). Output ``adapter/``: see
:func:`save_decode_adapter`.

Shape legend: B rows, Hq / Hkv heads, T tokens (``seq_len``), D head dim, NB blocks per row.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from ..decode_policy import DecodePolicy
from ..gate import DecodeGate, DecodeGateConfig, apply_rotary, decode_gate_loss, decode_gate_metrics
from ..ops.reference import decode_block_scores
from .distill import DistillTask, _load_gates_state
from .distributed import DistContext, broadcast_parameters, check_replicas, shard_base_model
from .trainer import autocast, load_model

__all__ = ["DECODE_PREFIX", "DecodeDistillTask", "load_decode_gates", "save_decode_adapter"]

logger = logging.getLogger(__name__)

#: key prefix of the decode gates in ``seer_gates.safetensors`` (then ``layers.{i}.<DecodeGate parameter>``)
DECODE_PREFIX = "decode."


def _decode_gate_named_parameters(gates: torch.nn.ModuleList) -> list[tuple[str, torch.nn.Parameter]]:
    """``[("decode.layers.{i}.{name}", param)]``: the adapter's keys, also the checkpoint's."""
    return [(f"{DECODE_PREFIX}layers.{i}.{n}", p) for i, g in enumerate(gates) for n, p in g.named_parameters()]


def save_decode_adapter(gates: torch.nn.ModuleList, model, path: str | Path, base_model: str | None) -> Path:
    """Write decode gates as an adapter folder (the prefill gates' folder layout, a ``decode`` section).

    - ``seer_gates.safetensors``: ``decode.layers.{i}.q_proj`` [Hkv, G*D, Dg], ``decode.layers.{i}.k_proj``
      [Hkv, Ck*D, Dg], ``decode.layers.{i}.q_norm.weight`` and ``.k_norm.weight`` [Dg];
    - ``seer_config.json``: ``format_version``, ``library_version``, ``base_model``, ``model`` (the shape,
      as prefill adapters record it) and ``decode``: ``{"gate": DecodeGateConfig fields, "policy":
      DecodePolicy fields}`` (the policy a loader uses by default: :class:`DecodePolicy`'s defaults).
      No ``gate``/``policy`` prefill fields: this adapter holds no prefill gates.
    """
    from safetensors.torch import save_file

    from .. import __version__
    from ..hf.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT_VERSION, _model_shape

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous().cpu() for n, p in _decode_gate_named_parameters(gates)}
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "base_model": base_model,
        "model": _model_shape(model),
        "decode": {"gate": gates[0].config.to_dict(), "policy": asdict(DecodePolicy())},
    }
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "seerattn", "version": str(FORMAT_VERSION)})
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_decode_gates(gates: torch.nn.ModuleList, model, path: str | Path) -> None:
    """Copy the decode gates of adapter ``path`` into ``gates`` (strict: model shape, gate config, every key
    and shape; nothing changes on an error). Other sections of the adapter (prefill gates) are left alone."""
    from safetensors.torch import load_file

    from ..hf.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _model_shape

    path = Path(path)
    cfg_path, w_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{path} is not an adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    meta = json.loads(cfg_path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("decode"), dict) or "gate" not in meta["decode"]:
        raise ValueError(f"{cfg_path} has no 'decode' section with a 'gate' (DecodeGateConfig): no decode gates there")
    if meta.get("model") != _model_shape(model):
        raise ValueError(f"adapter {path} was made for the model shape {meta.get('model')}, not {_model_shape(model)}")
    theirs = DecodeGateConfig.from_dict(meta["decode"]["gate"])
    if theirs != gates[0].config:
        raise ValueError(f"adapter {path} decode gate config {theirs} differs from the recipe's {gates[0].config}")
    saved = {k: v for k, v in load_file(str(w_path)).items() if k.startswith(DECODE_PREFIX)}
    named = _decode_gate_named_parameters(gates)
    bad = [n for n, p in named if n in saved and saved[n].shape != p.shape]
    if bad:
        raise ValueError(f"{w_path}: decode gate tensors of the wrong shape: {bad[:5]}")
    _load_gates_state(named, saved)  # checks the key set


def _capture(store: dict, layer: int, which: str, _module, _inputs, output) -> None:
    """Forward hook: a layer's pre-RoPE q or k (the producer module's output)."""
    store[(layer, which)] = output


class DecodeDistillTask(DistillTask):
    """Decode gates train against the frozen model's decode target (module docstring).

    The prefill task's optimizer groups, schedule, gradient averaging, checkpoint state, logging and
    summary apply unchanged to the decode gates (``trainable`` holds them).
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
            shard_base_model(self.base, layers, set(params), ctx)
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
