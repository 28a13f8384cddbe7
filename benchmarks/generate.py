"""End-to-end ``model.generate`` throughput with sparse decode (issue 17): dense vs sparse decode vs both.

    python3 -m benchmarks.generate --json runs/generate.json                 # H200: 8B shape, bf16, B 16, 32k + 1k
    python3 -m benchmarks.generate --layers 16 --json runs/generate-16l.json # if 32 layers do not fit (see below)
    python3 -m benchmarks.generate --smoke --json /tmp/generate.json         # tiny Llama on the CPU: it runs

A Llama-3.1-8B-shaped model with random weights (``benchmarks.shapes``; speed only, untrained gates at
their initialisation: the selection's cost, not its quality) generates ``--new`` tokens after a prompt
of ``--prompt`` random tokens for ``--batch`` sequences, greedy, ``min_new_tokens`` = ``max_new_tokens``
(no early stop), with a ``StaticCache`` (``--cache dynamic``: transformers' DynamicCache). Configurations,
measured in one run:

- ``dense``: prefill and decode steps through transformers' SDPA (``mode="dense"``, decode off);
- ``decode``: dense prefill, sparse decode (decode gate + ``DecodePolicy("budget", --budget)`` + the
  Triton decode kernel);
- ``both``: sparse prefill (prefill gate + ``SparsityPolicy("density", --density)``) and sparse decode;
- ``decode-unfused`` (only when named in ``--configs``): ``decode`` with ``SeerConfig.decode_select="unfused"``
  (the gate logits and the budget selection as separate torch ops), against ``decode``'s automatic choice
  (the fused Triton selection on CUDA); each row records the selection that ran (``decode_select``);
- ``decode-shift`` (when named): ``decode`` with ``DecodePolicy.half_shift`` (the half-block-shifted windows'
  keys kept and ranked too; the selection runs unfused);
- ``decode-bound`` (when named): ``decode`` with ``DecodePolicy.bound_slots=2`` (two of the budget's slots to the
  blocks of highest Quest bound: the key bounds' update and the bound kernel in every step);
- ``dense-graph``, ``decode-graph``, ``both-graph``, ``decode-shift-graph``, ``decode-bound-graph`` (when named): the
  same with ``SeerState.cuda_graphs`` on, the decode steps replayed from a CUDA graph (``seerattn.hf.graphs``;
  StaticCache on CUDA only). Each row's speed-ups are against the dense row of the same kind (``dense`` for eager
  rows, ``dense-graph`` for graph rows) when that row ran.

Per configuration, from one timed ``generate`` of ``--new`` tokens (the median of ``--rounds`` of them, the rounds
in alternating order; session 15 saw the configuration run second gain 9-53 % in a single round, so a difference
of a few percent needs rounds): ``total_s``, ``prefill_s`` (until the
first token: a stopping criterion that never stops reads the clock, after a device sync, when generate
first calls it; a separate one-token generate measured it before, and the difference of two calls
mixed their variations into the decode rate), ``decode_tokens_per_s`` = B x (new - 1) / (total - prefill), the
speedups over ``dense`` in the same run, the realised decode density, and the peak GPU memory. Each
configuration runs once untimed first (kernel tuning, allocator warm-up).

Memory: the prompt's forward holds the MLP temporaries of B x T tokens (about 4 x B x T x 14336 bf16
values: 60 GB at B 16, 32k) next to the KV cache (32 layers x 2 x B x 8 x (T + new) x 128 bf16: 70 GB
at B 16, 33k) and the weights (16 GB). If that does not fit on the GPU, ``--prefill-chunk 4096`` runs the
prompt in forwards of 4096 tokens (transformers' ``prefill_chunk_size``; the decode-gate key cache grows chunk
by chunk, dense prefills only: not with ``both``), which cuts the temporaries by T / 4096; or ``--layers 16``
halves the cache and the weights; the per-layer attention costs, the ratios, do not change.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from benchmarks.shapes import LLAMA_31_8B, SMOKE_SHAPE, build_llama
from seerattn.block_mask import SparsityPolicy
from seerattn.decode_policy import DecodePolicy, resolve_decode_select
from seerattn.gate import DecodeGateConfig, GateConfig
from seerattn.hf import DecodeConfig, SeerConfig, apply_seer_attention
from seerattn.record import write_record

logger = logging.getLogger("benchmarks.generate")

CONFIGS = (
    "dense",
    "decode",
    "both",
    "decode-unfused",
    "decode-shift",
    "decode-bound",
    "dense-graph",
    "decode-graph",
    "both-graph",
    "decode-shift-graph",
    "decode-bound-graph",
)
DEFAULT_CONFIGS = ("dense", "decode", "both")
SMOKE = dict(batch=2, prompt=96, new=8, budget=32, block=16, layers=2)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _FirstToken(StoppingCriteria):
    """Never stops; records when ``generate`` first asks (the prompt's forward and the first token done)."""

    def __init__(self, device: str):
        self.device, self.at = device, None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.at is None:
            _sync(self.device)  # once per generate: the step's work is done when the clock is read
            self.at = time.perf_counter()
            logger.info("first token (prefill) done")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, ids, new: int, cache: str, device: str, chunk: int | None = None) -> tuple[float, float]:
    """Seconds of one greedy ``generate`` of ``new`` tokens, and of its first token (the prefill) inside it;
    ``chunk``: transformers' ``prefill_chunk_size`` (the prompt's forwards of at most that many tokens)."""
    first = _FirstToken(device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if chunk is not None:
        kw["prefill_chunk_size"] = chunk
    kw["stopping_criteria"] = StoppingCriteriaList([first])
    if cache == "static":
        kw["cache_implementation"] = "static"
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    _sync(device)
    end = time.perf_counter()
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {new}")
    return end - t0, first.at - t0


def configure(state, name: str) -> None:
    """``dense`` / ``decode`` / ``both`` / ``decode-unfused`` / ``decode-shift`` / ``decode-bound``, each ``-graph``
    variant (module docstring)."""
    base = name.removesuffix("-graph")
    state.set(
        mode="sparse" if base == "both" else "dense", decode_select="unfused" if base == "decode-unfused" else None
    )
    budget = state.config.decode.policy.value
    policy = DecodePolicy(
        "budget", budget, half_shift=base == "decode-shift", bound_slots=2 if base == "decode-bound" else 0
    )
    state.set_decode(enabled=base != "dense", policy=policy)
    state.cuda_graphs = name.endswith("-graph")


def _warm_up(model, ids, args, device: str, name: str) -> int:
    """The untimed warm-up generate of configuration ``name`` (compile, tuning); returns the warm-up's prompt length."""
    t0 = time.perf_counter()
    warm = ids[:, : args.warmup_prompt] if args.warmup_prompt else ids
    _generate(model, warm, min(args.new, 4), args.cache, device, args.prefill_chunk)
    if name.removesuffix("-graph") == "both" and warm.shape[1] < ids.shape[1]:
        # the block-sparse kernel is tuned per prompt length: one untimed forward of the whole prompt (last
        # position's logits only), or the tuning would run inside the timed prefill
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
    # progress on stderr as it happens: a run killed at a time limit still says how far it got
    logger.info(
        "%s: warm-up generate (%d-token prompt, %d new) %.1f s",
        name, warm.shape[1], min(args.new, 4), time.perf_counter() - t0,
    )  # fmt: skip
    return warm.shape[1]


def run(model, state, ids, args, device: str) -> list[dict]:
    """One row per configuration. With ``--rounds R`` every configuration is timed R times, the rounds visiting
    them in alternating order (forward, backward, forward, ...: a configuration is not always the one that runs
    after the same other), each warmed up once at its first visit; a row's times are the medians of its rounds,
    which it lists (``rounds``) with their position in the round's order."""
    names = args.configs.split(",")
    rows: dict[str, dict] = {}
    for r in range(args.rounds):
        for position, name in enumerate(names if r % 2 == 0 else names[::-1]):
            configure(state, name)
            base = name.removesuffix("-graph")
            warmup_prompt = _warm_up(model, ids, args, device, name) if name not in rows else None
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            state.reset()
            total, prefill = _generate(model, ids, args.new, args.cache, device, args.prefill_chunk)
            rate = ids.shape[0] * (args.new - 1) / max(total - prefill, 1e-9)
            row = rows.setdefault(
                name,
                {
                    "config": name,
                    "cuda_graphs": state.cuda_graphs,
                    "batch": ids.shape[0],
                    "prompt": ids.shape[1],
                    "new": args.new,
                    "budget": args.budget if base != "dense" else None,
                    "prefill_density": args.density if base == "both" else 1.0,
                    "prefill_chunk": args.prefill_chunk,
                    "warmup_prompt": warmup_prompt,
                    "decode_density": state.mean_density() if base != "dense" else 1.0,
                    "decode_select": None
                    if base == "dense"
                    else resolve_decode_select(state.config.decode_select, state.config.decode.policy, device),
                    "rounds": [],
                },
            )
            measured = {"round": r, "position": position, "prefill_s": prefill, "total_s": total}
            measured["decode_tokens_per_s"] = rate
            if device == "cuda":
                measured["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.empty_cache()
            row["rounds"].append(measured)
            print(
                f"{name:<12} round {r} prefill {prefill:8.3f} s  total {total:8.3f} s  decode {rate:9.1f} tok/s"
                f"  decode density {row['decode_density']:.3f}",
                flush=True,
            )
    for row in rows.values():
        for key in ("prefill_s", "total_s", "decode_tokens_per_s"):
            row[key] = statistics.median(m[key] for m in row["rounds"])
        rates = [m["decode_tokens_per_s"] for m in row["rounds"]]
        row["decode_tokens_per_s_range"] = [min(rates), max(rates)]
        if device == "cuda":
            row["peak_memory_gb"] = max(m["peak_memory_gb"] for m in row["rounds"])
    out = list(rows.values())
    for r in out:  # against the dense row of the same kind (eager or replayed steps)
        dense = rows.get("dense-graph" if r["cuda_graphs"] else "dense")
        if dense is not None:
            r["decode_speedup_vs_dense"] = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
            r["total_speedup_vs_dense"] = dense["total_s"] / r["total_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32768, help="prompt tokens")
    p.add_argument("--new", type=int, default=1024, help="new tokens per sequence")
    p.add_argument("--budget", type=int, default=4096, help="decode token budget")
    p.add_argument("--density", type=float, default=0.1, help="prefill block density of 'both'")
    p.add_argument("--block-size", type=int, default=64, help="tokens per block (prefill and decode gates)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B-shaped model")
    p.add_argument("--cache", choices=("static", "dynamic"), default="static")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list of {CONFIGS}")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        help="transformers' prefill_chunk_size: the prompt in forwards of at most this many tokens (the MLP "
        "temporaries shrink with it); dense prefills only, so not with 'both'",
    )
    p.add_argument(
        "--warmup-prompt",
        type=int,
        help="the untimed warm-up generate of each configuration reads only this many prompt tokens (default: the "
        "whole prompt). Kernels compile either way; a shorter warm-up saves a whole prefill per configuration at "
        "long prompts, and the timed run then tunes what depends on the cache size in its first steps ('both' "
        "still runs one untimed forward of the whole prompt: the sparse prefill's kernel is tuned per length). "
        "Keep it above --budget so that the warm-up selects blocks",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timed generates per configuration, the rounds in alternating order (a row reports the medians and "
        "lists every round): one timed run per configuration also measures which ran first (default %(default)s)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny Llama on the CPU (checks that every config runs)")
    p.add_argument("--json", help="write the run record here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.warmup_prompt is not None and not 0 < args.warmup_prompt <= args.prompt:
        p.error(f"--warmup-prompt must be in [1, --prompt={args.prompt}], got {args.warmup_prompt}")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; accepted: {CONFIGS}")
    names = args.configs.split(",")
    if args.prefill_chunk is not None and {"both", "both-graph"} & set(names):
        p.error("--prefill-chunk needs a dense prefill: the sparse prefill of 'both' runs the prompt in one forward")
    graphs = [n for n in names if n.endswith("-graph")]
    if graphs and (args.smoke or args.cache != "static"):
        p.error(f"{graphs} replay decode steps from a CUDA graph: a GPU run (not --smoke) with --cache static")
    if args.smoke:
        device, dtype = "cpu", torch.float32
        shape = {**SMOKE_SHAPE, "num_hidden_layers": SMOKE["layers"], "max_position_embeddings": 4096}
        args.batch, args.prompt, args.new, args.budget = SMOKE["batch"], SMOKE["prompt"], SMOKE["new"], SMOKE["budget"]
        args.block_size = SMOKE["block"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.generate needs a CUDA GPU (or --smoke)")
        device, dtype = "cuda", torch.bfloat16
        shape = {**LLAMA_31_8B, "num_hidden_layers": args.layers}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    model = build_llama(shape, device, dtype).eval()
    decode = DecodeConfig(DecodeGateConfig(block_size=args.block_size), DecodePolicy("budget", args.budget))
    config = SeerConfig(
        gate=GateConfig(block_size=args.block_size),
        policy=SparsityPolicy("density", args.density),
        mode="dense",
        decode=decode,
        mask_heads="kv",
    )
    state = apply_seer_attention(model, config)
    model.to(dtype)  # the gates too
    ids = torch.randint(1, shape["vocab_size"], (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    logger.info("model of %d layers with gates built in %.1f s", shape["num_hidden_layers"], time.perf_counter() - t0)
    rows = run(model, state, ids.to(device), args, device)
    if args.json:
        extra = {"gpu": torch.cuda.get_device_name()} if device == "cuda" else {}
        write_record(args.json, "bench-generate", rows, {**vars(args), "device": device}, shape, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
