"""Gates-only adapters: save, load, attach to a base model, convert the official checkpoint.

An adapter is a folder with two files. ``seer_config.json`` (format 2)::

    {
      "format_version": 2,
      "library_version": "0.1.0",
      "base_model": "meta-llama/Llama-3.1-8B",          # or null
      "model": {"model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"},
      "prefill": {                                       # absent / null: no prefill gates
        "gate": {GateConfig fields}, "policy": {SparsityPolicy fields},
        "mode": "sparse",                                # the mode from_pretrained attaches in by default
        "mask_heads": "q"
      },
      "decode": {                                        # absent / null: no decode gates
        "gate": {DecodeGateConfig fields}, "policy": {DecodePolicy fields},
        "enabled": true                                  # optional, default true
      }
    }

At least one of ``prefill`` and ``decode``. ``seer_gates.safetensors`` holds both gate sets:

- prefill (:class:`~seerattn.gate.AttnGate`): ``layers.{i}.k_proj`` ``[Hq, Ck*D, Dg]`` and, when the gate
  has one, ``layers.{i}.q_proj`` ``[Hq, Cq*D, Dg]``;
- decode (:class:`~seerattn.gate.DecodeGate`), under ``DECODE_PREFIX``: ``decode.layers.{i}.q_proj``
  ``[Hkv, G*D, Dg]``, ``decode.layers.{i}.k_proj`` ``[Hkv, Ck*D, Dg]``, ``decode.layers.{i}.q_norm.weight``
  and ``decode.layers.{i}.k_norm.weight`` ``[Dg]`` (the gate's ``named_parameters``).

Format 1 (prefill only: ``gate``, ``policy``, ``mode``, ``mask_heads`` at the top level, the same prefill
keys) is still read: :func:`read_adapter_config` returns every adapter in the format-2 layout.

Writers: :func:`save_gates` (the gates attached to a prepared model) and :func:`write_adapter` (gate
modules held elsewhere, e.g. by a distillation task). Loading is all-or-nothing: the config, the model
shape, every key and every tensor shape are checked and the weights read before the model is touched,
so a load that fails leaves the model exactly as it was (no gates, hooks or attention mode left behind).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..block_mask import SparsityPolicy
from ..gate import AttnGate, DecodeGate, GateConfig
from .integration import (
    DecodeConfig,
    SeerConfig,
    _decoder_layers,
    _heads,
    apply_seer_attention,
    decode_gate_modules,
    gate_modules,
    get_seer_state,
    remove_seer_attention,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DECODE_PREFIX",
    "FORMAT_VERSION",
    "OFFICIAL_CONFIG",
    "config_from_adapter",
    "convert_official_checkpoint",
    "from_pretrained",
    "load_gates",
    "merge_adapters",
    "official_gate_config",
    "read_adapter_config",
    "save_gates",
    "write_adapter",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
ADAPTER_CONFIG = "seer_config.json"
ADAPTER_WEIGHTS = "seer_gates.safetensors"
DECODE_PREFIX = "decode."
SECTIONS = ("prefill", "decode")


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


def _prefill_tensors(gates: Sequence[AttnGate]) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, gate in enumerate(gates):
        tensors[f"layers.{i}.k_proj"] = gate.k_proj.detach().contiguous().cpu()
        if gate.q_proj is not None:
            tensors[f"layers.{i}.q_proj"] = gate.q_proj.detach().contiguous().cpu()
    return tensors


def _decode_tensors(gates: Sequence[DecodeGate]) -> dict[str, torch.Tensor]:
    return {
        f"{DECODE_PREFIX}layers.{i}.{name}": p.detach().contiguous().cpu()
        for i, gate in enumerate(gates)
        for name, p in gate.named_parameters()
    }


def write_adapter(
    path: str | Path,
    model,
    config: SeerConfig,
    prefill_gates: Sequence[AttnGate] | None = None,
    decode_gates: Sequence[DecodeGate] | None = None,
    mode: str = "sparse",
) -> Path:
    """Write an adapter folder from gate modules (one per layer, in layer order).

    Args:
        path: the folder (created).
        model: the base model (its shape is recorded; its gates are not read).
        config: ``config.gate`` / ``policy`` / ``mask_heads`` describe ``prefill_gates`` (``config.gate`` None:
            none), ``config.decode`` describes ``decode_gates`` (None: none); ``config.base_model`` (or the
            model's ``_name_or_path``) is recorded.
        prefill_gates, decode_gates: the gates, ``[AttnGate]`` / ``[DecodeGate]`` indexed by layer.
        mode: the prefill mode :func:`from_pretrained` attaches in by default.

    A decode-gate distillation writes its gates with ``write_adapter(out, model, SeerConfig(gate=None,
    mode="dense", decode=DecodeConfig(gate_cfg)), decode_gates=gates)``.
    """
    from .. import __version__

    n = _model_shape(model)["num_hidden_layers"]
    for name, gates, section, kind in (
        ("prefill_gates", prefill_gates, config.gate, AttnGate),
        ("decode_gates", decode_gates, config.decode, DecodeGate),
    ):
        if (gates is None) != (section is None):
            raise ValueError(
                f"write_adapter: {name} {'missing' if gates is None else 'given'} but the config's "
                f"{'gate' if kind is AttnGate else 'decode'} section is {'set' if section is not None else 'None'}"
            )
        if gates is not None and (len(gates) != n or not all(isinstance(g, kind) for g in gates)):
            raise ValueError(f"write_adapter: {name} must be {n} {kind.__name__} modules (one per layer)")
        if gates is not None:
            want = section if kind is AttnGate else section.gate
            if any(g.config != want for g in gates):
                raise ValueError(f"write_adapter: the config of {name} differs from the section's {want}")
    if config.gate is None and config.decode is None:
        raise ValueError("write_adapter: nothing to write (no prefill and no decode gates)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "base_model": config.base_model or getattr(model.config, "_name_or_path", None) or None,
        "model": _model_shape(model),
    }
    if prefill_gates is not None:
        tensors.update(_prefill_tensors(prefill_gates))
        meta["prefill"] = {
            "gate": config.gate.to_dict(),
            "policy": config.policy.to_dict(),
            "mode": mode,
            "mask_heads": config.mask_heads,
        }
    if decode_gates is not None:
        tensors.update(_decode_tensors(decode_gates))
        meta["decode"] = config.decode.to_dict()
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "seerattn", "version": str(FORMAT_VERSION)})
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def save_gates(model, path: str | Path, mode: str = "sparse") -> Path:
    """Write the gates attached to ``model`` (prefill, decode or both; ``apply_seer_attention``) as an adapter.

    ``mode`` is the prefill mode :func:`from_pretrained` attaches the gates in by default (a model saved
    while distilling is meant to be loaded for sparse inference).
    """
    state = get_seer_state(model)
    prefill = [g for _, g in sorted(gate_modules(model).items())] or None
    decode = [g for _, g in sorted(decode_gate_modules(model).items())] or None
    return write_adapter(path, model, state.config, prefill, decode, mode=mode)


def merge_adapters(out: str | Path, prefill: str | Path, decode: str | Path) -> Path:
    """Write one adapter with the prefill gates (and prefill section) of ``prefill`` and the decode gates (and
    decode section) of ``decode``, two adapter folders of the same base model shape, e.g. a ``seerattn distill``
    run of each gate kind. The tensors are copied as they are; :func:`from_pretrained` checks them against the
    model when it loads the result. ``out`` must be a third folder. Returns ``out``.
    """
    from .. import __version__

    srcs = {"prefill": Path(prefill), "decode": Path(decode)}
    metas = {name: read_adapter_config(path) for name, path in srcs.items()}
    for name, path in srcs.items():
        if metas[name][name] is None:
            raise ValueError(
                f"merge_adapters: {path} has no {name} gates (its sections: {_adapter_sections(metas[name])})"
            )
    a, b = metas["prefill"], metas["decode"]
    if a["model"] != b["model"]:
        diff = {k: (a["model"][k], b["model"][k]) for k in a["model"] if a["model"][k] != b["model"][k]}
        raise ValueError(
            f"merge_adapters: {srcs['prefill']} and {srcs['decode']} are for different model shapes: {diff}"
        )
    if a["base_model"] and b["base_model"] and a["base_model"] != b["base_model"]:
        raise ValueError(
            f"merge_adapters: {srcs['prefill']} is for {a['base_model']!r} but {srcs['decode']} for {b['base_model']!r}"
        )
    out = Path(out)
    if any(out.resolve() == path.resolve() for path in srcs.values()):
        raise ValueError(f"merge_adapters: write to a new folder, not into an input ({out})")
    tensors = {}
    for name, path in srcs.items():
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {path}")
        mine = {k: v for k, v in load_file(str(weights)).items() if k.startswith(DECODE_PREFIX) == (name == "decode")}
        if not mine:
            raise ValueError(f"merge_adapters: {weights} holds no {name} tensors")
        tensors.update(mine)
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "base_model": a["base_model"] or b["base_model"],
        "model": a["model"],
        "prefill": a["prefill"],
        "decode": b["decode"],
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "seerattn", "version": str(FORMAT_VERSION)})
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter_config(path: str | Path) -> dict:
    """The parsed ``seer_config.json`` of an adapter folder, validated, in the format-2 layout.

    Returns ``{"format_version", "library_version", "base_model", "model", "prefill", "decode"}`` with
    ``prefill`` ``{"gate", "policy", "mode", "mask_heads"}`` or None and ``decode`` ``{"gate", "policy",
    "enabled"}`` or None (JSON values; :func:`config_from_adapter` builds the :class:`SeerConfig`). A
    format-1 adapter comes back with its top-level prefill fields as the ``prefill`` section.
    """
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}: not a seerattn adapter folder")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_path} holds a JSON {type(meta).__name__}, expected an object")
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        raise ValueError(f"{cfg_path} has format_version {version!r}; this seerattn reads {list(READ_VERSIONS)}")
    if version == 1:
        required = {"model", "gate", "policy"}
        if not required <= set(meta):
            raise ValueError(f"{cfg_path} lacks required fields {sorted(required - set(meta))}")
        prefill = {
            "gate": meta["gate"],
            "policy": meta["policy"],
            "mode": meta.get("mode", "sparse"),
            "mask_heads": meta.get("mask_heads", "q"),
        }
        decode = None
    else:
        if "model" not in meta:
            raise ValueError(f"{cfg_path} lacks required field 'model'")
        unknown = set(meta) - {"format_version", "library_version", "base_model", "model", *SECTIONS}
        if unknown:
            raise ValueError(f"{cfg_path}: unknown fields {sorted(unknown)}")
        prefill, decode = meta.get("prefill"), meta.get("decode")
        if prefill is None and decode is None:
            raise ValueError(f"{cfg_path} has neither a 'prefill' nor a 'decode' section: no gates")
        if prefill is not None:
            if not isinstance(prefill, dict) or not {"gate", "policy"} <= set(prefill):
                raise ValueError(f"{cfg_path}: 'prefill' must be an object with 'gate' and 'policy', got {prefill!r}")
            if set(prefill) - {"gate", "policy", "mode", "mask_heads"}:
                raise ValueError(f"{cfg_path}: unknown 'prefill' fields {sorted(set(prefill) - {'gate', 'policy'})}")
            prefill = {"mode": "sparse", "mask_heads": "q", **prefill}
        if decode is not None:
            try:
                decode = DecodeConfig.from_dict(decode).to_dict()
            except (TypeError, ValueError) as e:
                raise ValueError(f"{cfg_path}: 'decode' section: {e}") from None
    if prefill is not None:
        for name, what in (("gate", "GateConfig fields"), ("policy", "SparsityPolicy fields")):
            if not isinstance(prefill[name], dict):
                raise ValueError(f"{cfg_path}: {name!r} must be an object ({what}), got {json.dumps(prefill[name])}")
    if not isinstance(meta["model"], dict):
        raise ValueError(f"{cfg_path}: 'model' must be an object (the model shape), got {json.dumps(meta['model'])}")
    shape_keys = {"model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"}
    if set(meta["model"]) != shape_keys:
        raise ValueError(
            f"{cfg_path}: 'model' must have exactly the fields {sorted(shape_keys)}, got {sorted(meta['model'])}"
        )
    return {
        "format_version": version,
        "library_version": meta.get("library_version"),
        "base_model": meta.get("base_model"),
        "model": meta["model"],
        "prefill": prefill,
        "decode": decode,
    }


def config_from_adapter(meta: dict, **overrides) -> SeerConfig:
    """A :class:`SeerConfig` from an adapter's metadata (:func:`read_adapter_config`), with field overrides.

    Without a prefill section the config has ``gate=None`` and ``mode="dense"``; without a decode
    section ``decode=None``. Overrides replace fields (``mode=``, ``policy=``, ``decode=None`` to leave
    the decode gates off, ``decode=DecodeConfig(same gate, other policy)``...).
    """
    accepted = set(SeerConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"unknown SeerConfig field(s) {unknown}; accepted: {sorted(accepted)}")
    prefill, decode = meta["prefill"], meta["decode"]
    fields = {
        "gate": None if prefill is None else GateConfig.from_dict(prefill["gate"]),
        "mode": "dense" if prefill is None else prefill["mode"],
        "decode": None if decode is None else DecodeConfig.from_dict(decode),
        "base_model": meta.get("base_model"),
    }
    if prefill is not None:
        fields["policy"] = SparsityPolicy.from_dict(prefill["policy"])
        fields["mask_heads"] = prefill["mask_heads"]
    fields.update(overrides)
    return SeerConfig(**fields)


def _check_model_shape(meta: dict, model, path: Path) -> None:
    want, have = meta["model"], _model_shape(model)
    if want != have:
        diff = {k: (want.get(k), have.get(k)) for k in set(want) | set(have) if want.get(k) != have.get(k)}
        raise ValueError(f"adapter {path} was made for another model shape; (adapter, model) differ in {diff}")


def _gate_shapes(model, config: SeerConfig) -> dict[str, tuple[int, ...]]:
    """Adapter key -> shape of the gate tensors that ``config`` (its prefill gate and decode section) gives
    ``model`` (built on the meta device: nothing is attached, no memory used)."""
    _, layers = _decoder_layers(model)
    shapes = {}
    for i, layer in enumerate(layers):
        heads = _heads(layer.self_attn)
        with torch.device("meta"):
            if config.gate is not None:
                g = AttnGate(*heads, config.gate)
                shapes[f"layers.{i}.k_proj"] = tuple(g.k_proj.shape)
                if g.q_proj is not None:
                    shapes[f"layers.{i}.q_proj"] = tuple(g.q_proj.shape)
            if config.decode is not None:
                dg = DecodeGate(*heads, config.decode.gate)
                for name, p in dg.named_parameters():
                    shapes[f"{DECODE_PREFIX}layers.{i}.{name}"] = tuple(p.shape)
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


def _copy_into_gates(model, tensors: dict[str, torch.Tensor], sections: Sequence[str]) -> None:
    """Copy the adapter tensors of ``sections`` (``"prefill"``, ``"decode"``) into the attached gates."""
    with torch.no_grad():
        if "prefill" in sections:
            for i, gate in gate_modules(model).items():
                gate.k_proj.copy_(tensors[f"layers.{i}.k_proj"])
                if gate.q_proj is not None:
                    gate.q_proj.copy_(tensors[f"layers.{i}.q_proj"])
        if "decode" in sections:
            for i, gate in decode_gate_modules(model).items():
                for name, p in gate.named_parameters():
                    p.copy_(tensors[f"{DECODE_PREFIX}layers.{i}.{name}"])


def _adapter_sections(meta: dict) -> tuple[str, ...]:
    return tuple(s for s in SECTIONS if meta[s] is not None)


def load_gates(model, path: str | Path) -> None:
    """Load adapter weights into the gates attached to a prepared model (strict: keys, shapes, model shape).

    Every gate set the model has attached (prefill, decode) is loaded and must be in the adapter with
    the same gate config; an adapter section the model has no gates for is not loaded (logged). The
    whole weights file is checked against the adapter's config. Every check runs and the file is read
    before any gate changes: on an error the gates are as they were.
    """
    path = Path(path)
    meta = read_adapter_config(path)
    _check_model_shape(meta, model, path)
    state = get_seer_state(model)
    attached = {"prefill": state.config.gate, "decode": state.config.decode}
    theirs = config_from_adapter(meta)
    adapter = {"prefill": theirs.gate, "decode": theirs.decode}
    sections = [s for s in SECTIONS if attached[s] is not None]
    for s in sections:
        if adapter[s] is None:
            raise ValueError(f"adapter {path} has no {s} gates, but the model has {s} gates attached")
        mine, other = (attached[s], adapter[s]) if s == "prefill" else (attached[s].gate, adapter[s].gate)
        if mine != other:
            raise ValueError(
                f"adapter gate config {other.to_dict()} ({s}) differs from the attached {s} gates' {mine.to_dict()}"
            )
    skipped = [s for s in _adapter_sections(meta) if s not in sections]
    if skipped:
        logger.info("adapter %s: %s gates not loaded (the model has none attached)", path, ", ".join(skipped))
    _copy_into_gates(model, _read_gate_tensors(path, _gate_shapes(model, theirs)), sections)


def from_pretrained(base, gates: str | Path, **config_overrides):
    """Load a base model (a model object or a path/id for ``AutoModelForCausalLM``) and attach an adapter.

    ``config_overrides`` replace :class:`SeerConfig` fields (``mode``, ``policy``, ``impl``, ``decode``...;
    see :func:`config_from_adapter`). Gate sets come from the adapter only: an override that attaches a
    gate set the adapter lacks, or changes a gate's architecture, is refused; ``gate=None`` /
    ``decode=None`` leave the adapter's prefill / decode gates off. Returns the model (its state:
    :func:`~seerattn.hf.get_seer_state`).

    All-or-nothing: the adapter's config and weights are validated and read before the gates are
    attached; on any error a model passed in is left exactly as it was (a retry can follow).
    """
    gates = Path(gates)
    meta = read_adapter_config(gates)
    theirs = config_from_adapter(meta)
    config = config_from_adapter(meta, **config_overrides)
    config.policy.check_num_layers(meta["model"]["num_hidden_layers"])
    for s, mine, other in (
        ("prefill", config.gate, theirs.gate),
        ("decode", config.decode and config.decode.gate, theirs.decode and theirs.decode.gate),
    ):
        if mine is not None and mine != other:
            have = f"no {s} gates" if other is None else f"{s} gates {other.to_dict()}"
            raise ValueError(
                f"adapter {gates} has {have}; the config asks for {s} gates {mine.to_dict()}. Gates come from "
                "the adapter (attach untrained ones with apply_seer_attention)"
            )
    if isinstance(base, (str, Path)):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(base))
    _check_model_shape(meta, base, gates)
    tensors = _read_gate_tensors(gates, _gate_shapes(base, theirs))
    apply_seer_attention(base, config)
    sections = [s for s, c in (("prefill", config.gate), ("decode", config.decode)) if c is not None]
    try:
        _copy_into_gates(base, tensors, sections)
    except BaseException:  # not expected after the checks above; whatever it is, take the gates off again
        remove_seer_attention(base)
        raise
    return base


# ---------------------------------------------------------------------------------------- official gates
OFFICIAL_CONFIG = "config.json"
OFFICIAL_KEY = "model.layers.{}.self_attn.attn_gate.mask_linear_{}.weight"
# An official gate type names its Q and K poolings in this order ("Qavg_Kmaxminavg"): its gate
# classes are generated from the combinations of (max, min, avg).
_OFFICIAL_POOLING_ORDER = ("max", "min", "avg")
_OFFICIAL_GATE_TYPE = re.compile(r"^Q((?:max|min|avg)+)_K((?:max|min|avg)+)$")
_OFFICIAL_SHAPE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def _official_poolings(gate_type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """("avg",), ("max", "min", "avg") from "Qavg_Kmaxminavg"; ValueError for anything else."""
    m = _OFFICIAL_GATE_TYPE.match(gate_type) if isinstance(gate_type, str) else None
    pools = []
    for part in m.groups() if m else ():
        names = tuple(part[i : i + 3] for i in range(0, len(part), 3))
        rank = [_OFFICIAL_POOLING_ORDER.index(n) for n in names]
        if rank != sorted(set(rank)):  # repeated or out of the official order: no official class has it
            m = None
            break
        pools.append(names)
    if m is None:
        raise ValueError(
            f"official seerattn_gate_type {gate_type!r} is not a prefill gate seerattn can convert; accepted: "
            "'Q<poolings>_K<poolings>', each a run of max, min, avg in that order without repeats (e.g. "
            "'Qavg_Kmaxminavg', 'Qmax_Kmaxmin'). Decode gates (SeerAttention-R, 'K...' types) are not supported"
        )
    return pools[0], pools[1]


def _read_official_config(official_config, src: Path) -> tuple[dict, str]:
    """The official config's fields and a name for it in messages."""
    if isinstance(official_config, dict):
        return official_config, "the official config"
    path = src.parent / OFFICIAL_CONFIG if official_config is None else Path(official_config)
    if not path.is_file():
        raise FileNotFoundError(
            f"official config {path} not found: the official gate folders hold a {OFFICIAL_CONFIG} next to "
            "attn_gate_weights.pth that names the gate type; pass its path (--official-config)"
        )
    try:
        official = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(official, dict):
        raise ValueError(f"{path} holds a JSON {type(official).__name__}, expected an object")
    return official, str(path)


