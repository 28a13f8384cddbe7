"""The distillation recipe: a :class:`DistillConfig` loaded from YAML/TOML with ``key=value`` overrides.

A recipe is a flat mapping of the fields below (``gate`` is the one nested mapping: the fields of
:class:`~seerattn.gate.GateConfig`). Paths are relative to the working directory. Example::

    model: testbed/model
    data: [../shared/data/books]
    output_dir: runs/testbed-gates
    seq_len: 8192
    batch_size: 16
    steps: 500
    gate: {block_size: 64}

Overrides use the same names (``gate.block_size=128`` for the nested mapping); values are parsed
as YAML and then checked against the field's type, so ``lr=3e-4``, ``steps=50``,
``data=[a.jsonl,b.jsonl]`` and ``grad_clip=null`` all work.

Rules checked at load time (each error names the field and what is accepted):

- unknown fields are errors (with a close-match suggestion), never ignored;
- ``seq_len`` must be a multiple of ``gate.block_size`` and hold at least 2 blocks: packed
  training rows then consist of whole blocks only, so every gate row of the loss sees fully
  pooled blocks (a partial last block is pooled over fewer tokens, a case inference handles but
  that would only add noise to training);
- ``batch_size`` (global, sequences per optimizer step) must be a multiple of
  ``micro_batch_size``; divisibility by ``micro_batch_size * world_size`` is checked when the
  world size is known (:meth:`DistillConfig.accumulation_steps`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..gate import GateConfig

__all__ = ["ConfigError", "DistillConfig", "load_recipe", "parse_overrides"]


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the field and the accepted values."""


AMP = ("auto", "bf16", "none")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
IMPLS = ("reference", "triton")
PARALLEL = ("auto", "ddp", "fsdp")
SCHEDULES = ("cosine", "constant")
TB = ("auto", True, False)


