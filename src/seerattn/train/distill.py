"""Gate distillation: train the AttnGates of a frozen causal LM against its own attention.

Per optimizer step, every process runs ``accumulation_steps`` forwards of ``micro_batch_size``
packed rows through the frozen model in ``mode="distill"``: each attention layer computes its
output with ``attention_with_block_scores`` (Triton on CUDA, reference on CPU), whose block
ground truth is the target of that layer's gate. The loss is

    loss = loss_scale * sum over layers of KL(ground truth || softmax(gate logits))

(per layer: mean over batch, heads and kept query-block rows; the first ``skip_first_rows`` of
the rows are left out). Only gate parameters receive gradients: the base weights have
``requires_grad=False``, the model is in eval mode, and the gates read detached pre-RoPE Q/K, so
no autograd graph is built through the base model.

Run folder (``output_dir``)::

    config.yaml            the resolved recipe (re-runnable as is)
    environment.json       versions, GPUs, world size (environment-resume-<step>.json on resume)
    metrics.jsonl          one JSON object per logged step
    tb/                    TensorBoard events (when enabled)
    checkpoints/step_N/    gates + optimizer + scheduler + data position + RNG + step (atomic)
    adapter/               the trained gates (seerattn.hf.save_gates) after the last step
    summary.json           steps, tokens, final loss and recall, wall time, throughput

Resuming (``resume=True``) continues from the newest checkpoint and produces bitwise the same
gates as an uninterrupted run on the same hardware (the data order is a pure function of the
seed and the step; RNG, optimizer and scheduler state are restored). On CPU this is exact; on CUDA
it is exact as far as the kernels are deterministic.

Entry point: :func:`distill` (the ``seerattn distill`` command calls it).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from .checkpoint import capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .config import ConfigError, DistillConfig
from .data import PackedRows, RowOrder, prepare_tokens, sample_range
from .distributed import (
    DistContext,
    average_gradients,
    broadcast_parameters,
    check_replicas,
    init_distributed,
    shard_base_model,
)

__all__ = ["DistillResult", "distill", "lr_multiplier"]

logger = logging.getLogger(__name__)

_TOKEN_WAIT_S = 24 * 3600.0  # how long other ranks wait for rank 0's token cache (torchrun stops them on failure)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class DistillResult:
    """What a :func:`distill` call did (on every rank; files are written by rank 0 only).

    ``adapter`` is None when the run stopped early (``stop_after``); ``final`` holds the last
    step's logged metrics.
    """

    output_dir: Path
    adapter: Path | None
    start_step: int
    steps_done: int
    final: dict
    stopped_early: bool


def lr_multiplier(step: int, config: DistillConfig) -> float:
    """Learning-rate factor of 0-based optimizer ``step``: linear warmup, then cosine (or constant).

    Warmup reaches the full rate at step ``warmup_steps - 1`` (step 0 already moves: ``1 / warmup``);
    the cosine then decays from 1 to ``min_lr_ratio`` over the remaining steps.
    """
    w = config.warmup_steps
    if step < w:
        return (step + 1) / w
    if config.schedule == "constant":
        return 1.0
    progress = (step - w) / max(1, config.steps - w)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------- helpers
def _gate_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    from ..hf import gate_modules

    out = []
    for i, gate in gate_modules(model).items():
        for name, p in gate.named_parameters():
            out.append((f"layers.{i}.{name}", p))
    return out


def _resolve_dtype(config: DistillConfig, device: torch.device) -> torch.dtype:
    if config.model_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.model_dtype]


def _autocast(config: DistillConfig, device: torch.device):
    use = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    if not use:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _tensorboard_writer(config: DistillConfig, logdir: Path, purge_step: int | None):
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


def _check_tensorboard_available(config: DistillConfig) -> None:
    """Fail before any work when the recipe requires TensorBoard and it is missing."""
    if config.tensorboard is True:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ModuleNotFoundError as e:
            raise ConfigError(
                "recipe field 'tensorboard' is true but torch.utils.tensorboard cannot be imported "
                f"({e}); `pip install tensorboard` or set tensorboard=auto/false"
            ) from e


def _load_model(config: DistillConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)


def _load_tokenizer(config: DistillConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.tokenizer or config.model)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines of steps after ``last_step`` (logged by a run killed after its checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def _check_resume_config(config: DistillConfig, saved: dict) -> None:
    now = config.to_dict()
    diff = {
        k: (saved.get(k), now.get(k))
        for k in set(now) | set(saved)
        if k not in DistillConfig.RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    }
    if diff:
        raise ConfigError(
            "cannot resume: the recipe differs from the checkpoint's in fields that change the result "
            f"(checkpoint, now): {diff}. Resume with the original recipe, or start a new output_dir. "
            f"Fields that may change on resume: {list(DistillConfig.RESUMABLE_CHANGES)}"
        )


# ---------------------------------------------------------------------------------------- trainer
def distill(
    config: DistillConfig,
    *,
    resume: bool = False,
    model=None,
    tokenizer=None,
    stop_after: int | None = None,
) -> DistillResult:
    """Train the gates of ``config.model`` as the recipe says; the adapter lands in ``output_dir/adapter``.

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
    _check_tensorboard_available(config)
    ctx = init_distributed(config.device)
    try:
        return _run(config, ctx, resume, model, tokenizer, stop_after)
    finally:
        ctx.close()


