"""Training recipes: :class:`DistillConfig`, :class:`FinetuneConfig`, from YAML/TOML with ``key=value`` overrides.

Both share the fields of :class:`TrainConfig` (model, data, batch, optimizer, schedule, execution).
A recipe is a flat mapping of the fields below; the nested mappings are ``gate`` (the fields of
:class:`~seerattn.gate.GateConfig`), for distillation ``decode_gate`` (of
:class:`~seerattn.gate.DecodeGateConfig`) and, for fine-tuning, ``rope``, ``policy`` and ``lora``. Paths
are relative to the working directory. Example::

    model: testbed/model
    data: [data/books-sample]
    output_dir: runs/testbed-gates
    seq_len: 8192
    batch_size: 16
    steps: 500
    gate: {block_size: 64}

Overrides use the same names (``gate.block_size=128`` for a nested mapping); values are parsed
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
  world size is known (:meth:`TrainConfig.accumulation_steps`).
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

from ..gate import DecodeGateConfig, GateConfig

__all__ = ["ConfigError", "DistillConfig", "FinetuneConfig", "TrainConfig", "load_recipe", "parse_overrides"]


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the field and the accepted values."""


AMP = ("auto", "bf16", "none")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
IMPLS = ("reference", "triton")
PARALLEL = ("auto", "ddp", "fsdp")
SCHEDULES = ("cosine", "constant")
TB = ("auto", True, False)
ATTENTION = ("sparse", "dense")
GATE_KINDS = ("prefill", "decode")
ROPE_KEYS = ("rope_type", "factor", "original_max_position_embeddings")
LORA_KEYS = ("r", "alpha", "target_modules", "dropout")


