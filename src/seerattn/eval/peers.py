"""Training-free peers that estimate block importance from the prompt's own q/k: MInference's
vertical-slash, XAttention and FlexPrefill.

Each estimator returns block scores ``[B, Hq, NB, NB]`` (higher = keep first) that
:mod:`.methods` turns into masks in one of two ways: at the harness's shared ``"density"`` policy
(every method computes the same number of blocks per row) or in the method's own *native* mode,
where a cumulative-mass threshold decides how many blocks each row or head keeps and the density
is whatever that gives (the ``"top_p"`` budget of the registry: the setting's value is XAttention's
threshold tau, FlexPrefill's gamma). Masks are per query head; sink and diagonal are always kept.

Hyper-parameters (the defaults below):

- XAttention (Xu et al. 2025, "XAttention: Block Sparse Attention with Antidiagonal Scoring"):
  stride ``S = 8`` and threshold ``tau = 0.9`` (the paper's RULER / language settings; S = 16 is its
  other RULER stride; README of mit-han-lab/x-attention), block 128 in the paper (here: the harness's
  block). The paper's optional per-head threshold search is not implemented: one threshold for all.
- FlexPrefill (Lai et al. 2025, ICLR, "FlexPrefill: A Context-Aware Sparse Attention Mechanism for
  Efficient Long-Sequence Inference"): ``tau = 0.1`` (square-root Jensen-Shannon divergence, in
  nats, below which a head is query-aware), ``gamma`` 0.9 or 0.95 (0.95 for Llama-3.1 / GLM-4 and
  0.9 for Yi / Qwen2 in the authors' RULER scripts, 0.9 in their README), a minimum budget of 1024
  tokens (the RULER scripts; 512 in the README), block 128.

Shape legend: B batch, Hq/Hkv query/key-value heads, G = Hq / Hkv, T tokens, D head dim,
NB = ceil(T / block), S XAttention's stride, L the last queries FlexPrefill / vertical-slash read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..block_mask import BlockMask, causal_block_mask, num_blocks
from ..hf import MaskRequest

__all__ = [
    "FLEX_GAMMA",
    "FLEX_MIN_BUDGET",
    "FLEX_TAU",
    "XATTN_STRIDE",
    "XATTN_THRESHOLD",
    "FlexPrefillEstimate",
    "cumulative_cover",
    "flexprefill_estimate",
    "flexprefill_native_mask",
    "last_query_lines",
    "vertical_slash_scores",
    "xattention_scores",
]

XATTN_STRIDE = 8
XATTN_THRESHOLD = 0.9
FLEX_TAU = 0.1
FLEX_GAMMA = 0.9
FLEX_MIN_BUDGET = 1024
# fp32 elements of one XAttention chunk of reduced logits (1 GiB); the chunks cover whole query blocks
XATTN_CHUNK_ELEMENTS = 2**28


def _grouped_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, L, E] x k [B, Hkv, N, E] -> fp32 [B, Hq, L, N] (GQA without repeating k: the G query
    heads of a group are stacked along L, so one matmul per group reads k once)."""
    b, hq, rows, e = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.matmul(q.reshape(b, hkv, g * rows, e), k.transpose(-1, -2))  # [B, Hkv, G*L, N]
    return out.view(b, hq, rows, n).float().mul_(scale)


def cumulative_cover(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool like ``x`` [..., N] (non-negative): per last-dim vector, the fewest largest entries whose sum
    reaches ``p`` of the vector's total (an entry is kept while the mass of the entries ranked before it
    is below ``p * total``; ties broken by position)."""
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    before = sorted_x.cumsum(-1) - sorted_x
    keep_sorted = before < p * x.sum(-1, keepdim=True)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


# ------------------------------------------------------------------------------ last-query lines
def last_query_lines(request: MaskRequest, n_last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash attention shares of the last ``n_last`` queries (exact causal softmax).

    ``vertical[j]``: the share of the last queries' attention on key ``j``; ``slash[o]``: the share on
    token offset ``o = i - j``. Each sums to 1 over its last axis.

    Returns:
        (vertical [B, Hq, T], slash [B, Hq, T]) fp32.
    """
    q, k = request.q, request.k
    b, hq, t, _ = q.shape
    n_last = min(n_last, t)
    logits = _grouped_logits(q[:, :, t - n_last :].float(), k.float(), request.scale)  # [B, Hq, L, T]
    rows = torch.arange(t - n_last, t, device=q.device)
    offsets = rows.view(-1, 1) - torch.arange(t, device=q.device).view(1, -1)  # [L, T]: i - j
    probs = logits.masked_fill(offsets < 0, float("-inf")).softmax(-1) / n_last  # shares of the total
    vertical = probs.sum(-2)
    slash = torch.zeros(b * hq, t, device=q.device, dtype=probs.dtype)
    slash.scatter_add_(1, offsets.clamp_min(0).reshape(1, -1).expand(b * hq, -1), probs.reshape(b * hq, -1))
    return vertical, slash.view(b, hq, t)


