"""Gates-only adapters: save, load, attach to a base model, convert the official checkpoint.

An adapter is a folder with

- ``seer_config.json``: format and library version, base model id, model shape, gate config,
  sparsity policy and default mode;
- ``seer_gates.safetensors``: ``layers.{i}.k_proj`` ``[Hq, Ck*D, Dg]`` and, when the gate has
  one, ``layers.{i}.q_proj`` ``[Hq, Cq*D, Dg]``.

Loading is all-or-nothing: the config, the model shape, every key and every tensor shape are
checked and the weights read before the model is touched, so a load that fails leaves the model
exactly as it was (no gates, hooks or attention mode left behind).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..block_mask import SparsityPolicy
from ..gate import AttnGate, GateConfig
from .integration import (
    SeerConfig,
    _decoder_layers,
    _heads,
    apply_seer_attention,
    gate_modules,
    get_seer_state,
    remove_seer_attention,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "convert_official_checkpoint",
    "from_pretrained",
    "load_gates",
    "save_gates",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ADAPTER_CONFIG = "seer_config.json"
ADAPTER_WEIGHTS = "seer_gates.safetensors"


def _model_shape(model) -> dict:
    cfg = model.config
    hq = cfg.num_attention_heads
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": hq,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or hq,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // hq,
    }


def save_gates(model, path: str | Path, mode: str = "sparse") -> Path:
    """Write the gates of ``model`` (prepared by ``apply_seer_attention``) as an adapter folder.

    ``mode`` is the mode :func:`from_pretrained` attaches the gates in by default (a model saved
    while distilling is meant to be loaded for sparse inference).
    """
    from .. import __version__

    state = get_seer_state(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, gate in gate_modules(model).items():
        tensors[f"layers.{i}.k_proj"] = gate.k_proj.detach().contiguous().cpu()
        if gate.q_proj is not None:
            tensors[f"layers.{i}.q_proj"] = gate.q_proj.detach().contiguous().cpu()
    cfg = state.config
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "base_model": cfg.base_model or getattr(model.config, "_name_or_path", None) or None,
        "model": _model_shape(model),
        "gate": cfg.gate.to_dict(),
        "policy": cfg.policy.to_dict(),
        "mode": mode,
        "mask_heads": cfg.mask_heads,
    }
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "seerattn", "version": str(FORMAT_VERSION)})
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter_config(path: str | Path) -> dict:
    """The parsed ``seer_config.json`` of an adapter folder, validated."""
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}: not a seerattn adapter folder")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    required = {"format_version", "model", "gate", "policy"}
    if not isinstance(meta, dict):
        raise ValueError(
            f"{cfg_path} holds a JSON {type(meta).__name__}, expected an object with fields {sorted(required)}"
        )
    if not required <= set(meta):
        raise ValueError(f"{cfg_path} lacks required fields {sorted(required - set(meta))}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path} has format_version {meta['format_version']!r}; this seerattn reads {FORMAT_VERSION}"
        )
    for name, what in (
        ("model", "the model shape"),
        ("gate", "GateConfig fields"),
        ("policy", "SparsityPolicy fields"),
    ):
        if not isinstance(meta[name], dict):
            raise ValueError(f"{cfg_path}: {name!r} must be an object ({what}), got {json.dumps(meta[name])}")
    shape_keys = {"model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"}
    if set(meta["model"]) != shape_keys:
        raise ValueError(
            f"{cfg_path}: 'model' must have exactly the fields {sorted(shape_keys)}, got {sorted(meta['model'])}"
        )
    return meta


def config_from_adapter(meta: dict, **overrides) -> SeerConfig:
    """A :class:`SeerConfig` from an adapter's metadata, with field overrides (e.g. ``mode=``)."""
    accepted = set(SeerConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"unknown SeerConfig field(s) {unknown}; accepted: {sorted(accepted)}")
    fields = {
        "gate": GateConfig.from_dict(meta["gate"]),
        "policy": SparsityPolicy.from_dict(meta["policy"]),
        "mode": meta.get("mode", "sparse"),
        "mask_heads": meta.get("mask_heads", "q"),
        "base_model": meta.get("base_model"),
    }
    fields.update(overrides)
    return SeerConfig(**fields)


def _check_model_shape(meta: dict, model, path: Path) -> None:
    want, have = meta["model"], _model_shape(model)
    if want != have:
        diff = {k: (want.get(k), have.get(k)) for k in set(want) | set(have) if want.get(k) != have.get(k)}
        raise ValueError(f"adapter {path} was made for another model shape; (adapter, model) differ in {diff}")


def _gate_shapes(model, gate: GateConfig) -> dict[str, tuple[int, ...]]:
    """Adapter key -> shape of the gate tensors that ``gate`` gives ``model`` (built on the meta
    device: nothing is attached, no memory used)."""
    _, layers = _decoder_layers(model)
    shapes = {}
    for i, layer in enumerate(layers):
        with torch.device("meta"):
            g = AttnGate(*_heads(layer.self_attn), gate)
        shapes[f"layers.{i}.k_proj"] = tuple(g.k_proj.shape)
        if g.q_proj is not None:
            shapes[f"layers.{i}.q_proj"] = tuple(g.q_proj.shape)
    return shapes