@dataclass
class DistillConfig:
    """Everything a distillation run depends on (the paper's defaults where it gives one).

    Model and data:
        model: local path (or hub id, if the machine can reach the hub) of the frozen causal LM.
        tokenizer: tokenizer path; None = ``model``.
        data: sources, in order: a books folder (with ``MANIFEST.tsv``), a folder of text/JSONL/
            parquet files, or single ``.txt[.gz]`` / ``.jsonl[.gz]`` / ``.parquet`` files.
        data_split: the ``split`` column value used from a books ``MANIFEST.tsv``.
        text_field: the JSONL key / parquet column holding each document's text.
        document_separator: split text files into documents at this string (None: one file, one
            document); ``"\\x00"`` reads the corpus that ``testbed/train.py pack`` writes.
        max_data_tokens: stop tokenising after this many tokens (documents are taken in a seeded
            random file order); None = all.
        data_cache_dir: where token ids are cached; None = ``<output_dir>/data_cache``.
        shuffle: shuffle packed rows (a new seeded permutation each epoch).
        seq_len: tokens per packed training row.
        model_dtype: dtype of the frozen weights; ``auto`` = bfloat16 on CUDA, float32 on CPU.

    Optimisation (only the gates train):
        batch_size: global sequences per optimizer step (paper: 16).
        micro_batch_size: sequences per forward on one process; accumulation fills the rest.
        steps: optimizer steps (paper: 500).
        lr, weight_decay, adam_betas, adam_eps: AdamW (paper: 1e-3, no weight decay).
        schedule, warmup_steps, min_lr_ratio: linear warmup then cosine to ``min_lr_ratio * lr``
            (paper: 20 warmup steps, cosine), or ``constant`` after warmup.
        grad_clip: max global L2 norm of the gate gradients; None = no clipping.
        loss_scale: the loss is ``loss_scale * sum over layers of the per-layer KL`` (paper: 10).
        skip_first_rows: fraction of leading query-block rows left out of the loss (paper: 0.25).
        metric_density: density at which block and attention-mass recall are reported.
        gate: :class:`~seerattn.gate.GateConfig` fields (block size, poolings, ...).
        amp: autocast; ``auto`` = bf16 on CUDA, none on CPU.
        seed: seeds gate init, data order and every RNG.

    Execution and outputs:
        device: ``auto`` = CUDA when available (the local rank's GPU under torchrun), else CPU.
        impl: ground-truth op implementation; None = Triton on CUDA, reference on CPU.
        parallel: with several processes (torchrun): ``ddp`` (base replicated, gate gradients
            all-reduced) or ``fsdp`` (base sharded per decoder layer, gates replicated); ``auto`` = ddp.
        output_dir: run folder (config, environment, metrics, checkpoints, adapter).
        save_every: checkpoint period in steps (a checkpoint is also written after the last step).
        keep_checkpoints: how many of the newest checkpoints to keep.
        log_every: metrics period in steps (JSONL / TensorBoard).
        tensorboard: ``auto`` = on when importable (a log line says when it is off), true = required
            (error when not importable), false = off.
        progress: show a tqdm bar (rank 0).
    """

    model: str
    data: list[str]
    output_dir: str
    tokenizer: str | None = None
    data_split: str = "train"
    text_field: str = "text"
    document_separator: str | None = None
    max_data_tokens: int | None = None
    data_cache_dir: str | None = None
    shuffle: bool = True
    seq_len: int = 8192
    model_dtype: str = "auto"
    batch_size: int = 16
    micro_batch_size: int = 1
    steps: int = 500
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    loss_scale: float = 10.0
    skip_first_rows: float = 0.25
    metric_density: float = 0.1
    gate: dict = field(default_factory=dict)
    amp: str = "auto"
    seed: int = 0
    device: str = "auto"
    impl: str | None = None
    parallel: str = "auto"
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: str | bool = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self._validate()

    # ------------------------------------------------------------------------------------ checks
    def _validate(self) -> None:
        def need(ok: bool, name: str, accepted: str) -> None:
            if not ok:
                raise ConfigError(f"recipe field {name!r} must be {accepted}, got {getattr(self, name)!r}")

        need(bool(self.model), "model", "a non-empty path")
        need(len(self.data) > 0 and all(self.data), "data", "a non-empty list of paths")
        need(bool(self.output_dir), "output_dir", "a non-empty path")
        need(self.document_separator != "", "document_separator", "a non-empty string or null")
        need(
            self.max_data_tokens is None or self.max_data_tokens > 0,
            "max_data_tokens",
            "a positive int or null",
        )
        need(self.model_dtype in DTYPES, "model_dtype", f"one of {DTYPES}")
        need(self.batch_size >= 1, "batch_size", "an int >= 1")
        need(self.micro_batch_size >= 1, "micro_batch_size", "an int >= 1")
        need(
            self.batch_size % self.micro_batch_size == 0,
            "batch_size",
            f"a multiple of micro_batch_size ({self.micro_batch_size})",
        )
        need(self.steps >= 1, "steps", "an int >= 1")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a finite float > 0")
        need(self.weight_decay >= 0, "weight_decay", "a float >= 0")
        need(all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "two floats in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "a float > 0")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(0 <= self.warmup_steps <= self.steps, "warmup_steps", f"an int in [0, steps={self.steps}]")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a float in [0, 1]")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "a float > 0 or null (no clipping)")
        need(math.isfinite(self.loss_scale) and self.loss_scale > 0, "loss_scale", "a finite float > 0")
        need(0 <= self.skip_first_rows < 1, "skip_first_rows", "a float in [0, 1)")
        need(0 < self.metric_density <= 1, "metric_density", "a float in (0, 1]")
        need(self.amp in AMP, "amp", f"one of {AMP}")
        need(self.seed >= 0, "seed", "an int >= 0")
        need(self.device in DEVICES, "device", f"one of {DEVICES}")
        need(self.impl is None or self.impl in IMPLS, "impl", f"one of {IMPLS} or null (automatic)")
        need(self.parallel in PARALLEL, "parallel", f"one of {PARALLEL}")
        need(self.save_every >= 1, "save_every", "an int >= 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "an int >= 1")
        need(self.log_every >= 1, "log_every", "an int >= 1")
        need(self.tensorboard in TB, "tensorboard", "'auto', true or false")
        try:
            gate = self.gate_config()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"recipe field 'gate' is invalid: {e}") from e
        bs = gate.block_size
        need(
            self.seq_len % bs == 0 and self.seq_len >= 2 * bs,
            "seq_len",
            f"a multiple of gate.block_size ({bs}) and at least 2 blocks ({2 * bs} tokens)",
        )

    def gate_config(self) -> GateConfig:
        """The :class:`GateConfig` described by the ``gate`` mapping."""
        return GateConfig.from_dict(self.gate)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per process per optimizer step so that the global batch is ``batch_size``."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ConfigError(
                f"recipe field 'batch_size' ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x world size ({world_size}) = {per_step}"
            )
        return self.batch_size // per_step

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        """Build from a mapping; unknown or missing fields are :class:`ConfigError`."""
        if not isinstance(d, dict):
            raise ConfigError(f"a recipe must be a mapping of field names to values, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown recipe field {key!r}{hint}; accepted fields: {', '.join(known)}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"recipe lacks required field(s) {missing}")
        return cls(**d)

    #: fields that may differ between a run and its resumption (they do not change the result)
    RESUMABLE_CHANGES: typing.ClassVar[tuple[str, ...]] = (
        "output_dir",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "tensorboard",
        "progress",
        "data_cache_dir",
    )


# ---------------------------------------------------------------------------------------- coercion
def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotation ``typ``; convert the lossless cases (str -> float...)."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        accepted = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        raise ConfigError(f"recipe field {name!r} must be {accepted}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"recipe field {name!r} must be one of {args}, got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"recipe field {name!r} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"recipe field {name!r} must be an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"recipe field {name!r} must be an int, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"recipe field {name!r} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"recipe field {name!r} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise ConfigError(f"recipe field {name!r} must be a string, got {value!r}")
    if origin is list:
        if isinstance(value, (str, Path)):  # one path where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"recipe field {name!r} must be a list, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"recipe field {name!r} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args, strict=True))
    if typ is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"recipe field {name!r} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported annotation {typ!r} for field {name!r}")  # a bug in this module


