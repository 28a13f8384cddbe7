"""The fine-tuning LM loss of one sequence at Llama-3's vocabulary: transformers' full-logit loss vs the chunked one.

    python3 -m benchmarks.lm_loss --seqlens 32768,65536 --chunks 0,2048,4096,8192 --json runs/lm_loss.json
    python3 -m benchmarks.lm_loss --smoke    # tiny shapes on the CPU: checks that it runs

What ``seerattn finetune`` computes after the decoder stack, as it runs on CUDA: the final hidden states
``[1, T, 4096]`` fp32 (the residual stream with fp32 master weights) and the LM head's weight ``[128256, 4096]``
fp32, both requiring grad, under bf16 autocast; ``--chunks 0`` is transformers' ``ForCausalLMLoss`` on
``F.linear(hidden, weight)`` (``loss_chunk_tokens: null``), ``N`` the chunked loss of ``seerattn.train.lm_loss``
(``loss_chunk_tokens: N``). Per setting: forward + backward time (median of ``--reps`` after ``--warmup``, CUDA
events), tokens/s and ``peak_gib``: the peak allocated memory during one forward + backward above what was
allocated before it (inputs and weight held outside; the gradients it leaves, 2.5 GiB at 32k, included), with
``oom`` when the setting does not fit. Against the first setting that ran at the same T, each chunked row also
reports the loss's relative difference and the largest difference of each gradient relative to its largest element.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.shapes import LLAMA_31_8B
from seerattn.record import write_record
from seerattn.train.lm_loss import causal_lm_loss


def loss_step(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, amp: bool):
    """One forward + backward; returns the loss (detached). ``chunk`` 0: transformers' full-logit loss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden.grad = weight.grad = None
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=amp):
        if chunk:
            loss = causal_lm_loss(hidden, weight, labels, chunk)
        else:
            loss = ForCausalLMLoss(F.linear(hidden, weight), labels, weight.shape[0])
    loss.backward()
    return loss.detach()


def measure(hidden, weight, labels, chunk: int, amp: bool, warmup: int, reps: int) -> dict:
    """Median ms and peak GiB above the starting allocation of ``loss_step`` (peak None on the CPU)."""
    cuda = hidden.device.type == "cuda"
    for _ in range(warmup):
        loss_step(hidden, weight, labels, chunk, amp)
    times, peak = [], None
    for _ in range(reps):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = loss_step(hidden, weight, labels, chunk, amp)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        else:
            t0 = time.perf_counter()
            loss = loss_step(hidden, weight, labels, chunk, amp)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "peak_gib": peak, "loss": loss, "grads": (hidden.grad, weight.grad)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", help="comma list of sequence lengths (32768,65536; smoke: 300)")
    p.add_argument("--chunks", help="comma list of loss_chunk_tokens, 0 = transformers' loss (0,2048,4096,8192)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, fp32, one rep (checks that it runs)")
    p.add_argument("--json", help="write the run record here")
    args = p.parse_args(argv)
    if args.smoke:
        device, vocab, hidden_size, amp = "cpu", 512, 64, False
        seqlens, chunks, args.warmup, args.reps = args.seqlens or "300", args.chunks or "0,64,100", 0, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.lm_loss needs a CUDA GPU (or --smoke)")
        device, vocab, hidden_size, amp = "cuda", LLAMA_31_8B["vocab_size"], LLAMA_31_8B["hidden_size"], True
        seqlens, chunks = args.seqlens or "32768,65536", args.chunks or "0,2048,4096,8192"
    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=g) / hidden_size**0.5).requires_grad_()
    rows = []
    for t in (int(x) for x in seqlens.split(",")):
        hidden = torch.randn(1, t, hidden_size, device=device, generator=g).requires_grad_()
        labels = torch.randint(0, vocab, (1, t), device=device, generator=g)
        first = None
        for chunk in (int(x) for x in chunks.split(",")):
            row = {"seq_len": t, "loss_chunk_tokens": chunk, "method": f"chunked {chunk}" if chunk else "full"}
            try:
                m = measure(hidden, weight, labels, chunk, amp, args.warmup, args.reps)
            except torch.cuda.OutOfMemoryError:
                rows.append({**row, "oom": True})
                print(f"T={t:>6} {row['method']:<14} out of memory", flush=True)
                hidden.grad = weight.grad = None
                torch.cuda.empty_cache()
                continue
            row.update(ms=m["ms"], tokens_per_s=t / m["ms"] * 1e3, peak_gib=m["peak_gib"], oom=False)
            if first is None:
                first = {"method": row["method"], "loss": m["loss"], "grads": tuple(x.clone() for x in m["grads"])}
            else:
                row["vs"] = first["method"]
                row["loss_rel_diff"] = abs((m["loss"] - first["loss"]) / first["loss"]).item()
                row["grad_hidden_rel_diff"] = _rel(m["grads"][0], first["grads"][0])
                row["grad_weight_rel_diff"] = _rel(m["grads"][1], first["grads"][1])
            rows.append(row)
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:6.2f} GiB"
            diffs = (
                ""
                if "vs" not in row
                else (
                    f"  vs {row['vs']}: loss {row['loss_rel_diff']:.1e}, grads {row['grad_hidden_rel_diff']:.1e} / "
                    f"{row['grad_weight_rel_diff']:.1e}"
                )
            )
            print(f"T={t:>6} {row['method']:<14} {row['ms']:9.1f} ms  {peak}{diffs}", flush=True)
        del hidden, labels, first
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        extra = {"gpu": torch.cuda.get_device_name()} if device == "cuda" else {}
        model_info = {"vocab_size": vocab, "hidden_size": hidden_size, "amp": "bf16" if amp else "none"}
        write_record(args.json, "bench-lm-loss", rows, {**vars(args), "device": device}, model_info, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
