"""Kernel configurations, the candidate lists the kernels are tuned over, and a small autotuner.

Why not ``triton.autotune``: the block-sparse kernel's tile shape decides which query rows share a
program (one query block, several query blocks with merged "union" lists, or several heads of a GQA
group), and that decides host-side preparation (the union lists) and the launch grid. A launcher
that picks the config itself can prepare exactly what the chosen config needs, and the benchmark
can force a config to compare them.

Rules kept here:

- Nothing queries the Triton driver or CUDA at import time; under the interpreter, importing this module
  applies :func:`patch_interpreter_index` (an upstream interpreter bug with NumPy >= 2.4).
- Under ``TRITON_INTERPRET=1`` every candidate list has exactly one config (multi-config tuning
  needs a GPU), with small tiles so the interpreter stays fast.
- ``SEERATTN_TRITON_AUTOTUNE=0`` skips tuning and uses the first (heuristic) candidate; tests use it
  to save compile time.
- The block-sparse forward's best tile depends on the mask, not only on the shape (H200, 32k, per-
  query-head masks: a scattered 10 % mask ran in 4.5 ms on the tile tuned on a dense mask and in
  2.9 ms on its own), so its tuning key includes :func:`mask_key`: the mask's density bucket and
  how much consecutive rows' lists overlap, or the policy that built it. Every kind of mask is then
  timed on a mask of its kind, whatever the order of the calls.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "KernelConfig",
    "autotune_enabled",
    "check_device",
    "block_scores_configs",
    "dkdv_configs",
    "dq_configs",
    "interpreting",
    "mask_key",
    "memo_mask_key",
    "num_sms",
    "patch_interpreter_index",
    "pick_config",
    "sparse_configs",
]

# Query rows per program on the GPU: 128 rows = two wgmma warpgroups' worth of M on Hopper, the tile
# size at which FlashAttention-style kernels reach their best throughput (64-row tiles load every K/V
# tile twice as often per FLOP).
_GPU_TILE_M = 128
# Under the interpreter: small tiles so that block sizes 16/32 exercise the union and packing paths.
_INTERP_TILE_M = 32
_INTERP_BLOCK_N = 32


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def patch_interpreter_index() -> None:
    """Work around triton-lang/triton#9171 (fixed upstream by PR #9172): with NumPy >= 2.4 Triton 3.6's
    interpreter takes ``int()`` of a scalar held as a 1-element array, which raises, so every kernel with a
    ``range()`` over tensor bounds (the decode kernel's steps, the selection's loops) fails on the CPU. Applies the
    upstream fix (flatten before ``int``) to the interpreter's tensor patching; idempotent. Run when this module is
    imported under the interpreter, before any kernel: the interpreter path of every ``impl="triton"`` op works
    outside the test suite too (a benchmark's ``--smoke``, a CPU run of the CLI)."""
    import numpy as np
    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_seerattn_fixed", False):
        return  # a Triton whose interpreter is laid out otherwise has no such hook to fix, or it is fixed already

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._seerattn_fixed = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    patch_interpreter_index()


def check_shapes_and_devices(
    op: str, shapes: dict, tensors: dict, ref: str, ref_text: str, cos=None, sin=None, b: int = 0, dg: int = 0
) -> None:
    """The checks the gate-query and key-cache-append ops share: ``shapes[name] = (x, want, legend)``, each x a
    tensor of shape ``want`` (and the RoPE tables ``cos`` / ``sin``, when given, ``[B, 1, Dg]``), then every tensor
    of ``tensors`` on the device of ``tensors[ref]`` (``ref_text`` names it in the error, e.g. "q is"); cos / sin,
    when given, are added to ``tensors`` (the caller's later checks read them there too)."""
    if cos is not None:
        shapes = {**shapes, "cos": (cos, (b, 1, dg), "[B, 1, Dg]"), "sin": (sin, (b, 1, dg), "[B, 1, Dg]")}
        tensors.update(cos=cos, sin=sin)
    for name, (x, want, legend) in shapes.items():
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{op}: {name} must be {legend} = {list(want)}, got {got}")
    device = tensors[ref].device
    for name, x in tensors.items():
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_text} on {device}")