def _type_name(t: Any) -> str:
    return {int: "an int", float: "a number", str: "a string", bool: "true/false"}.get(t, str(t))


# ---------------------------------------------------------------------------------------- loading
def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "gate.block_size=128"]`` -> ``{"lr": "3e-4"->..., "gate": {"block_size": 128}}``.

    Values are parsed as YAML (``null``, ``true``, lists); the field types are checked later.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. lr=3e-4 or gate.block_size=128)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from e
        parts = key.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gate"):
            raise ConfigError(f"override {item!r}: only 'gate.<field>' may be dotted; other fields are top-level")
        if len(parts) == 2:
            out.setdefault("gate", {})[parts[1]] = value
        else:
            out[key] = value
    return out


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError as e:  # Python 3.10
        raise ConfigError("TOML recipes need Python >= 3.11 (tomllib); use a .yaml recipe") from e
    return tomllib


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a ``.yaml``/``.yml``/``.toml`` recipe."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"recipe {path}: unknown format {suffix!r}; accepted: .yaml, .yml, .toml")
    loads = _toml().loads if suffix == ".toml" else yaml.safe_load
    try:
        raw = loads(path.read_text())
    except (yaml.YAMLError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"recipe {path} could not be parsed: {e}") from e
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must hold a mapping of field names to values, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> DistillConfig:
    """A validated :class:`DistillConfig` from a recipe file (or none) plus overrides.

    Args:
        path: ``.yaml``/``.yml``/``.toml`` file, or None to build from ``overrides`` alone.
        overrides: ``["key=value", ...]`` (command line) or a mapping; ``gate`` entries merge
            into the recipe's ``gate`` mapping field by field.
    """
    raw = read_recipe_file(path) if path is not None else {}
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    gate_extra = extra.pop("gate", None)
    raw.update(extra)
    if gate_extra is not None:
        if not isinstance(gate_extra, dict):
            raise ConfigError(f"recipe field 'gate' must be a mapping, got {gate_extra!r}")
        base_gate = raw.get("gate") or {}
        if not isinstance(base_gate, dict):
            raise ConfigError(f"recipe field 'gate' must be a mapping, got {base_gate!r}")
        raw["gate"] = {**base_gate, **gate_extra}
    return DistillConfig.from_dict(raw)