@dataclass
class TrainConfig:
    """The fields every training run shares (documented on :class:`DistillConfig`, the first user)."""

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
    def _need(self, ok: bool, name: str, accepted: str) -> None:
        if not ok:
            raise ConfigError(f"recipe field {name!r} must be {accepted}, got {getattr(self, name)!r}")

    def _validate(self) -> None:
        need = self._need
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
        field_name, bs = self._row_blocks(gate)
        need(
            self.seq_len % bs == 0 and self.seq_len >= 2 * bs,
            "seq_len",
            f"a multiple of {field_name} ({bs}) and at least 2 blocks ({2 * bs} tokens)",
        )

    def _row_blocks(self, gate: GateConfig) -> tuple[str, int]:
        """(field name, block size) of the gate that trains: packed rows are made of its whole blocks."""
        return "gate.block_size", gate.block_size

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

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run."""
        return self.steps

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
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


@dataclass
class DistillConfig(TrainConfig):
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
        init_gates: adapter folder whose gates training starts from (its gate config must equal
            ``gate``), e.g. gates distilled at the original length, continued on a model extended
            with YaRN; None = identity-initialised gates.
        skip_first_rows: fraction of leading query-block rows left out of the loss (paper: 0.25).
        metric_density: density at which block and attention-mass recall are reported.
        gate: :class:`~seerattn.gate.GateConfig` fields (block size, poolings, ...) of the prefill gate.
        gate_kind: which gate trains: ``prefill`` (the AttnGate of ``gate``, the default) or ``decode``
            (the SeerAttention-R decode gate of ``decode_gate``, :mod:`seerattn.train.decode_distill`:
            every token a decode query, target its attention over the completed blocks; ``gate`` must
            then be empty, ``skip_first_rows`` is a fraction of the token rows and ``metric_density``
            the token budget of the recall metric as a fraction of each row's context).
        decode_gate: :class:`~seerattn.gate.DecodeGateConfig` fields (block size, K poolings, ...) when
            ``gate_kind`` is ``decode``; must be empty otherwise.
        amp: autocast; ``auto`` = bf16 on CUDA, none on CPU.
        seed: seeds gate init, data order and every RNG.

    Execution and outputs:
        device: ``auto`` = CUDA when available (the local rank's GPU under torchrun), else CPU.
        impl: op implementation (the ground-truth kernel, and the block-sparse attention of fine-tuning);
            None = reference on CPU; on CUDA Triton, except the block-sparse attention, which follows
            :func:`seerattn.ops.auto_impl`'s measured rule (FlashAttention-4's forward and backward at
            128-token blocks where it is installed; environment.json records whether it is).
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

    loss_scale: float = 10.0
    init_gates: str | None = None
    gate_kind: str = "prefill"
    decode_gate: dict = field(default_factory=dict)

    def _validate(self) -> None:
        need = self._need
        need(self.gate_kind in GATE_KINDS, "gate_kind", f"one of {GATE_KINDS}")
        if self.gate_kind == "decode":
            need(not self.gate, "gate", "empty with gate_kind: decode (the decode gate's fields go in decode_gate)")
            try:
                self.decode_gate_config()
            except (TypeError, ValueError) as e:
                raise ConfigError(f"recipe field 'decode_gate' is invalid: {e}") from e
        else:
            need(not self.decode_gate, "decode_gate", "empty unless gate_kind is decode")
        super()._validate()
        need(math.isfinite(self.loss_scale) and self.loss_scale > 0, "loss_scale", "a finite float > 0")
        need(self.init_gates != "", "init_gates", "an adapter folder or null")

    def _row_blocks(self, gate: GateConfig) -> tuple[str, int]:
        if self.gate_kind == "decode":
            return "decode_gate.block_size", self.decode_gate_config().block_size
        return super()._row_blocks(gate)

    def decode_gate_config(self) -> DecodeGateConfig:
        """The :class:`~seerattn.gate.DecodeGateConfig` described by the ``decode_gate`` mapping."""
        return DecodeGateConfig.from_dict(self.decode_gate)


@dataclass
class FinetuneConfig(TrainConfig):
    """A long-context fine-tuning run: the model and its gates trained together (``seerattn finetune``).

    The fields of :class:`TrainConfig` (documented on :class:`DistillConfig`) with fine-tuning defaults
    (the paper's Llama-3-8B 8k -> 32k recipe: lr 1e-5, 8 sequences of 32k per step, 400 steps; float32
    master weights, since bf16 weights would round away updates of lr 1e-5, with bf16 autocast on CUDA), plus:

        rope: RoPE scaling written into the model's config before training, e.g. ``{rope_type: yarn,
            factor: 4, original_max_position_embeddings: 8192}`` (``max_position_embeddings`` becomes
            factor x original); empty = keep the model's own RoPE (e.g. a model already extended).
        attention: ``sparse`` (block-sparse attention with the gates' mask, forward and backward, gates
            trained jointly) or ``dense`` (the dense fine-tuning baseline: SDPA, no gates trained).
        policy: :class:`~seerattn.SparsityPolicy` fields of the training mask, e.g. ``{kind: density,
            value: 0.1}`` (90 % sparsity) or ``{kind: threshold, value: 5e-4}``.
        mask_heads: ``q`` (a mask per query head) or ``kv`` (per GQA group); None = the adapter's
            (``init_gates``) or ``q``.
        init_gates: adapter folder (``seerattn distill`` output) the gates start from; None = fresh
            (identity-initialised) gates, distilled first for ``distill_steps``.
        distill_steps: optimizer steps of gate-only distillation (model frozen, dense attention through
            the ground-truth kernel) before the joint steps; they count into ``steps``' schedule of the
            gates but not the model's (the model's warmup and decay run over the joint steps).
        gate_loss_weight: loss = LM cross-entropy + gate_loss_weight x sum over layers of the gate KL
            (paper: 10).
        gate_target_every: the gate's target (the ground-truth pass, a dense attention forward per layer) and
            its loss run on every ``gate_target_every``-th joint step only (the first joint step included;
            1 = every step, the paper). The other joint steps run the gate for the mask only (attention mode
            ``sparse``: no ground truth, no gate loss, no gate gradient); the gates then have no gradient, so
            AdamW leaves them and their moments untouched (no weight decay, no step count; their LR schedule
            still follows the global step) and ``grad_norm`` covers the weights only; ``kl`` and
            ``mass_recall`` are logged as null and ``loss`` is the CE. A speed knob: the ground-truth pass
            costs about one dense attention forward per layer and step; the trade-off is ``gate_target_every``
            times fewer gate updates, so the gates follow the changing attention less closely (compare the
            fine-tuned quality at the target density with a run at 1).
        gate_lr: learning rate of the gates (the model's is ``lr``). PAPER.md gives one rate (1e-5) for
            the joint run without saying whether it applied to the gates; the default is the
            distillation rate, at which the gates follow the changing attention.
        lora: empty = every model weight trains; else LoRA through ``peft`` with ``{r, alpha,
            target_modules, dropout}`` (merged into the weights before saving).
        gradient_checkpointing: recompute each decoder layer in the backward (transformers'
            non-reentrant checkpointing); the gate loss and the ground truth are not recomputed.
        loss_chunk_tokens: the LM loss runs the decoder stack for the final hidden states, then the LM head and
            the cross-entropy over this many positions at a time, recomputing each chunk's logits in the backward
            (:mod:`seerattn.train.lm_loss`), so no ``[B, T, V]`` logits tensor exists (47 GiB of fp32 logits and
            gradients for Llama-3-8B at 32k); the extra memory is about ``10 x loss_chunk_tokens x V`` bytes (5 GiB
            at 4096 x 128256). 0 or null = transformers' full-logit loss.
        max_shard_size: ``save_pretrained`` shard size of the fine-tuned model (e.g. ``"5GB"``).

    ``steps`` counts the joint steps; the run takes ``distill_steps + steps`` optimizer steps.
    ``parallel: fsdp`` shards every decoder layer (FSDP2 ``fully_shard``, gradients reduce-scattered);
    the gates stay replicated with all-reduced gradients (see :mod:`.distributed`).
    """

    seq_len: int = 32768
    model_dtype: str = "float32"
    batch_size: int = 8
    steps: int = 400
    lr: float = 1e-5
    rope: dict = field(default_factory=dict)
    attention: str = "sparse"
    policy: dict = field(default_factory=lambda: {"kind": "density", "value": 0.1})
    mask_heads: str | None = None
    init_gates: str | None = None
    distill_steps: int = 0
    gate_loss_weight: float = 10.0
    gate_target_every: int = 1
    gate_lr: float = 1e-3
    lora: dict = field(default_factory=dict)
    gradient_checkpointing: bool = True
    loss_chunk_tokens: int | None = 4096
    max_shard_size: str = "5GB"

    def _validate(self) -> None:
        super()._validate()
        need = self._need
        need(self.attention in ATTENTION, "attention", f"one of {ATTENTION}")
        need(self.mask_heads in (None, "q", "kv"), "mask_heads", "'q', 'kv' or null (the adapter's)")
        need(self.distill_steps >= 0, "distill_steps", "an int >= 0")
        need(
            math.isfinite(self.gate_loss_weight) and self.gate_loss_weight > 0,
            "gate_loss_weight",
            "a finite float > 0",
        )
        need(math.isfinite(self.gate_lr) and self.gate_lr > 0, "gate_lr", "a finite float > 0")
        need(self.gate_target_every >= 1, "gate_target_every", "an int >= 1 (1 = a gate target every step)")
        need(
            self.attention == "sparse" or self.gate_target_every == 1,
            "gate_target_every",
            "1 with attention: dense (no gates train)",
        )
        need(
            self.loss_chunk_tokens is None or self.loss_chunk_tokens >= 0,
            "loss_chunk_tokens",
            "an int >= 1 (positions per chunk of the LM loss), or 0 / null (transformers' full-logit loss)",
        )
        need(bool(self.max_shard_size), "max_shard_size", "a size such as '5GB'")
        if self.attention == "dense":
            need(
                self.init_gates is None and self.distill_steps == 0,
                "attention",
                "'sparse' when init_gates or distill_steps are set (attention: dense trains no gates; "
                "set init_gates=null distill_steps=0 for the dense baseline)",
            )
        else:
            need(
                self.init_gates is not None or self.distill_steps > 0,
                "init_gates",
                "an adapter folder, or null with distill_steps > 0 (fresh gates must be distilled first)",
            )
            try:
                self.sparsity_policy()
            except (TypeError, ValueError) as e:
                raise ConfigError(f"recipe field 'policy' is invalid: {e}") from e
        if self.rope:
            unknown = sorted(set(self.rope) - set(ROPE_KEYS))
            if unknown or set(self.rope) != set(ROPE_KEYS):
                raise ConfigError(
                    f"recipe field 'rope' must be empty or have exactly the keys {list(ROPE_KEYS)}, got {self.rope}"
                )
            from ..hf.rope import ROPE_SCALINGS  # no transformers import: hf.rope needs only torch

            if self.rope["rope_type"] not in ROPE_SCALINGS:
                raise ConfigError(f"recipe field 'rope.rope_type' must be one of {ROPE_SCALINGS}, got {self.rope}")
            factor, orig = self.rope["factor"], self.rope["original_max_position_embeddings"]
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
                raise ConfigError(f"recipe field 'rope.factor' must be a number > 1, got {factor!r}")
            if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
                raise ConfigError(
                    f"recipe field 'rope.original_max_position_embeddings' must be an int >= 1, got {orig!r}"
                )
        if self.lora:
            unknown = sorted(set(self.lora) - set(LORA_KEYS))
            if unknown or not {"r", "alpha", "target_modules"} <= set(self.lora):
                raise ConfigError(
                    f"recipe field 'lora' must be empty (full fine-tuning) or have the keys r, alpha, target_modules "
                    f"(and optionally dropout), got {self.lora}"
                )
            r, alpha, targets = self.lora["r"], self.lora["alpha"], self.lora["target_modules"]
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ConfigError(f"recipe field 'lora.r' must be an int >= 1, got {r!r}")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ConfigError(f"recipe field 'lora.alpha' must be a number > 0, got {alpha!r}")
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
                raise ConfigError(f"recipe field 'lora.target_modules' must be a list of module names, got {targets!r}")
            if self.parallel == "fsdp":
                raise ConfigError(
                    "recipe field 'parallel' must be 'ddp' or 'auto' with LoRA: merging LoRA into FSDP-sharded "
                    "weights before saving is not implemented (LoRA models fit one GPU per replica)"
                )

    def sparsity_policy(self):
        """The :class:`~seerattn.SparsityPolicy` of the training mask (``policy`` mapping)."""
        from ..block_mask import SparsityPolicy

        return SparsityPolicy.from_dict(self.policy)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: the gate-only distillation steps, then the joint steps."""
        return self.distill_steps + self.steps


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

    Values are parsed as YAML (``null``, ``true``, lists); the field types (and which fields are
    mappings that a dotted key may address) are checked by :func:`load_recipe`.
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
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"override {item!r}: a key is a field name or '<mapping field>.<key>'")
        if len(parts) == 2:
            nested = out.setdefault(parts[0], {})
            if not isinstance(nested, dict):
                raise ConfigError(f"override {item!r}: {parts[0]!r} was also set as a whole")
            nested[parts[1]] = _DottedValue(value)
        else:
            out[key] = value
    return out