def _line_blocks(vertical: torch.Tensor, slash: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token shares [B, H, T] -> (V [B, H, NB], S [B, H, NB]): ``V[J] = sum_{j in J} v[j]`` and
    ``S[d] = sum_o s[o] * max(0, 1 - |o - d * bs| / bs)`` (the share of token diagonal ``o`` that falls
    in block diagonal ``d``); both sum to 1."""
    b, h, t = vertical.shape
    bs = block_size
    nb = num_blocks(t, bs)
    vb = F.pad(vertical, (0, nb * bs - t)).view(b, h, nb, bs).sum(-1)
    r = torch.arange(-(bs - 1), bs, device=slash.device, dtype=slash.dtype)
    kernel = (1 - r.abs() / bs).view(1, 1, -1)  # triangle of width 2*bs - 1 centred on offset d * bs
    padded = F.pad(slash.reshape(b * h, 1, t), (bs - 1, nb * bs - t + bs - 1))
    sb = F.conv1d(padded, kernel, stride=bs).view(b, h, nb)
    return vb, sb


def _diagonal_index(nb: int, device) -> torch.Tensor:
    """int64 [NB, NB]: block diagonal ``I - J`` (0 above the diagonal; callers mask those)."""
    idx = torch.arange(nb, device=device)
    return (idx.view(nb, 1) - idx.view(1, nb)).clamp_min(0)


def _vertical_slash_blocks(vb: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(V, S) [B, H, NB] -> scores [B, H, NB, NB] = max(V[J], S[I - J]), zero above the diagonal."""
    b, h, nb = vb.shape
    scores = torch.maximum(vb.unsqueeze(-2).expand(b, h, nb, nb), sb[..., _diagonal_index(nb, vb.device)])
    return scores.masked_fill(~causal_block_mask(nb, device=vb.device), 0.0)


def vertical_slash_scores(request: MaskRequest, last_q: int | None = None) -> torch.Tensor:
    """MInference-style block scores estimated from the last queries' attention.

    The causal softmax of the last ``last_q`` queries (default: one block) over all keys gives, per
    key token ``j``, a *vertical* mass ``v[j]`` (column sum) and, per token offset ``o = i - j``, a
    *slash* mass ``s[o]`` (diagonal sum), as shares of the total (:func:`last_query_lines`). Both are
    carried to blocks: ``V[J] = sum_{j in J} v[j]`` and ``S[d] = sum_o s[o] * max(0, 1 - |o - d * bs| / bs)``
    (the share of a token diagonal that falls in block diagonal ``d``; both sum to 1). Block ``(I, J)``
    scores ``max(V[J], S[I - J])``: kept if its column or its diagonal carries much of the attention.
    From the last queries alone each line also casts a ghost of the other kind (a slash reads as a
    vertical on the key blocks it hits there, and a vertical as slash mass), as in MInference.

    Returns:
        scores [B, Hq, NB, NB] fp32, zero above the diagonal.
    """
    vertical, slash = last_query_lines(request, request.block_size if last_q is None else last_q)
    return _vertical_slash_blocks(*_line_blocks(vertical, slash, request.block_size))


# ------------------------------------------------------------------------------------ XAttention
def xattention_scores(
    request: MaskRequest, stride: int = XATTN_STRIDE, chunk_elements: int = XATTN_CHUNK_ELEMENTS
) -> torch.Tensor:
    """XAttention's block importance: softmax of strided antidiagonal sums, summed per block.

    q and k are zero-padded to ``NB * bs`` tokens and cut into groups of ``S`` tokens. Reduced
    query ``i'`` and reduced key ``j'`` get the logit ``R[i', j'] = scale / S * sum_{m < S}
    q[i'S + S-1-m] . k[j'S + m]``: the mean of the ``S`` logits on the antidiagonal of their ``S x S``
    tile, obtained in one matmul by concatenating each group's queries in reverse order and its keys
    in order (``[T/S, S*D]`` each). Every tile's antidiagonal crosses each row and each column once,
    so a vertical or a slash line inside a block adds to its score. ``R`` is masked causally at the
    reduced level (``j' <= i'``, and reduced keys that start at or after ``T``), softmaxed per reduced
    row, and summed over the ``(bs/S)^2`` cells of each block (reduced rows that start at or after ``T``
    are left out); each block row is then divided by its total (the share of the row's attention).

    Work is ``O(T^2 D / S)`` per head; memory is one chunk of reduced rows at a time (at most
    ``chunk_elements`` fp32 logits, whole query blocks, keys only up to the chunk's causal end), never a
    ``[T, T]`` map. The matmul runs in q's dtype (bf16 on the GPU), the softmax in fp32.

    Returns:
        scores [B, Hq, NB, NB] fp32, rows summing to 1, zero above the diagonal.
    """
    q, k = request.q, request.k
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    bs = request.block_size
    if not isinstance(stride, int) or stride < 1 or bs % stride:
        raise ValueError(f"XAttention's stride must be a positive divisor of block_size={bs}, got {stride!r}")
    nb = num_blocks(t, bs)
    per_block = bs // stride  # reduced rows (and columns) per block
    n = nb * per_block
    pad = nb * bs - t
    # antidiagonal: within each group of S queries the order is reversed, the keys keep theirs
    qr = F.pad(q, (0, 0, 0, pad)).reshape(b, hq, n, stride, d).flip(3).reshape(b, hq, n, stride * d)
    kr = F.pad(k, (0, 0, 0, pad)).reshape(b, hkv, n, stride * d)
    starts = torch.arange(n, device=q.device) * stride  # first token of each reduced row / column
    rows_per_chunk = max(per_block, chunk_elements // max(b * hq * n, 1) // per_block * per_block)
    out = torch.zeros(b, hq, nb, nb, device=q.device, dtype=torch.float32)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n)  # a multiple of per_block: chunks hold whole query blocks
        logits = _grouped_logits(qr[:, :, r0:r1], kr[:, :, :r1], request.scale / stride)  # [B, Hq, C, r1]
        masked = (starts[:r1].view(1, -1) > starts[r0:r1].view(-1, 1)) | (starts[:r1].view(1, -1) >= t)
        probs = logits.masked_fill_(masked, float("-inf")).softmax(-1)
        probs.mul_((starts[r0:r1] < t).view(-1, 1))  # padding rows carry no attention
        i0, i1 = r0 // per_block, r1 // per_block
        blocks = probs.view(b, hq, i1 - i0, per_block, i1, per_block).sum((3, 5))  # [B, Hq, chunk blocks, i1]
        out[:, :, i0:i1, :i1] = blocks
    return out / out.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------- FlexPrefill
@dataclass
class FlexPrefillEstimate:
    """What FlexPrefill estimates for one layer (per query head).

    Attributes:
        query_aware: bool [B, Hq]: the head's pooled estimate agrees with the last queries' true block
            distribution (``js < tau``), so its blocks come from the pooled map; otherwise vertical-slash.
        js: [B, Hq] square root of the Jensen-Shannon divergence (nats) of those two distributions.
        vertical, slash: [B, Hq, T] token shares of the last block of queries (:func:`last_query_lines`).
        vertical_blocks, slash_blocks: [B, Hq, NB] the same carried to key blocks / block diagonals.
        pooled: [B, Hq, NB, NB] softmax over key blocks of (block-mean q) . (block-mean k) * scale,
            causal (rows sum to 1, zero above the diagonal).
        scores: [B, Hq, NB, NB] the head's block scores: ``pooled`` for query-aware heads, else the
            vertical-slash map ``max(V[J], S[I - J])``.
    """

    query_aware: torch.Tensor
    js: torch.Tensor
    vertical: torch.Tensor
    slash: torch.Tensor
    vertical_blocks: torch.Tensor
    slash_blocks: torch.Tensor
    pooled: torch.Tensor
    scores: torch.Tensor


def _block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, T, D] -> fp32 [B, H, NB, D]: mean over each block's tokens (a partial last block over its own)."""
    b, h, t, d = x.shape
    nb = num_blocks(t, block_size)
    sums = F.pad(x.float(), (0, 0, 0, nb * block_size - t)).reshape(b, h, nb, block_size, d).sum(3)
    sizes = (t - block_size * torch.arange(nb, device=x.device)).clamp(max=block_size)
    return sums / sizes.view(nb, 1)


