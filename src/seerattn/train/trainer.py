"""The one trainer skeleton that gate distillation and long-context fine-tuning share.

:func:`run_training` owns everything that does not depend on *what* trains: the run folder and its
record, resuming from the newest checkpoint, seeding, the data (tokens -> packed rows -> a seeded
order), gradient accumulation, the distributed context, the optimizer step with clipping, the
progress bar, ``metrics.jsonl``/TensorBoard, checkpoints and the final record. A :class:`Task`
(``distill.DistillTask``, ``finetune.FinetuneTask``) says which model is built, which parameters
train at which rates, what one micro-batch computes (loss and logged values), how its state is
checkpointed and what it saves at the end.

Run folder (``output_dir``)::

    config.yaml            the resolved recipe (re-runnable as is)
    environment.json       versions, GPUs, commit, world size (environment-resume-<step>.json on resume)
    metrics.jsonl          one JSON object per logged step
    tb/                    TensorBoard events (when enabled)
    checkpoints/step_N/    trainable state + optimizer + scheduler + data position + RNG + step (atomic)
    summary.json           the run record (seerattn.record): resolved config, environment, final metrics
    ...                    the task's outputs (adapter/, model/)

Resuming (``resume=True``) continues from the newest checkpoint and produces bitwise the same
result as an uninterrupted run on the same hardware: the data order is a pure function of the
seed and the step, and RNG, optimizer and scheduler state are restored (on CUDA as far as the
kernels are deterministic). A newer checkpoint that does not load (truncated, overwritten, lacking
a key) is skipped with a warning (:func:`~.checkpoint.latest_valid_checkpoint`); ``metrics.jsonl`` is
read with :func:`~seerattn.record.read_jsonl`, which drops a last line torn by a kill with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from ..record import environment, read_jsonl, write_json_atomic, write_record
from .checkpoint import capture_rng, latest_checkpoint, latest_valid_checkpoint, restore_rng, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import PackedRows, RowOrder, prepare_tokens, sample_range
from .distributed import DistContext, clip_grad_norm, init_distributed

__all__ = ["Task", "TrainResult", "lr_multiplier", "run_training", "schedule_multiplier"]

logger = logging.getLogger(__name__)

_TOKEN_WAIT_S = 24 * 3600.0  # how long other ranks wait for rank 0's token cache (torchrun stops them on failure)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# what :meth:`_Run._save_checkpoint` writes; a checkpoint lacking one is damaged (``--resume`` falls back past it)
_CHECKPOINT_KEYS = ("step", "samples_seen", "task", "scheduler", "rng", "config", "data", "world_size", "elapsed_s")


@dataclass
class TrainResult:
    """What a training call did (on every rank; files are written by rank 0 only).

    ``outputs`` maps output names (``"adapter"``, ``"model"``) to their folders; it is empty when
    the run stopped early (``stop_after``). ``final`` holds the last step's logged metrics.
    """

    output_dir: Path
    start_step: int
    steps_done: int
    final: dict
    stopped_early: bool
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def adapter(self) -> Path | None:
        """The trained gates' adapter folder (None when the run stopped early or trained no gates)."""
        return self.outputs.get("adapter")

    @property
    def model(self) -> Path | None:
        """The fine-tuned model folder (``save_pretrained``), for fine-tuning runs."""
        return self.outputs.get("model")


def schedule_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR factor of 0-based ``step`` of ``total``: linear warmup over ``warmup`` steps, then cosine (or constant).

    Warmup reaches the full rate at step ``warmup - 1`` (step 0 already moves: ``1 / warmup``); the
    cosine then decays from 1 to ``min_ratio`` over the remaining steps.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """The recipe's LR factor of 0-based optimizer ``step`` over ``config.steps`` (see :func:`schedule_multiplier`)."""
    return schedule_multiplier(step, config.warmup_steps, config.steps, config.schedule, config.min_lr_ratio)


