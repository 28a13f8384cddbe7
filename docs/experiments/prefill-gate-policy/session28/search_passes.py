"""Session 28: passes a row of the density selection's 2-bit threshold search, from the key's top bit (the kernel
before) and from the highest bit where the row's possible thresholds differ (the kernel since), simulated in PyTorch
on the CPU; asserts that both keep the same blocks.

    PYTHONPATH=src:. python3 docs/experiments/prefill-gate-policy/session28/search_passes.py [--testbed]

Synthetic rows (NQ 512 and 2048, density 0.1 and 0.05): iid N(0, 3^2) and fresh gates' narrow rows (1.387 + 0.03
N(0, 1), session 27's measurement of the benchmark's model). ``--testbed``: the gate logits of the testbed model with
its trained gates (``testbed/gates``, ``testbed/gates-b32``) on the first 8192 tokens of three test books of the corpus
(``--books``, default ``../shared/data/books``), density 0.1, per layer.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import torch

from seerattn.block_mask import density_row_budget

INF_KEY = 0xFF800000  # the order key of +inf (fp32)


def order_key(x: torch.Tensor) -> torch.Tensor:
    """The selection kernel's unsigned fp32 order key, as int64."""
    x = torch.where(x == 0, torch.zeros_like(x), x)
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(b >= 0x80000000, b ^ 0xFFFFFFFF, b | 0x80000000)


def search(key, k, theta, n_ge, start):
    """The kernel's search on keys [H, NQ, NQ] (0 off the causal part) from ``theta`` (bits above ``start + 1``
    settled; a row runs no pass above its ``start``); returns (passes [H, NQ], theta)."""
    h, nq, _ = key.shape
    passes = torch.zeros(h, nq, dtype=torch.int64)
    done = n_ge == k
    for bit in range(30, -1, -2):
        live = ~done & (start >= bit)
        passes += live[..., 0]
        c1, c2 = theta | (1 << bit), theta | (1 << (bit + 1))
        c3 = c1 | c2
        n1, n2, n3 = ((key >= c).sum(-1, keepdim=True) for c in (c1, c2, c3))
        new_t = torch.where(n3 >= k, c3, torch.where(n2 >= k, c2, torch.where(n1 >= k, c1, theta)))
        new_n = torch.where(n3 >= k, n3, torch.where(n2 >= k, n2, torch.where(n1 >= k, n1, n_ge)))
        theta, n_ge = torch.where(live, new_t, theta), torch.where(live, new_n, n_ge)
        done = n_ge == k
    return passes, theta


def passes(logits: torch.Tensor, density: float) -> tuple[float, float]:
    """Mean passes a row (sink and diagonal forced) from the top and from the row's common bits, for logits
    [H, NQ, NQ] (the causal part read)."""
    h, nq, _ = logits.shape
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    forced = torch.zeros(nq, nq, dtype=torch.bool)
    forced[:, 0] = True
    forced = (forced | torch.eye(nq, dtype=torch.bool)) & causal
    key = torch.where(causal, order_key(torch.where(forced, float("inf"), logits.float())), 0)
    i = torch.arange(nq)
    k = torch.minimum(density_row_budget(nq, density, "cpu", "row").to(torch.int64), i + 1).expand(h, nq)[..., None]
    n_ge = (i + 1).expand(h, nq)[..., None].clone()
    p0, t0 = search(key, k, torch.zeros(h, nq, 1, dtype=torch.int64), n_ge, torch.full((h, nq, 1), 30))
    free = causal & ~forced
    n_forced = forced.sum(-1)[None, :, None]
    top = torch.where(free, key, 0).amax(-1, keepdim=True)
    low = torch.where(free, key, 0xFFFFFFFF).amin(-1, keepdim=True)
    some_free = k > n_forced
    lo = torch.where(some_free, torch.minimum(low, torch.where(n_forced > 0, INF_KEY, 0xFFFFFFFF)), INF_KEY)
    hi = torch.where(some_free, top, top.clamp(min=INF_KEY))
    diff = lo ^ hi
    high_bit = torch.where(diff > 0, torch.floor(torch.log2((diff & ~(diff >> 1)).double().clamp(min=1))).long(), -1)
    start = torch.where(high_bit >= 0, high_bit & ~1, -1)
    theta = torch.where(start >= 0, (lo >> (start + 1) >> 1) << 1 << (start + 1), lo)
    p1, t1 = search(key, k, theta, n_ge, start)
    assert torch.equal((key >= t0) & causal, (key >= t1) & causal), "the two starts keep different blocks"
    return p0.float().mean().item(), p1.float().mean().item()


def testbed_logits(gates: str, books: Path):
    """(book, layer, logits [Hq, NQ, NQ]) of the testbed model with ``gates`` on three test books' first 8192 tokens."""
    from transformers import AutoTokenizer

    from seerattn.hf import get_seer_state
    from seerattn.hf.adapter import from_pretrained
    from seerattn.hf.integration import gate_logits

    tok = AutoTokenizer.from_pretrained("testbed/model")
    model = from_pretrained("testbed/model", gates, mode="sparse").eval()
    state = get_seer_state(model)
    hq, hkv, d = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    for book in ("00011", "00062", "00090"):
        ids = tok(gzip.open(books / f"{book}.txt.gz", "rt").read(), return_tensors="pt").input_ids[:, :8192]
        state.capture = True
        with torch.no_grad():
            model(ids, use_cache=False)
        state.capture = False
        caps = dict(state.captures)
        state.captures.clear()
        t = ids.shape[1]
        for layer in sorted(caps):
            q = caps[layer][0].reshape(1, t, hq, d).transpose(1, 2)
            k = caps[layer][1].reshape(1, t, hkv, d).transpose(1, 2)
            yield book, layer, gate_logits(model, layer, q, k).float()[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--testbed", action="store_true", help="also the testbed's trained gates on three test books")
    p.add_argument("--books", type=Path, default=Path("../shared/data/books"))
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    for nq, heads in ((512, 8), (2048, 2)):
        noise = torch.randn(heads, nq, nq, generator=g)
        for name, x in (("N(0, 3^2)", 3 * noise), ("narrow 1.387 + 0.03 N(0, 1)", 1.387 + 0.03 * noise)):
            for density in (0.1, 0.05):
                print(f"NQ {nq} {name} density {density}: passes %.2f -> %.2f" % passes(x, density), flush=True)
    if args.testbed:
        for gates in ("testbed/gates", "testbed/gates-b32"):
            for book, layer, logits in testbed_logits(gates, args.books):
                print(f"{gates} book {book} layer {layer}: passes %.2f -> %.2f" % passes(logits, 0.1), flush=True)


if __name__ == "__main__":
    main()