def _read_gate_tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of ``path/seer_gates.safetensors``, checked against ``shapes`` (keys and shapes)."""
    wpath = path / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path}")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{wpath} is not a readable safetensors file: {e}") from e
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{wpath}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, shape in shapes.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{wpath}: {key} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{wpath}: {key} has dtype {t.dtype}, expected a floating-point dtype")
    return tensors


def _copy_into_gates(model, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, gate in gate_modules(model).items():
            gate.k_proj.copy_(tensors[f"layers.{i}.k_proj"])
            if gate.q_proj is not None:
                gate.q_proj.copy_(tensors[f"layers.{i}.q_proj"])


def load_gates(model, path: str | Path) -> None:
    """Load adapter weights into the gates of a prepared model (strict: keys, shapes, model shape).

    Every check runs and the file is read before any gate changes: on an error the gates are as they were.
    """
    path = Path(path)
    meta = read_adapter_config(path)
    _check_model_shape(meta, model, path)
    state = get_seer_state(model)
    if GateConfig.from_dict(meta["gate"]) != state.config.gate:
        raise ValueError(
            f"adapter gate config {meta['gate']} differs from the attached gates' {state.config.gate.to_dict()}"
        )
    _copy_into_gates(model, _read_gate_tensors(path, _gate_shapes(model, state.config.gate)))


def from_pretrained(base, gates: str | Path, **config_overrides):
    """Load a base model (a model object or a path/id for ``AutoModelForCausalLM``) and attach an adapter.

    ``config_overrides`` replace :class:`SeerConfig` fields (``mode``, ``policy``, ``impl``...).
    Returns the model (its state: :func:`~seerattn.hf.get_seer_state`).

    All-or-nothing: the adapter's config and weights are validated and read before the gates are
    attached; on any error a model passed in is left exactly as it was (a retry can follow).
    """
    gates = Path(gates)
    meta = read_adapter_config(gates)
    config = config_from_adapter(meta, **config_overrides)
    config.policy.check_num_layers(meta["model"]["num_hidden_layers"])
    if isinstance(base, (str, Path)):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(base))
    _check_model_shape(meta, base, gates)
    tensors = _read_gate_tensors(gates, _gate_shapes(base, config.gate))
    apply_seer_attention(base, config)
    try:
        _copy_into_gates(base, tensors)
    except BaseException:  # not expected after the checks above; whatever it is, take the gates off again
        remove_seer_attention(base)
        raise
    return base


def convert_official_checkpoint(
    src: str | Path,
    dst: str | Path,
    model_config,
    base_model: str | None = None,
    gate: GateConfig | None = None,
) -> Path:
    """Convert the official ``attn_gate_weights.pth`` into a seerattn adapter folder.

    The official file maps ``model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight`` to
    ``[Hq, 3*D, Dg]`` (K pooled as max, min, avg) and, optionally, ``...mask_linear_q.weight`` to
    ``[Hq, D, Dg]``. It is read with ``torch.load(weights_only=True)`` (no pickled code runs).

    Args:
        src: the ``.pth`` file.
        dst: the adapter folder to write.
        model_config: the base model's transformers config (for the shape checks).
        base_model: id recorded in the adapter.
        gate: gate config; default the paper's (block 64, Q avg, K max/min/avg, RoPE).
    """
    from transformers import AutoModelForCausalLM

    gate = GateConfig() if gate is None else gate
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"official gate checkpoint {src} not found")
    try:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (pickle, zip, unsafe global); report the cause
        raise ValueError(f"{src} could not be read as a weights-only torch checkpoint: {e}") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{src} holds a {type(sd).__name__}, expected a state dict")
    prefix = "model.layers.{}.self_attn.attn_gate.mask_linear_{}.weight"
    n = model_config.num_hidden_layers
    recognised = {prefix.format(i, w) for i in range(n) for w in ("k", "q")}
    unexpected = sorted(set(sd) - recognised)
    if unexpected:
        raise ValueError(f"{src}: keys not in the official gate layout: {unexpected[:5]}")
    # The model is built on the meta device: only its gate shapes matter, no memory is used.
    # A copy: building and preparing the shell sets the config's attention implementation, and the
    # caller's config may belong to a live model.
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(copy.deepcopy(model_config))
    # Any layer's q weight means every layer needs one (a q key on a later layer alone must not be dropped).
    has_q = any(prefix.format(i, "q") in sd for i in range(n))
    gate = GateConfig(**{**gate.to_dict(), "q_projection": has_q or None})
    apply_seer_attention(shell, SeerConfig(gate=gate, base_model=base_model))
    for i, g in gate_modules(shell).items():
        for name in ("k", "q") if has_q else ("k",):
            key = prefix.format(i, name)
            if key not in sd:
                raise ValueError(f"{src}: missing {key}")
            like = getattr(g, f"{name}_proj")
            if tuple(sd[key].shape) != tuple(like.shape):
                raise ValueError(f"{src}: {key} has shape {tuple(sd[key].shape)}, expected {tuple(like.shape)}")
            setattr(g, f"{name}_proj", torch.nn.Parameter(sd[key].float(), requires_grad=False))
    return save_gates(shell, dst)