class Task(ABC):
    """What one kind of training adds to the skeleton (see the module docstring).

    Attributes set by :meth:`build`: ``model`` (the module that runs), ``trainable`` (``[(name, param)]``
    of everything the optimizer updates).
    """

    kind: str  # "distill" | "finetune": record kind, progress bar label

    def __init__(self, config: TrainConfig, model=None):
        self.config = config
        self.model = model
        self.trainable: list[tuple[str, torch.nn.Parameter]] = []

    @abstractmethod
    def build(self, ctx: DistContext, dtype: torch.dtype, start: int) -> None:
        """Load (or adopt) the model, attach gates, choose the trainable parameters, place/shard on ``ctx``."""

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """AdamW parameter groups (``{"params": [...], "lr": ...}``)."""

    @abstractmethod
    def lr_lambdas(self) -> list[Callable[[int], float]]:
        """One LR factor function of the global step per parameter group."""

    @abstractmethod
    def micro_step(self, step: int, ids: torch.Tensor, accum: int) -> torch.Tensor:
        """Forward + backward of one micro-batch ``ids`` [b, T] (loss divided by ``accum``).

        Returns the values to log as a detached float64 vector; the skeleton averages it over
        micro-batches and ranks and hands it to :meth:`step_metrics`.
        """

    @abstractmethod
    def reduce_gradients(self, step: int, ctx: DistContext) -> None:
        """Make the gradients of every rank the global average (what FSDP does not already do)."""

    @abstractmethod
    def step_metrics(self, step: int, values: list[float]) -> dict:
        """The logged metrics of one optimizer step from the averaged :meth:`micro_step` vector."""

    def progress(self, metrics: dict) -> dict:
        """The progress bar's postfix."""
        return {"loss": f"{metrics['loss']:.4f}"}

    def tensorboard_scalars(self, metrics: dict) -> dict[str, float]:
        """``{tag: value}`` written to TensorBoard each logged step."""
        return {f"train/{k}": v for k, v in metrics.items() if isinstance(v, float)}

    @abstractmethod
    def checkpoint_state(self, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
        """The trainable state and the optimizer state to checkpoint (called on every rank)."""

    @abstractmethod
    def load_checkpoint_state(self, state: dict, optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
        """Undo :meth:`checkpoint_state`."""

    @abstractmethod
    def save_outputs(self, out: Path, ctx: DistContext, tokenizer) -> dict[str, Path]:
        """Write the final artefacts (called on every rank after the last step); returns ``{name: folder}``."""

    def summary(self, final: dict) -> dict:
        """The final metrics kept in the run record."""
        return {k: final.get(k) for k in ("loss",)}

    def model_info(self) -> dict:
        """The run record's ``model`` block."""
        return {"path": self.config.model}

    def data_parallel(self) -> str:
        """The parallel layout actually used (for the environment record)."""
        return "ddp" if self.config.parallel == "auto" else self.config.parallel


# ---------------------------------------------------------------------------------------- helpers
def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The weights' dtype: ``model_dtype``, where ``auto`` = bfloat16 on CUDA, float32 on CPU."""
    if config.model_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.model_dtype]


def autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast when the recipe asks for it (``amp``: ``auto`` = on CUDA)."""
    use = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    if not use:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def load_model(config: TrainConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)


def _load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    field = "tokenizer" if config.tokenizer else "model"
    path = config.tokenizer or config.model
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # a missing folder, a bad hub id (HFValidationError is a ValueError)
        raise ConfigError(
            f"recipe field {field!r}: cannot load a tokenizer from {path!r}: expected a local folder with the "
            f"tokenizer files or a hub id this machine can reach ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from e


def _check_model_source(config: TrainConfig) -> None:
    """Fail in seconds, before the data is tokenised (minutes on a large corpus), when ``config.model``
    cannot be read: its config is loaded here, the weights later by the task."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(config.model)
    except (OSError, ValueError) as e:  # a missing folder, no config.json, a bad or unreachable hub id
        raise ConfigError(
            f"recipe field 'model': cannot load a model config from {config.model!r}: expected a local folder "
            f"with config.json or a hub id this machine can reach ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from e


def _tensorboard_writer(config: TrainConfig, logdir: Path, purge_step: int | None):
    if config.tensorboard is False:
        logger.info("TensorBoard off (recipe: tensorboard=false)")
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as e:
        if config.tensorboard is True:
            raise ConfigError(
                "recipe field 'tensorboard' is true but torch.utils.tensorboard cannot be imported "
                f"({e}); `pip install tensorboard` or set tensorboard=auto/false"
            ) from e
        logger.info("TensorBoard off: the `tensorboard` package is not installed (metrics go to metrics.jsonl)")
        return None
    return SummaryWriter(str(logdir), purge_step=purge_step)


def _check_tensorboard_available(config: TrainConfig) -> None:
    """Fail before any work when the recipe requires TensorBoard and it is missing."""
    if config.tensorboard is True:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ModuleNotFoundError as e:
            raise ConfigError(
                "recipe field 'tensorboard' is true but torch.utils.tensorboard cannot be imported "
                f"({e}); `pip install tensorboard` or set tensorboard=auto/false"
            ) from e


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric rows of steps after ``last_step`` (logged by a run killed after its checkpoint).

    Read with :func:`~seerattn.record.read_jsonl` (a line torn by the kill is dropped with a warning) and
    rewritten through a temporary file and a rename, so a kill during the rewrite leaves the old file whole.
    """
    if not path.is_file():
        return
    keep = [row for row in read_jsonl(path) if row["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
    tmp.replace(path)


def _check_resume_config(config: TrainConfig, saved: dict) -> None:
    now = config.to_dict()
    # A field added to the recipes after the checkpoint was written (e.g. gate_kind) is absent from its
    # config: that run used the field's default.
    defaults = {
        f.name: f.default if f.default is not MISSING else f.default_factory()
        for f in fields(config)
        if f.default is not MISSING or f.default_factory is not MISSING
    }
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    diff = {
        k: (saved.get(k), now.get(k))
        for k in set(now) | set(saved)
        if k not in type(config).RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    }
    if diff:
        raise ConfigError(
            "cannot resume: the recipe differs from the checkpoint's in fields that change the result "
            f"(checkpoint, now): {diff}. Resume with the original recipe, or start a new output_dir. "
            f"Fields that may change on resume: {list(type(config).RESUMABLE_CHANGES)}"
        )


# ---------------------------------------------------------------------------------------- the run
def run_training(task: Task, *, resume: bool = False, tokenizer=None, stop_after: int | None = None) -> TrainResult:
    """Train ``task`` as its recipe says (module docstring); under ``torchrun`` every process calls this.

    Args:
        task: what trains (its ``config`` is the recipe).
        resume: continue from the newest checkpoint in ``output_dir`` (a fresh start, logged, when there
            is none). Without it, an ``output_dir`` that already holds checkpoints is an error.
        tokenizer: a tokenizer to use instead of loading ``config.tokenizer or config.model``.
        stop_after: stop right after this (1-based) global step without writing a checkpoint or the
            outputs, as if the process had been killed there (used to test resuming).
    """
    _check_tensorboard_available(task.config)
    ctx = init_distributed(task.config.device)
    try:
        return _Run(task, ctx, tokenizer).train(resume, stop_after)
    finally:
        ctx.close()


class _Run:
    """One launch of :func:`run_training`, in the order it happens (each method one phase)."""

    def __init__(self, task: Task, ctx: DistContext, tokenizer):
        self.task, self.ctx, self.config = task, ctx, task.config
        self.tokenizer = tokenizer
        self.out = Path(self.config.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.accum = self.config.accumulation_steps(ctx.world_size)

    def train(self, resume: bool, stop_after: int | None) -> TrainResult:
        if self.task.model is None:
            _check_model_source(self.config)
        ckpt = self._find_checkpoint(resume)
        start = ckpt["step"] if ckpt is not None else 0
        self._write_run_folder(start)
        self._seed()
        rows, order, data_info = self._data(ckpt)
        dtype = resolve_dtype(self.config, self.ctx.device)
        self.task.build(self.ctx, dtype, start)
        optimizer, scheduler = self._optimizer()
        elapsed_before = self._restore(ckpt, optimizer, scheduler)
        final, stopped, step_times, t_launch = self._loop(
            start, rows, order, data_info, optimizer, scheduler, elapsed_before, stop_after
        )
        outputs: dict[str, Path] = {}
        if not stopped:
            outputs = self.task.save_outputs(self.out, self.ctx, self.tokenizer)
            if self.ctx.is_main:
                self._write_record(start, final, step_times, t_launch, elapsed_before, outputs)
            self.ctx.barrier()
        return TrainResult(
            output_dir=self.out,
            start_step=start,
            steps_done=final.get("step", start),
            final=final,
            stopped_early=stopped,
            outputs=outputs,
        )

    # ------------------------------------------------------------------------------- phases
    def _find_checkpoint(self, resume: bool) -> dict | None:
        newest = latest_checkpoint(self.ckpt_root)
        if newest is not None and not resume:
            raise FileExistsError(
                f"{self.out} already holds checkpoints (newest {newest.name}); pass --resume (resume=True) to "
                "continue that run, or choose another output_dir"
            )
        # the newest checkpoint that loads and holds every key we save; damaged newer ones are skipped with
        # a warning (a kill cannot damage one: saves are atomic; a disk error or a bad copy can)
        found = latest_valid_checkpoint(self.ckpt_root, required=_CHECKPOINT_KEYS) if resume else None
        if resume and found is None:
            logger.info("resume requested but %s has no checkpoint: starting from step 0", self.ckpt_root)
        if found is None:
            return None
        ckpt_dir, ckpt = found
        _check_resume_config(self.config, ckpt["config"])
        logger.info("resuming from %s (step %d)", ckpt_dir, ckpt["step"])
        return ckpt

    def _environment(self) -> dict:
        return {
            "world_size": self.ctx.world_size,
            "parallel": self.task.data_parallel(),
            "device": str(self.ctx.device),
            "accumulation_steps": self.accum,
        }

    def _write_run_folder(self, start: int) -> None:
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            name = "environment.json" if start == 0 else f"environment-resume-{start}.json"
            write_json_atomic(self.out / name, {**environment(), **self._environment()})
        self.ctx.barrier()

    def _seed(self) -> None:
        # before the gates exist: their init may draw random numbers
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
        np.random.seed(self.config.seed)

    def _data(self, ckpt: dict | None):
        """Rank 0 tokenises into the cache, the others read it; rows in a seeded order."""
        config = self.config
        if self.tokenizer is None:
            self.tokenizer = _load_tokenizer(config)
        cache = Path(config.data_cache_dir) if config.data_cache_dir else self.out / "data_cache"
        # no collective here: a long tokenisation must not run into the process group's timeout
        tokens = prepare_tokens(
            config.data,
            self.tokenizer,
            cache,
            build=self.ctx.is_main,
            wait_s=_TOKEN_WAIT_S,
            split=config.data_split,
            text_field=config.text_field,
            separator=config.document_separator,
            max_tokens=config.max_data_tokens,
            seed=config.seed,
            shuffle=config.shuffle,
        )
        rows = PackedRows(tokens, config.seq_len)
        order = RowOrder(len(rows), config.seed, config.shuffle)
        data_info = {
            "digest": tokens.digest,
            "n_tokens": tokens.n_tokens,
            "n_rows": len(rows),
            "seq_len": config.seq_len,
        }
        if ckpt is not None and ckpt["data"] != data_info:
            raise ValueError(f"cannot resume: the data differs from the checkpoint's ({ckpt['data']} vs {data_info})")
        logger.info(
            "data: %d tokens, %d rows of %d; %.2f epochs for %d steps x %d sequences",
            tokens.n_tokens,
            len(rows),
            config.seq_len,
            config.total_steps * config.batch_size / len(rows),
            config.total_steps,
            config.batch_size,
        )
        return rows, order, data_info

    def _optimizer(self):
        c = self.config
        optimizer = torch.optim.AdamW(
            self.task.param_groups(), lr=c.lr, betas=c.adam_betas, eps=c.adam_eps, weight_decay=c.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.task.lr_lambdas())
        n = sum(p.numel() for _, p in self.task.trainable)
        logger.info(
            "%s: %d trainable tensors (%.2f M parameters); %d process(es) x %d micro-batch(es) of %d",
            self.task.kind,
            len(self.task.trainable),
            n / 1e6,
            self.ctx.world_size,
            self.accum,
            c.micro_batch_size,
        )
        return optimizer, scheduler

    def _restore(self, ckpt: dict | None, optimizer, scheduler) -> float:
        if ckpt is None:
            return 0.0
        self.task.load_checkpoint_state(ckpt["task"], optimizer, self.ctx)
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"])
        if ckpt.get("world_size") != self.ctx.world_size:
            logger.warning(
                "the checkpoint was written with %s process(es), this run has %d: the data order and global "
                "batch are unchanged, but the summation order (hence the last bits) may differ",
                ckpt.get("world_size"),
                self.ctx.world_size,
            )
        return ckpt.get("elapsed_s", 0.0)

    def _loop(self, start, rows, order, data_info, optimizer, scheduler, elapsed_before, stop_after):
        config, ctx, task = self.config, self.ctx, self.task
        total = config.total_steps
        metrics_path = self.out / "metrics.jsonl"
        writer = bar = None
        if ctx.is_main:
            if start:
                _truncate_metrics(metrics_path, start)
            elif metrics_path.exists():
                metrics_path.unlink()
            writer = _tensorboard_writer(config, self.out / "tb", purge_step=start + 1 if start else None)
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                initial=start,
                disable=not config.progress,
                desc=task.kind,
                unit="step",
                dynamic_ncols=True,
            )
        tokens_per_step = config.batch_size * config.seq_len
        final: dict = {}
        step_times: list[float] = []
        if start >= total:
            logger.info("the checkpoint is at the last step (%d): nothing left to train", start)
            rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
            final = rows[-1] if rows else {}
        stopped = False
        t_launch = time.perf_counter()
        params = [p for _, p in task.trainable]
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                lrs = [g["lr"] for g in optimizer.param_groups]
                optimizer.zero_grad(set_to_none=True)
                acc = None
                for micro in range(self.accum):
                    samples = sample_range(
                        step, micro, ctx.rank, ctx.world_size, config.micro_batch_size, config.batch_size
                    )
                    ids = rows.rows([order(s) for s in samples]).to(ctx.device)
                    values = task.micro_step(step, ids, self.accum)
                    acc = values if acc is None else acc + values
                task.reduce_gradients(step, ctx)
                max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
                grad_norm = clip_grad_norm([p for p in params if p.grad is not None], max_norm, ctx)
                if not math.isfinite(grad_norm):  # stop before a non-finite update reaches the weights
                    raise FloatingPointError(
                        f"step {step + 1}: the gradient norm is {grad_norm}; nothing was applied. Lower lr or "
                        "check the data/model dtype, then resume from the last checkpoint"
                    )
                optimizer.step()
                scheduler.step()
                acc /= self.accum
                ctx.all_reduce_mean(acc)
                done = step + 1
                values = acc.tolist()  # waits for the device: the step is over
                step_time = time.perf_counter() - t0
                step_times.append(step_time)
                final = {
                    "step": done,
                    **task.step_metrics(step, values),
                    "lr": lrs[0],
                    **({f"lr_{i}": v for i, v in enumerate(lrs)} if len(lrs) > 1 else {}),
                    "grad_norm": grad_norm,
                    "tokens": done * tokens_per_step,
                    "step_time_s": step_time,
                    "tokens_per_s": tokens_per_step / step_time,
                }
                if ctx.is_main:
                    if done % config.log_every == 0 or done == total:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(final) + "\n")
                        if writer is not None:
                            for tag, v in task.tensorboard_scalars(final).items():
                                writer.add_scalar(tag, v, done)
                    bar.update(1)
                    bar.set_postfix(**task.progress(final), lr=f"{lrs[0]:.2e}")
                if stop_after is not None and done >= stop_after and done < total:
                    logger.info("stopping after step %d (stop_after): no checkpoint, as if killed", done)
                    stopped = True
                    break
                if done % config.save_every == 0 or done == total:
                    elapsed = elapsed_before + time.perf_counter() - t_launch
                    self._save_checkpoint(done, optimizer, scheduler, data_info, elapsed)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return final, stopped, step_times, t_launch

    def _save_checkpoint(self, done: int, optimizer, scheduler, data_info: dict, elapsed: float) -> None:
        state = self.task.checkpoint_state(optimizer, self.ctx)  # a collective under FSDP: every rank
        if self.ctx.is_main:
            snapshot = {  # the keys of _CHECKPOINT_KEYS
                "step": done,
                "samples_seen": done * self.config.batch_size,
                "task": state,
                "scheduler": scheduler.state_dict(),
                "rng": capture_rng(),
                "config": self.config.to_dict(),
                "data": data_info,
                "world_size": self.ctx.world_size,
                "elapsed_s": elapsed,
            }
            save_checkpoint(self.ckpt_root, done, snapshot, keep=self.config.keep_checkpoints)
        self.ctx.barrier()

    def _write_record(self, start, final, step_times, t_launch, elapsed_before, outputs) -> None:
        config = self.config
        tokens_per_step = config.batch_size * config.seq_len
        total = config.total_steps
        elapsed = elapsed_before + time.perf_counter() - t_launch
        summary = {
            "steps": total,
            "tokens": total * tokens_per_step,
            "final": self.task.summary(final),
            "wall_time_s": elapsed,
            "device_hours": elapsed * self.ctx.world_size / 3600,
            **{name: str(path) for name, path in outputs.items()},
        }
        if start < total:
            trained_tokens = (total - start) * tokens_per_step
            summary["tokens_per_s_this_launch"] = trained_tokens / max(time.perf_counter() - t_launch, 1e-9)
        if len(step_times) > 1:  # the first step of a launch includes compilation and warm-up
            steady = sorted(step_times[1:])
            summary["step_time_s_median"] = steady[len(steady) // 2]
            summary["tokens_per_s_median"] = tokens_per_step / summary["step_time_s_median"]
        write_record(
            self.out / "summary.json",
            self.task.kind,
            summary,
            config=config.to_dict(),
            model=self.task.model_info(),
            environment_extra=self._environment(),
        )
        logger.info("%s done: %s", self.task.kind, {k: str(v) for k, v in outputs.items()})