class _DottedValue:
    """A value set through a dotted override (``gate.block_size=128``): merged into the recipe's mapping."""

    def __init__(self, value: Any):
        self.value = value


def _mapping_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] is dict]


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


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | dict[str, Any] | None = None,
    kind: type[TrainConfig] = DistillConfig,
) -> TrainConfig:
    """A validated recipe (a ``kind``: :class:`DistillConfig` or :class:`FinetuneConfig`) from a file plus overrides.

    Args:
        path: ``.yaml``/``.yml``/``.toml`` file, or None to build from ``overrides`` alone.
        overrides: ``["key=value", ...]`` (command line) or a mapping; a dotted key
            (``gate.block_size=128``) sets one entry of a mapping field (``gate``, and for fine-tuning
            ``rope``, ``policy``, ``lora``), merged into the recipe's mapping.
        kind: the config class.
    """
    raw = read_recipe_file(path) if path is not None else {}
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    maps = _mapping_fields(kind)
    for key, value in extra.items():
        dotted = isinstance(value, dict) and any(isinstance(v, _DottedValue) for v in value.values())
        if not dotted:
            raw[key] = value
            continue
        if key not in maps:
            allowed = " or ".join(f"'{m}.<field>'" for m in maps)
            raise ConfigError(f"override '{key}.…': only {allowed} may be dotted; other fields are top-level")
        base = raw.get(key) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"recipe field {key!r} must be a mapping, got {base!r}")
        raw[key] = {**base, **{k: v.value for k, v in value.items()}}
    return kind.from_dict(raw)