def _js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt(JSD(p, q)) in nats over the last axis (distributions; 0 log 0 = 0)."""
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / m).log(), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0).sqrt()


def flexprefill_estimate(request: MaskRequest, tau: float = FLEX_TAU) -> FlexPrefillEstimate:
    """FlexPrefill's per-head estimate (query-aware sparse pattern determination).

    From the last block of queries ``Q^`` (``bs`` tokens): the *true* block distribution ``a^`` is
    their exact causal attention summed per key block (:func:`last_query_lines`), the *estimate*
    ``a~ = softmax(mean(Q^) . avgpool(K)^T * scale)`` over key blocks. A head whose
    ``sqrt(JSD(a~, a^)) < tau`` is *query-aware*: the pooled estimate is trusted, and its blocks come
    from the block map ``softmax(avgpool(Q) . avgpool(K)^T * scale)``; the others are *vertical-slash*
    heads, whose blocks come from the last queries' vertical and slash lines. Costs one ``[bs, T]``
    attention row block per head plus an ``[NB, NB]`` pooled map: no ``[T, T]`` map.
    """
    q, k = request.q, request.k
    b, hq, t, _ = q.shape
    bs = request.block_size
    nb = num_blocks(t, bs)
    n_last = min(bs, t)
    vertical, slash = last_query_lines(request, n_last)
    vb, sb = _line_blocks(vertical, slash, bs)
    k_mean = _block_mean(k, bs)  # [B, Hkv, NB, D]
    q_last = q[:, :, t - n_last :].float().mean(2, keepdim=True)  # [B, Hq, 1, D]
    estimate = _grouped_logits(q_last, k_mean, request.scale).squeeze(2).softmax(-1)  # [B, Hq, NB]
    js = _js_distance(estimate, vb)
    query_aware = js < tau
    causal = causal_block_mask(nb, device=q.device)
    pooled = _grouped_logits(_block_mean(q, bs), k_mean, request.scale)  # [B, Hq, NB, NB]
    pooled = pooled.masked_fill(~causal, float("-inf")).softmax(-1)
    scores = torch.where(query_aware.view(b, hq, 1, 1), pooled, _vertical_slash_blocks(vb, sb))
    return FlexPrefillEstimate(query_aware, js, vertical, slash, vb, sb, pooled, scores)


def flexprefill_native_mask(
    est: FlexPrefillEstimate,
    request: MaskRequest,
    gamma: float = FLEX_GAMMA,
    min_budget: int = FLEX_MIN_BUDGET,
) -> BlockMask:
    """FlexPrefill's own selection (cumulative-attention based index selection) at coverage ``gamma``.

    - Query-aware heads: the fewest blocks of the whole causal ``pooled`` map (flattened, every row a
      distribution) holding ``gamma`` of its mass: rows with concentrated attention get few blocks.
    - Vertical-slash heads: the fewest key tokens holding ``gamma`` of the vertical shares and the fewest
      offsets holding ``gamma`` of the slash shares; a block is kept if it contains a chosen key column
      or a chosen token diagonal crosses it (offset ``o`` crosses block diagonals ``floor(o / bs)`` and
      ``ceil(o / bs)``).
    - Every head: at least ``ceil(min_budget / bs)`` vertical blocks (key blocks with the largest
      ``V``) and as many block diagonals (largest ``S``), as the authors' minimum budget; and the sink
      and diagonal blocks, as every method of the harness.

    Returns:
        a per-query-head mask ``[B, Hq, NB, NB]``, nothing above the diagonal, no empty row.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"FlexPrefill's gamma must be in (0, 1], got {gamma}")
    if not isinstance(min_budget, int) or min_budget < 0:
        raise ValueError(f"min_budget must be a number of tokens >= 0, got {min_budget!r}")
    bs, t = request.block_size, request.seq_len
    b, h, nb = est.vertical_blocks.shape
    device = est.scores.device
    causal = causal_block_mask(nb, device=device)
    diag = _diagonal_index(nb, device)

    qa_keep = cumulative_cover(est.pooled.masked_fill(~causal, 0.0).flatten(-2), gamma).view(b, h, nb, nb)

    columns = cumulative_cover(est.vertical, gamma)  # [B, H, T]
    col_blocks = F.pad(columns, (0, nb * bs - t)).view(b, h, nb, bs).any(-1)  # [B, H, NB]
    offsets = cumulative_cover(est.slash, gamma).float()  # [B, H, T]
    o = torch.arange(t, device=device)
    crossed = torch.zeros(b, h, nb + 1, device=device)  # one spare slot: ceil(o / bs) may be NB
    crossed.index_add_(-1, o // bs, offsets).index_add_(-1, (o + bs - 1) // bs, offsets)
    diag_blocks = crossed[..., :nb] > 0
    vs_keep = col_blocks.unsqueeze(-2) | diag_blocks[..., diag]

    keep = torch.where(est.query_aware.view(b, h, 1, 1), qa_keep, vs_keep)
    m = min(nb, -(-min_budget // bs))
    if m:
        top_cols = torch.zeros(b, h, nb, dtype=torch.bool, device=device)
        top_cols.scatter_(-1, est.vertical_blocks.topk(m, -1).indices, True)
        top_diags = torch.zeros_like(top_cols).scatter_(-1, est.slash_blocks.topk(m, -1).indices, True)
        keep = keep | top_cols.unsqueeze(-2) | top_diags[..., diag]
    keep = keep | torch.eye(nb, dtype=torch.bool, device=device)
    keep[..., 0] = True
    return BlockMask.from_dense(keep & causal, bs, t)
