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
import re
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
    "OFFICIAL_CONFIG",
    "convert_official_checkpoint",
    "from_pretrained",
    "load_gates",
    "official_gate_config",
    "read_adapter_config",
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