def _run(
    config: DistillConfig, ctx: DistContext, resume: bool, model, tokenizer, stop_after: int | None
) -> DistillResult:
    from ..hf import SeerConfig, apply_seer_attention, get_seer_state, save_gates
    from ..hf.integration import _decoder_layers

    out = Path(config.output_dir)
    ckpt_root = out / "checkpoints"
    accum = config.accumulation_steps(ctx.world_size)
    parallel = "ddp" if config.parallel == "auto" else config.parallel
    if parallel == "fsdp" and not ctx.distributed:
        logger.info("parallel=fsdp with a single process: nothing to shard, running unsharded")

    # ---- where do we start?
    ckpt_dir = latest_checkpoint(ckpt_root)
    if ckpt_dir is not None and not resume:
        raise FileExistsError(
            f"{out} already holds checkpoints (newest {ckpt_dir.name}); pass --resume (resume=True) to "
            "continue that run, or choose another output_dir"
        )
    if resume and ckpt_dir is None:
        logger.info("resume requested but %s has no checkpoint: starting from step 0", ckpt_root)
    ckpt = load_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if ckpt is not None:
        _check_resume_config(config, ckpt["config"])
    start = ckpt["step"] if ckpt is not None else 0

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        from ..env import environment

        env = {
            **environment(),
            "world_size": ctx.world_size,
            "parallel": parallel,
            "device": str(ctx.device),
            "accumulation_steps": accum,
        }
        _write_json(out / ("environment.json" if start == 0 else f"environment-resume-{start}.json"), env)
    ctx.barrier()

    # ---- seeds (before the gates exist: their init may draw random numbers)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    # ---- data: rank 0 tokenises into the cache, the others read it
    if tokenizer is None:
        tokenizer = _load_tokenizer(config)
    cache = Path(config.data_cache_dir) if config.data_cache_dir else out / "data_cache"
    token_args = dict(
        split=config.data_split,
        text_field=config.text_field,
        separator=config.document_separator,
        max_tokens=config.max_data_tokens,
        seed=config.seed,
        shuffle=config.shuffle,
    )
    # no collective here: a long tokenisation must not run into the process group's timeout
    tokens = prepare_tokens(config.data, tokenizer, cache, build=ctx.is_main, wait_s=_TOKEN_WAIT_S, **token_args)
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
        config.steps * config.batch_size / len(rows),
        config.steps,
        config.batch_size,
    )

    # ---- model: frozen, eval mode, gates attached
    dtype = _resolve_dtype(config, ctx.device)
    if model is None:
        model = _load_model(config, dtype)
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
    state = get_seer_state(model)
    named = _gate_named_parameters(model)
    params = [p for _, p in named]
    for p in params:
        p.requires_grad_(True)
    base, layers = _decoder_layers(model)
    if parallel == "fsdp" and ctx.distributed:
        shard_base_model(base, layers, set(params), ctx)
    else:
        model.to(ctx.device)
    n_layers = len(layers)

    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, config))
    elapsed_before = 0.0
    if ckpt is not None:
        gates = ckpt["gates"]
        want = {n for n, _ in named}
        if set(gates) != want:
            raise ValueError(f"checkpoint gate keys differ from the model's: {sorted(set(gates) ^ want)[:5]}")
        with torch.no_grad():
            for n, p in named:
                p.copy_(gates[n])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"])
        elapsed_before = ckpt.get("elapsed_s", 0.0)
        logger.info("resumed from %s (step %d)", ckpt_dir, start)
        if ckpt.get("world_size") != ctx.world_size:
            logger.warning(
                "the checkpoint was written with %s process(es), this run has %d: the data order and global "
                "batch are unchanged, but the summation order (hence the last bits) may differ",
                ckpt.get("world_size"),
                ctx.world_size,
            )
    broadcast_parameters(params, ctx)
    gate_mb = sum(p.numel() * p.element_size() for p in params) / 2**20
    logger.info(
        "training %d gate tensors (%.1f MiB) on %d layer(s); base frozen (%s, %s); %d process(es) x %d "
        "micro-batch(es) of %d",
        len(params),
        gate_mb,
        n_layers,
        dtype,
        ctx.device,
        ctx.world_size,
        accum,
        config.micro_batch_size,
    )

    # ---- outputs of rank 0
    metrics_path = out / "metrics.jsonl"
    writer = None
    bar = None
    if ctx.is_main:
        if start:
            _truncate_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
        writer = _tensorboard_writer(config, out / "tb", purge_step=start + 1 if start else None)
        from tqdm import tqdm

        bar = tqdm(
            total=config.steps,
            initial=start,
            disable=not config.progress,
            desc="distill",
            unit="step",
            dynamic_ncols=True,
        )

    tokens_per_step = config.batch_size * config.seq_len
    final: dict = {}
    step_times: list[float] = []
    if start >= config.steps:
        logger.info("the checkpoint is at the last step (%d): nothing left to train", start)
        if metrics_path.is_file() and metrics_path.read_text().strip():
            final = json.loads(metrics_path.read_text().strip().splitlines()[-1])
    stopped = False
    t_launch = time.perf_counter()
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            # per layer: KL, mass recall and block recall, summed over micro-batches
            acc = torch.zeros(3 * n_layers, dtype=torch.float64, device=ctx.device)
            for micro in range(accum):
                idx = [
                    order(s)
                    for s in sample_range(
                        step, micro, ctx.rank, ctx.world_size, config.micro_batch_size, config.batch_size
                    )
                ]
                ids = rows.rows(idx).to(ctx.device)
                state.reset()
                with _autocast(config, ctx.device):
                    base(input_ids=ids, use_cache=False)
                if len(state.losses) != n_layers:
                    raise RuntimeError(f"{len(state.losses)} of {n_layers} layers recorded a gate loss")
                kl = torch.stack([state.losses[i] for i in range(n_layers)])
                loss = config.loss_scale * kl.sum()
                (loss / accum).backward()
                acc[:n_layers] += kl.detach().double()
                acc[n_layers : 2 * n_layers] += torch.tensor(
                    [state.metrics[i]["mass_recall"] for i in range(n_layers)],
                    dtype=torch.float64,
                    device=ctx.device,
                )
                acc[2 * n_layers :] += torch.tensor(
                    [state.metrics[i]["block_recall"] for i in range(n_layers)],
                    dtype=torch.float64,
                    device=ctx.device,
                )
            state.reset()
            average_gradients(params, ctx)
            max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(grad_norm):  # stop before a non-finite update reaches the gates
                raise FloatingPointError(
                    f"step {step + 1}: the gate gradient norm is {grad_norm}; nothing was applied. Lower lr or "
                    "check the data/model dtype, then resume from the last checkpoint"
                )
            optimizer.step()
            scheduler.step()
            acc /= accum
            ctx.all_reduce_mean(acc)
            done = step + 1
            kl_layers = acc[:n_layers].tolist()  # .tolist() waits for the device: the step is over
            mass_layers = acc[n_layers : 2 * n_layers].tolist()
            block_layers = acc[2 * n_layers :].tolist()
            step_time = time.perf_counter() - t0
            step_times.append(step_time)
            final = {
                "step": done,
                "loss": config.loss_scale * sum(kl_layers),
                "kl": sum(kl_layers),
                "mass_recall": sum(mass_layers) / n_layers,
                "block_recall": sum(block_layers) / n_layers,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": done * tokens_per_step,
                "step_time_s": step_time,
                "tokens_per_s": tokens_per_step / step_time,
                "kl_layers": kl_layers,
                "mass_recall_layers": mass_layers,
            }
            if ctx.is_main:
                if done % config.log_every == 0 or done == config.steps:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(final) + "\n")
                    if writer is not None:
                        for key in (
                            "loss",
                            "kl",
                            "mass_recall",
                            "block_recall",
                            "lr",
                            "grad_norm",
                            "tokens_per_s",
                        ):
                            writer.add_scalar(f"train/{key}", final[key], done)
                        for i, v in enumerate(kl_layers):
                            writer.add_scalar(f"kl_layer/{i}", v, done)
                        for i, v in enumerate(mass_layers):
                            writer.add_scalar(f"mass_recall_layer/{i}", v, done)
                bar.update(1)
                bar.set_postfix(loss=f"{final['loss']:.4f}", recall=f"{final['mass_recall']:.3f}", lr=f"{lr:.2e}")
            if stop_after is not None and done >= stop_after and done < config.steps:
                logger.info("stopping after step %d (stop_after): no checkpoint, as if killed", done)
                stopped = True
                break
            if done % config.save_every == 0 or done == config.steps:
                elapsed = elapsed_before + time.perf_counter() - t_launch
                if ctx.is_main:
                    snapshot = {
                        "step": done,
                        "samples_seen": done * config.batch_size,
                        "gates": {n: p.detach().cpu().clone() for n, p in named},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": capture_rng(),
                        "config": config.to_dict(),
                        "data": data_info,
                        "world_size": ctx.world_size,
                        "elapsed_s": elapsed,
                    }
                    save_checkpoint(ckpt_root, done, snapshot, keep=config.keep_checkpoints)
                ctx.barrier()
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    adapter = None
    if not stopped:
        check_replicas(params, ctx)
        if ctx.is_main:
            adapter = save_gates(model, out / "adapter")
            elapsed = elapsed_before + time.perf_counter() - t_launch
            steps_total = config.steps
            summary = {
                "steps": steps_total,
                "tokens": steps_total * tokens_per_step,
                "final": {k: final.get(k) for k in ("loss", "kl", "mass_recall", "block_recall")},
                "wall_time_s": elapsed,
                "device_hours": elapsed * ctx.world_size / 3600,
                "world_size": ctx.world_size,
                "device": str(ctx.device),
                "adapter": str(adapter),
            }
            if start < steps_total:
                trained_tokens = (steps_total - start) * tokens_per_step
                summary["tokens_per_s_this_launch"] = trained_tokens / max(time.perf_counter() - t_launch, 1e-9)
            if len(step_times) > 1:  # the first step of a launch includes compilation and warm-up
                steady = sorted(step_times[1:])
                summary["step_time_s_median"] = steady[len(steady) // 2]
                summary["tokens_per_s_median"] = tokens_per_step / summary["step_time_s_median"]
            _write_json(out / "summary.json", summary)
            logger.info("adapter written to %s", adapter)
        else:
            adapter = out / "adapter"
        ctx.barrier()
    return DistillResult(
        output_dir=out,
        adapter=adapter,
        start_step=start,
        steps_done=(final.get("step", start)),
        final=final,
        stopped_early=stopped,
    )