def official_gate_config(official: dict, model_config, where: str = "the official config") -> tuple[GateConfig, bool]:
    """The :class:`GateConfig` of an official prefill gate, and whether its k weight is per KV head.

    ``official``: the fields of the official ``config.json`` (``seerattn_gate_type``,
    ``seerattn_gate_block_size``, ``seerattn_gate_hidden_size``, ``seerattn_gate_force_double`` -- absent
    means false, the official default); ``model_config``: the base model's config (the shape fields the
    official config also holds must agree with it).

    The official gate has a q weight ``[Hq, Cq*D, Dg]`` when Q is pooled more than one way, Dg differs
    from the head dim, or ``force_double`` is set; then its k weight is per KV head ``[Hkv, Ck*D, Dg]``
    (its output repeated over the group's query heads), otherwise per query head ``[Hq, Ck*D, Dg]``
    (applied to K repeated over the group). Gates with Dg != head dim are refused: the official gate
    then rotates Dg-wide vectors with the head dim's RoPE table, which seerattn's gate does not do.
    """
    required = ("seerattn_gate_type", "seerattn_gate_block_size", "seerattn_gate_hidden_size")
    missing = [f for f in required if f not in official]
    if missing:
        raise ValueError(f"{where} is not an official SeerAttention gate config: it lacks {missing}")
    for key in _OFFICIAL_SHAPE_FIELDS:
        theirs, ours = official.get(key), getattr(model_config, key, None)
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(f"{where} is for another model: {key} {theirs} there, {ours} in the base model's config")
    q_pools, k_pools = _official_poolings(official["seerattn_gate_type"])
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    hidden = official["seerattn_gate_hidden_size"]
    if hidden != head_dim:
        raise ValueError(
            f"{where}: seerattn_gate_hidden_size {hidden!r} differs from the head dim {head_dim}; seerattn converts "
            "gates of the head dim's width only (the official prefill gate rotates its outputs with the model's "
            "RoPE table, built for the head dim)"
        )
    force = official.get("seerattn_gate_force_double", False)
    if not isinstance(force, bool):
        raise ValueError(f"{where}: seerattn_gate_force_double must be true or false, got {force!r}")
    has_q = len(q_pools) > 1 or force
    default_q = q_pools != ("avg",)  # GateConfig(q_projection=None)'s rule: keep None where it agrees
    try:
        gate = GateConfig(
            block_size=official["seerattn_gate_block_size"],
            q_pooling=q_pools,
            k_pooling=k_pools,
            q_projection=None if has_q == default_q else has_q,
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return gate, has_q


def convert_official_checkpoint(
    src: str | Path,
    dst: str | Path,
    model_config,
    official_config: str | Path | dict | None = None,
    base_model: str | None = None,
) -> Path:
    """Convert an official prefill ``attn_gate_weights.pth`` into a seerattn adapter folder, exactly.

    The gate's layout comes from the official ``config.json`` (:func:`official_gate_config`): every
    official prefill gate type with gate width == head dim converts to gates that compute the same
    logits; anything else, or weights that disagree with the config, is refused. The file is read
    with ``torch.load(weights_only=True)`` (no pickled code runs).

    Args:
        src: the ``.pth`` file (``model.layers.{i}.self_attn.attn_gate.mask_linear_{k,q}.weight``).
        dst: the adapter folder to write (written only when everything checked out).
        model_config: the base model's transformers config.
        official_config: the official ``config.json`` (path or parsed fields); default: the one next to ``src``.
        base_model: id recorded in the adapter.
    """
    from transformers import AutoModelForCausalLM

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"official gate checkpoint {src} not found")
    official, where = _read_official_config(official_config, src)
    gate, has_q = official_gate_config(official, model_config, where)
    try:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (pickle, zip, unsafe global); report the cause
        raise ValueError(f"{src} could not be read as a weights-only torch checkpoint: {e}") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{src} holds a {type(sd).__name__}, expected a state dict")
    names = ("k", "q") if has_q else ("k",)
    n = model_config.num_hidden_layers
    expected = {OFFICIAL_KEY.format(i, w) for i in range(n) for w in names}
    layout = (
        f"a {official['seerattn_gate_type']} gate with force_double={bool(official.get('seerattn_gate_force_double'))}"
    )
    unexpected, missing = sorted(set(sd) - expected), sorted(expected - set(sd))
    if unexpected:
        raise ValueError(f"{src}: keys not in the official layout of {layout} ({where}): unexpected {unexpected[:5]}")
    if missing:
        raise ValueError(f"{src}: missing {', '.join(missing[:5])} ({layout}, per {where})")
    # The model is built on the meta device: only its gate shapes matter, no memory is used.
    # A copy: building and preparing the shell sets the config's attention implementation, and the
    # caller's config may belong to a live model.
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(copy.deepcopy(model_config))
    apply_seer_attention(shell, SeerConfig(gate=gate, base_model=base_model))
    converted = {}
    for i, g in gate_modules(shell).items():
        group = g.num_q_heads // g.num_kv_heads
        for name in names:
            key, like = OFFICIAL_KEY.format(i, name), getattr(g, f"{name}_proj")
            t = sd[key]
            # with a q weight the official k weight is per KV head: repeated over each group's query heads
            per_kv = name == "k" and has_q
            want = (g.num_kv_heads, *like.shape[1:]) if per_kv else tuple(like.shape)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{src}: {key} is not a floating-point tensor ({getattr(t, 'dtype', type(t))})")
            if tuple(t.shape) != want:
                raise ValueError(f"{src}: {key} has shape {tuple(t.shape)}, expected {want} ({layout})")
            converted[(i, name)] = t.float().repeat_interleave(group, dim=0) if per_kv else t.float()
    for (i, name), t in converted.items():
        setattr(gate_modules(shell)[i], f"{name}_proj", torch.nn.Parameter(t, requires_grad=False))
    return save_gates(shell, dst)