def check_device(x: torch.Tensor, op: str, dtypes: tuple[torch.dtype, ...]) -> None:
    """Where a Triton kernel can read ``x``: CUDA tensors, or CPU tensors under the interpreter, where bf16
    is refused (the interpreter computes it silently wrong); ``x.dtype`` one of ``dtypes``."""
    if interpreting():
        if x.device.type != "cpu":
            raise ValueError(f"{op} (triton): TRITON_INTERPRET=1 runs on CPU tensors, got {x.device}")
        if x.dtype == torch.bfloat16:
            raise TypeError(f"{op} (triton): bf16 is silently wrong in the Triton interpreter; use fp16 or fp32")
    elif x.device.type != "cuda":
        raise ValueError(
            f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {x.device}; "
            "use the reference (eager) implementation on CPU"
        )
    if x.dtype not in dtypes:
        raise TypeError(f"{op} (triton): dtype must be one of {dtypes}, got {x.dtype}")


def autotune_enabled() -> bool:
    """False when ``SEERATTN_TRITON_AUTOTUNE=0`` (use the first candidate without timing)."""
    return os.environ.get("SEERATTN_TRITON_AUTOTUNE", "1") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration.

    Attributes:
        block_m: query rows per program (``pack * rows``).
        block_n: keys per inner step.
        pack: query heads sharing one program (block-sparse kernel, per-group masks only).
        num_warps, num_stages: Triton launch options.
        atomic_dq: the backward's dK/dV pass only (the other kernels do not read it): also
            accumulate dQ there with fp32 atomic adds, so the dQ pass does not run (one pass of 5
            matmuls per tile pair instead of two passes of 7 in all); not deterministic, so never
            used while ``torch.are_deterministic_algorithms_enabled()``.
        hopper_ws: the block-sparse forward only: the warp-specialised Gluon kernel for Hopper
            (:mod:`.sparse_fwd_ws`: a TMA loader warp and two math warpgroups) instead of the Triton one; its
            tile has 128 rows (the group's heads per group, two heads' blocks per query head) and takes
            ``block_n`` keys a step: 64 (a kept 64-token block) or, per group or on the union tile, 128 (two kept
            64-token blocks, or a 128-token one); ``num_warps`` / ``num_stages`` record it).
        union: with ``hopper_ws``, per-query-head masks at 64-token blocks only: the union kernel (a tile is two
            consecutive query blocks of one head, each block of the union of their lists copied once and used by
            the rows that keep it) instead of the head-pair one (a tile is one query block of two heads, a list and
            a ring each).
    """

    block_m: int
    block_n: int
    pack: int = 1
    num_warps: int = 4
    num_stages: int = 2
    atomic_dq: bool = False
    hopper_ws: bool = False
    union: bool = False

    def __post_init__(self) -> None:
        if self.union and not self.hopper_ws:
            raise ValueError("KernelConfig: union=True is a tile of the Hopper kernel: it needs hopper_ws=True")

    def short(self) -> str:
        atomic = "/atomic-dQ" if self.atomic_dq else ""
        ws = ("/hopper-ws-union" if self.union else "/hopper-ws") if self.hopper_ws else ""
        return f"M{self.block_m}/N{self.block_n}/P{self.pack}/w{self.num_warps}/s{self.num_stages}{atomic}{ws}"


def _pow2_factor(n: int) -> int:
    """Largest power of two dividing ``n``."""
    return n & -n


def sparse_configs(mask_block: int, heads_per_mask: int, head_dim: int, hopper_ws: bool = False) -> list[KernelConfig]:
    """Candidates for the block-sparse forward; the first one is the untuned default.

    Args:
        mask_block: tokens per mask block.
        heads_per_mask: query heads governed by one mask head (1 for per-query-head masks, the
            GQA group size for per-group masks).
        head_dim: D.
        hopper_ws: the case runs on the warp-specialised Hopper kernel (:func:`.sparse_fwd_ws.supported`, which
            looks at the GPU, dtype and layout): its config is appended, a candidate the tuner times like the others.
    """
    if interpreting():
        tile_m, block_n = _INTERP_TILE_M, min(_INTERP_BLOCK_N, mask_block)
        pack = min(_pow2_factor(heads_per_mask), max(1, tile_m // mask_block))
        return [KernelConfig(tile_m, block_n, pack, num_warps=4, num_stages=1)]  # Gluon has no interpreter
    # Chosen from the offline sm_90 compile (registers, spills, shared memory) and the first H200
    # sweep (docs/kernels.md): with D = 128 a 128-row tile needs 8 warps (4 warps spill hundreds of
    # bytes); 3-4 stages beat 2 by ~25 %; 128-key steps only paid while the index latency was exposed.
    tile_m = _GPU_TILE_M
    # Packing heads of a group (one K/V load for several heads) needs per-group masks.
    packs = [min(_pow2_factor(heads_per_mask), max(1, tile_m // mask_block))]
    full_group = heads_per_mask if heads_per_mask & (heads_per_mask - 1) == 0 else 1
    if 1 < full_group <= tile_m // 16 and full_group not in packs:
        packs.append(full_group)  # "one program serves the whole group", rows = tile_m / group
    bn = min(64, mask_block)
    configs: list[KernelConfig] = []
    if tile_m // packs[0] > mask_block:
        # No head packing possible, so a 128-row tile would be a union tile (U mask rows, merged
        # lists): it computes every block either row keeps. Measured on the H200 (docs/kernels.md):
        # union tiles win by ~5 % at 30-100 % density, 64-row tiles (two programs per SM) win at
        # <= 10 % and by 1.5x on random masks, so the untuned default is the 64-row tile. Below
        # 64-token mask blocks that is a union of 64 / MB rows (at MB 32: 3.1 ms vs 3.8 for 128-row
        # and 6.7 for 32-row tiles, structured; 5.4 vs 9.8 and 6.8, random; 32k, 10 %); one-row
        # tiles, also with key steps of 2 mask blocks, stay candidates.
        configs.append(KernelConfig(max(mask_block, 64), bn, 1, 4, 3))
        if mask_block < 64:
            configs.append(KernelConfig(mask_block, bn, 1, 4, 3))
            configs.append(KernelConfig(mask_block, 2 * mask_block, 1, 4, 3))
    # D <= 64: 4 warps per 128-row tile fit without spills and won on the H200 (1.27 vs 1.60 ms).
    warps = 4 if head_dim <= 64 else 8
    for i, pack in enumerate(packs):
        configs.append(KernelConfig(tile_m, bn, pack, warps, 3))
        if i == 0:
            configs.append(KernelConfig(tile_m, bn, pack, 8, 4))
            if head_dim <= 64:
                configs.append(KernelConfig(tile_m, bn, pack, 8, 3))
    if hopper_ws:
        from . import sparse_fwd_ws

        # 4 + 4 math warps (plus the loader warp); measured against the Triton tiles by the tuner on every mask kind;
        # per-query-head masks at 64-token blocks: two heads a program, a ring each (64-key steps), or two query
        # blocks of one head and the union of their lists in one ring, two of its blocks a 128-key step (a block of
        # the other row only computed and masked off; its 64-key steps were never faster than the head pair's:
        # docs/experiments/kernel-speed/session22);
        # per-group masks at 64-token blocks with 64- and 128-key steps (one or two kept blocks a step), at 128-token
        # blocks (per group or per query head) with 128-key steps
        if heads_per_mask == 1 and mask_block == 64:
            configs.append(KernelConfig(128, 64, 1, 4, sparse_fwd_ws.STAGES_HEADS, hopper_ws=True))
            configs.append(KernelConfig(128, 128, 1, 4, sparse_fwd_ws.STAGES_PAIR, hopper_ws=True, union=True))
        else:
            for mb, block_n in sparse_fwd_ws.STEPS:
                if mb == mask_block:
                    configs.append(
                        KernelConfig(128, block_n, heads_per_mask, 4, sparse_fwd_ws.stages(block_n), hopper_ws=True)
                    )
    return configs


def dkdv_configs(mask_block: int, head_dim: int) -> list[KernelConfig]:
    """Candidates for the backward's dK/dV pass; the first one is the untuned default.

    Here ``block_m`` is the number of *keys* a program owns (it divides the mask block, so a
    program walks one transposed list) and ``block_n`` the query rows per inner step (it divides
    the mask block too); ``pack`` is 1 (the program loops over the GQA group's query heads).
    Each tile comes twice: split (``atomic_dq=False``, the separate dQ pass runs after:
    deterministic) and atomic (dQ accumulated in this pass), plus one 8-warp atomic tile; the split
    ones come first, so the untuned default is deterministic. The tuner times a candidate with the
    dQ work it implies (the tuned dQ pass, or the atomic accumulator's zeroing and conversion), so
    it picks split or atomic per shape and mask kind.
    """
    if interpreting():
        return [KernelConfig(min(mask_block, _INTERP_TILE_M), min(mask_block, 16), 1, 4, 1)]
    keys = min(mask_block, 64)
    rows = min(mask_block, 64)
    # dK and dV accumulators are keys x D fp32 each: 64 keys x D 128 fit 4 warps; 128 keys need 8.
    split = [KernelConfig(keys, rows, 1, 4, 3), KernelConfig(keys, min(rows, 32), 1, 4, 3)]
    if mask_block >= 128:
        split.append(KernelConfig(128, 32, 1, 8, 3))
        split.append(KernelConfig(128, 64, 1, 8, 2))
    else:
        split.append(KernelConfig(keys, rows, 1, 8, 3))
    atomic = [dataclasses.replace(c, atomic_dq=True) for c in split]
    # The atomic pass also holds a rows x D fp32 dQ tile: offline sm_90 compile (bf16, D 128), 64 keys
    # x 32 rows with 4 warps spill 80 B (split: 8 B); with 8 warps 224 registers and no spill.
    atomic.append(KernelConfig(keys, min(rows, 32), 1, 8, 3, atomic_dq=True))
    return list(dict.fromkeys(split + atomic))  # at 32-token blocks some tiles coincide


def dq_configs(mask_block: int, heads_per_mask: int, head_dim: int) -> list[KernelConfig]:
    """Candidates for the backward's dQ pass (same meaning as :func:`sparse_configs`, but the rows
    of a program always lie inside one mask row: ``block_m / pack`` divides the mask block, and
    ``block_n`` divides it too); the first one is the untuned default."""
    hp = _pow2_factor(heads_per_mask)
    if interpreting():
        pack = min(hp, max(1, _INTERP_TILE_M // mask_block))
        rows = min(mask_block, _INTERP_TILE_M // pack)
        return [KernelConfig(pack * rows, min(mask_block, _INTERP_BLOCK_N), pack, 4, 1)]
    bn = min(64, mask_block)
    configs = []
    # Per-group masks: heads of the group share a program (one K/V load for all of them).
    for pack in dict.fromkeys((min(hp, max(1, _GPU_TILE_M // mask_block)), min(hp, 4))):
        rows = min(mask_block, _GPU_TILE_M // pack)
        warps = 8 if pack * rows >= 128 and head_dim > 64 else 4
        configs.append(KernelConfig(pack * rows, bn, pack, warps, 3))
    rows = min(mask_block, 64)
    configs.append(KernelConfig(rows, bn, 1, 4, 3))
    return list(dict.fromkeys(configs))


def block_scores_configs(mask_block: int, head_dim: int) -> list[KernelConfig]:
    """Candidates for the dense forward with block scores; first = untuned default. Key steps are
    ``min(MB, 64)`` keys (128-key steps spill at D = 128); the row maxima of a mask block's steps
    are max-combined."""
    bn = min(mask_block, 64)
    if interpreting():
        return [KernelConfig(max(mask_block, _INTERP_TILE_M), min(mask_block, _INTERP_BLOCK_N), 1, 4, 1)]
    tile_m = max(_GPU_TILE_M, mask_block)
    return [KernelConfig(tile_m, bn, 1, 8, 3), KernelConfig(tile_m, bn, 1, 8, 4), KernelConfig(tile_m, bn, 1, 8, 2)]


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small number under the interpreter)."""
    if interpreting() or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


# Bucket edges of a mask's kept fraction of the causal block triangle, and of the mean Jaccard
# overlap of consecutive rows' lists (near 1: rows share their blocks, so union tiles waste little;
# near 0: scattered masks, where one-row tiles win).
DENSITY_BUCKETS = (0.03, 0.07, 0.15, 0.3, 0.6)
OVERLAP_BUCKETS = (0.25, 0.5, 0.75)


def memo_mask_key(
    memo: dict | None, source: tuple | None, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor
) -> tuple:
    """:func:`mask_key`, kept in ``memo`` (:attr:`seerattn.BlockMask.memo`) when one is given, so that a
    mask measured on its device is read once, not on every call with it."""
    if memo is None:
        return mask_key(source, kv_num_blocks, kv_indices)
    if "tuning_key" not in memo:
        memo["tuning_key"] = mask_key(source, kv_num_blocks, kv_indices)
    return memo["tuning_key"]


def mask_key(source: tuple | None, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> tuple:
    """What, besides the shape, decides a block-sparse kernel's best tile for a mask.

    A mask built by a policy (``source = ("policy", kind, value, allocation)``, see
    :attr:`seerattn.BlockMask.source`) is keyed by the policy: ``density`` by the bucket of its
    value, the other kinds by their value; nothing is read from the device. Any other mask is
    measured on its device: density bucket and overlap bucket (one small reduction, and one host
    sync to read it). kv_num_blocks: int32 [B, H, NQ]; kv_indices: int32 [B, H, NQ, NK].
    """
    if source is not None and source[0] == "policy":
        _, kind, value, allocation = source
        if kind == "density":
            return ("policy", kind, bisect.bisect_right(DENSITY_BUCKETS, value), allocation)
        return ("policy", kind, value if kind != "dense" else 1.0)
    b, h, nq, nk = kv_indices.shape
    valid = torch.arange(nk, device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
    dense = torch.zeros(b, h, nq, nk + 1, dtype=torch.bool, device=kv_indices.device)
    dense.scatter_(-1, torch.where(valid, kv_indices.long(), nk), True)
    dense = dense[..., :nk].tril()  # blocks above the diagonal are never computed
    density = dense.sum(dtype=torch.float64) / (b * h * nq * (nq + 1) / 2)
    if nq > 1:
        inter = (dense[:, :, 1:] & dense[:, :, :-1]).sum(-1, dtype=torch.float64)
        union = (dense[:, :, 1:] | dense[:, :, :-1]).sum(-1, dtype=torch.float64).clamp(min=1)
        overlap = (inter / union).mean()
    else:
        overlap = torch.ones((), dtype=torch.float64, device=density.device)
    d, o = torch.stack([density, overlap]).tolist()
    return ("measured", bisect.bisect_right(DENSITY_BUCKETS, d), bisect.bisect_right(OVERLAP_BUCKETS, o))


def _bench(launch: Callable[[KernelConfig], object], config: KernelConfig) -> float:
    """Median ms of ``launch(config)`` (the tuner's timer; tests replace it with fake timings)."""
    from triton.testing import do_bench

    return do_bench(lambda: launch(config), warmup=5, rep=25, return_mode="median")


_TUNED: dict[tuple, KernelConfig] = {}
_TIMINGS: dict[tuple, dict[str, float]] = {}  # each tuned key's candidates' times (ms), for tuning_log(timings=True)


def pick_config(
    key: tuple,
    candidates: list[KernelConfig],
    launch: Callable[[KernelConfig], object],
    extra_key: Callable[[], tuple] | None = None,
) -> KernelConfig:
    """The fastest candidate for ``key`` (timed once per key and cached), or the first candidate
    when there is only one or tuning is off. ``launch(config)`` must run the complete operation.
    ``extra_key()`` (e.g. :func:`mask_key`) is appended to the key; it is called only when tuning
    is on and there is a choice to make."""
    if len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    if extra_key is not None:
        key = (*key, extra_key())
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    from triton.runtime.errors import OutOfResources

    timings = []
    for cfg in candidates:
        try:
            ms = _bench(launch, cfg)
        except OutOfResources as err:  # a config that does not fit this GPU is not a candidate
            logger.info("config %s skipped for %s: %s", cfg.short(), key, err)
            ms = math.inf
        timings.append(ms)
    best = min(range(len(candidates)), key=timings.__getitem__)
    if math.isinf(timings[best]):
        raise RuntimeError(f"no kernel configuration fits this GPU for {key}: {candidates}")
    _TUNED[key] = candidates[best]
    _TIMINGS[key] = {c.short(): t for c, t in zip(candidates, timings, strict=True)}
    logger.info(
        "tuned %s: %s",
        key,
        ", ".join(f"{c.short()}={t:.3f}ms" for c, t in zip(candidates, timings, strict=True)),
    )
    return candidates[best]


def tuning_log(timings: bool = False) -> dict[str, str] | dict[str, dict]:
    """The configs chosen so far (for benchmark JSON): key -> the pick, or with ``timings`` key -> {"pick": the pick,
    "ms": each candidate's time on the mask the key was tuned on} (how close the race was)."""
    if not timings:
        return {repr(k): v.short() for k, v in _TUNED.items()}
    return {repr(k): {"pick": v.short(), "ms": _TIMINGS.get(k)} for k, v in _TUNED.items()}
