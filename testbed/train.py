"""Train the SeerAttention testbed model: a small Llama (GQA, RoPE, 8k context) on public-domain books
mixed with synthetic long-range retrieval tasks. Training tooling only; not part of ``seerattn``.

Recipe (run from the repository root):

    python testbed/train.py tokenizer             # CPU: byte-level BPE on the train books -> testbed/tokenizer
    python testbed/train.py pack                  # CPU: .carry/ = train token ids (xz) + test text (~47 MiB)
    python testbed/train.py train --preset gpu --out $OUT      # H200, one run, ~9 min incl. eval
    python testbed/train.py train --preset smoke --carry /tmp/smoke_carry --out /tmp/smoke  # CPU check

``train`` is time-boxed: a curriculum of phases (sequence length and data mix) is laid out over the
wall-clock training budget, the learning rate follows that clock too, then it evaluates (held-out PPL
vs context, pass-key accuracy vs length and depth, multi-fact retrieval) and writes ``metrics.json``,
``train.log`` and the bf16 model (``save_pretrained(max_shard_size="15MB")``) under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

T0 = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402

HERE = Path(__file__).resolve().parent
log = logging.getLogger("testbed")


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    """Curriculum phase: starts at ``start`` (fraction of the training clock), rows of ``seq_len``."""

    start: float
    seq_len: int
    mix: dict[str, float]


@dataclass
class Preset:
    # model
    vocab_size: int = 14336
    hidden: int = 512
    layers: int = 6
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    mlp: int = 896
    rope_theta: float = 500_000.0
    max_pos: int = 8192
    # optimisation
    batch_tokens: int = 65536
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # clock (seconds since the script started)
    total_s: float = 555.0  # everything, eval and saving included
    eval_reserve_s: float = 70.0  # kept free at the end for the final eval and saving
    probe_every_s: float = 50.0
    log_every: int = 25
    # data
    workers: int = 10
    max_train_books: int = 0  # 0 = all
    phases: list[Phase] = field(default_factory=list)
    # eval
    ppl_ctx: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    ppl_segments_per_book: int = 2
    pk_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    pk_depths: tuple[float, ...] = tuple(i / 10 for i in range(11))
    pk_per_depth: int = 5
    probe_pk_lengths: tuple[int, ...] = (2048, 8192)
    probe_pk_n: int = 16
    probe_segments: int = 8
    seed: int = 1234


def gpu_preset() -> Preset:
    return Preset(
        phases=[
            Phase(0.00, 1024, {"dense": 0.45, "facts": 0.15, "passkey": 0.10, "book": 0.30}),
            Phase(0.12, 2048, {"dense": 0.20, "facts": 0.25, "passkey": 0.15, "book": 0.40}),
            Phase(0.30, 4096, {"dense": 0.10, "facts": 0.25, "passkey": 0.15, "book": 0.50}),
            Phase(0.55, 8192, {"dense": 0.05, "facts": 0.25, "passkey": 0.15, "book": 0.55}),
        ]
    )


def smoke_preset() -> Preset:
    """Tiny CPU configuration on the same code path (a few steps per phase)."""
    return Preset(
        vocab_size=14336,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=16,
        mlp=128,
        max_pos=1024,
        batch_tokens=2048,
        peak_lr=3e-3,
        warmup_steps=5,
        total_s=75.0,
        eval_reserve_s=25.0,
        probe_every_s=12.0,
        log_every=5,
        workers=2,
        max_train_books=6,
        phases=[
            Phase(0.0, 256, {"dense": 0.45, "facts": 0.15, "passkey": 0.10, "book": 0.30}),
            Phase(0.5, 512, {"dense": 0.05, "facts": 0.25, "passkey": 0.15, "book": 0.55}),
        ],
        ppl_ctx=(128, 256, 512),
        ppl_segments_per_book=1,
        pk_lengths=(256, 512),
        pk_depths=(0.0, 0.5, 1.0),
        pk_per_depth=2,
        probe_pk_lengths=(256, 512),
        probe_pk_n=4,
        probe_segments=2,
    )


PRESETS = {"gpu": gpu_preset, "smoke": smoke_preset}


# ----------------------------------------------------------------------------------------------------
# CPU steps: tokenizer, packing
# ----------------------------------------------------------------------------------------------------
def cmd_tokenizer(args: argparse.Namespace) -> None:
    texts = data.load_books("train", Path(args.books))
    t = time.time()
    tok = data.train_tokenizer(texts, args.vocab_size)
    tok.save_pretrained(args.tokenizer)
    log.info("tokenizer: %d tokens, trained in %.0f s, saved to %s", len(tok), time.time() - t, args.tokenizer)


def cmd_distill_corpus(args: argparse.Namespace) -> None:
    docs = data.distill_documents(
        data.load_books("train", Path(args.books)), np.random.default_rng(args.seed), args.n_books
    )
    data.write_corpus_xz(docs, Path(args.out))
    n_pk = sum(d.startswith(data.PASSKEY_INTRO) for d in docs)
    n_facts = sum("The code of " in d for d in docs)
    log.info(
        "%d documents, %d characters (%d pass key, %d facts) -> %s",
        len(docs),
        sum(map(len, docs)),
        n_pk,
        n_facts,
        args.out,
    )


def cmd_pack(args: argparse.Namespace) -> None:
    books = Path(args.books)
    out = Path(args.carry)
    train = data.load_books("train", books)
    test = data.load_books("test", books)
    if args.max_books:
        train, test = train[: args.max_books], test[: max(2, args.max_books // 3)]
    # Test: a 100k-character chunk from the middle of each test book, starting at a paragraph.
    chunks = []
    for t in test:
        mid = t.find("\n\n", len(t) // 2 - args.test_chars // 2) + 2
        chunks.append(t[mid : mid + args.test_chars])
    data.write_corpus_xz(chunks, out / "test.txt.xz")
    from transformers import AutoTokenizer

    t = time.time()
    ids, starts = data.encode_books(AutoTokenizer.from_pretrained(args.tokenizer), train)
    log.info("train: %d books, %d tokens, tokenized in %.0f s", len(train), len(ids), time.time() - t)
    data.write_ids_xz(ids, starts, out)
    for f in sorted(out.iterdir()):
        log.info("%s: %.2f MiB", f, f.stat().st_size / 2**20)


# ----------------------------------------------------------------------------------------------------
# data loader: worker processes build rows for the current phase (shared through an mp.Value)
# ----------------------------------------------------------------------------------------------------
class RowStream(torch.utils.data.IterableDataset):
    def __init__(self, maker: data.SampleMaker, phases: list[Phase], batch_tokens: int, phase_idx, seed: int):
        self.maker, self.phases, self.batch_tokens, self.phase_idx, self.seed = (
            maker,
            phases,
            batch_tokens,
            phase_idx,
            seed,
        )

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        self.maker.rng = np.random.default_rng([self.seed, wid])
        while True:
            ph = self.phases[self.phase_idx.value]
            b = self.maker.batch(self.batch_tokens // ph.seq_len, ph.seq_len, ph.mix)
            yield {k: torch.from_numpy(v) for k, v in b.items()}


# ----------------------------------------------------------------------------------------------------
# model, loss, evaluation
# ----------------------------------------------------------------------------------------------------
def build_model(p: Preset, tok):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden,
        intermediate_size=p.mlp,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        head_dim=p.head_dim,
        max_position_embeddings=p.max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
    )
    if len(tok) != p.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the preset's vocab_size is {p.vocab_size}")
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def token_losses(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL and argmax. ids [B, L] -> (nll [B, L-1] fp32, pred [B, L-1]) for targets ids[:, 1:]."""
    logits = model(input_ids=ids).logits[:, :-1]
    nll = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return nll.view(ids.shape[0], -1), logits.argmax(-1)


class Evaluator:
    """Held-out PPL vs context and retrieval accuracy, on the test-book chunks."""

    def __init__(self, p: Preset, tok, test_texts: list[str], device: torch.device, amp) -> None:
        self.p, self.tok, self.device, self.amp = p, tok, device, amp
        ids, starts = data.encode_books(tok, test_texts)
        self.test_texts = test_texts
        self.maker = data.SampleMaker(tok, ids, starts, np.random.default_rng(999))
        L = max(p.ppl_ctx)
        self.segments = np.stack(list(data.iter_segments(ids, starts, L, p.ppl_segments_per_book)))
        log.info("eval: %d held-out segments of %d tokens (%d test chunks)", len(self.segments), L, len(test_texts))

    @torch.no_grad()
    def ppl(self, n_segments: int | None = None, ctxs: tuple[int, ...] | None = None) -> dict:
        """PPL when the held-out tokens are cut into non-overlapping windows of each context length,
        plus the mean NLL by position bucket inside the longest windows."""
        model = self.model
        segs = torch.from_numpy(self.segments[:n_segments]).to(self.device)
        L = segs.shape[1]
        out: dict = {"ppl": {}, "nll_by_position": {}}
        for C in ctxs or self.p.ppl_ctx:
            win = segs.reshape(-1, C)
            per = max(1, 65536 // C)
            tot, n = 0.0, 0
            pos_sum = torch.zeros(C - 1, device=self.device, dtype=torch.float64)
            for i in range(0, win.shape[0], per):
                with self.amp():
                    nll, _ = token_losses(model, win[i : i + per])
                tot += nll.double().sum().item()
                n += nll.numel()
                pos_sum += nll.double().sum(0)
            out["ppl"][C] = math.exp(tot / n)
            if C == L:
                pos = pos_sum / win.shape[0]
                edges = [0, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768]
                for a, b in zip(edges[:-1], edges[1:], strict=True):
                    if a < C - 1:
                        out["nll_by_position"][f"{a}-{min(b, C - 1)}"] = pos[a : min(b, C - 1)].mean().item()
        return out

    @torch.no_grad()
    def token_space_retrieval(self, kind: str, L: int, n: int, **kw) -> dict:
        """Accuracy on rows built like training rows (token space) from test books."""
        model = self.model
        exact, tok_ok, tok_n = 0, 0, 0
        for _ in range(n):
            s = getattr(self.maker, kind)(L, **kw)
            ids = torch.from_numpy(s.ids)[None].to(self.device)
            with self.amp():
                _, pred = token_losses(model, ids)
            ans = torch.from_numpy(s.answer[1:] > 0).to(self.device)
            ok = (pred[0] == ids[0, 1:])[ans]
            tok_ok += int(ok.sum())
            tok_n += int(ok.numel())
            # a query is right if all of its answer digits are: split answers into runs
            a = s.answer[1:] > 0
            runs = np.split(np.nonzero(a)[0], np.nonzero(np.diff(np.nonzero(a)[0]) > 1)[0] + 1)
            okc = (pred[0] == ids[0, 1:]).cpu().numpy()
            exact += sum(bool(okc[r].all()) for r in runs if len(r)) / max(1, len([r for r in runs if len(r)]))
        return {"exact": exact / n, "token_acc": tok_ok / max(tok_n, 1), "n": n}

    def passkey_prompt(self, L: int, depth: float, key: str, rng: np.random.Generator, grass: bool):
        """Text-built pass-key prompt (as an eval harness would build it) of about L tokens with BOS.
        Returns (prompt ids, answer ids)."""
        tok = self.tok
        fixed = f"{data.PASSKEY_INTRO}  {data.PASSKEY_NEEDLE.format(key=key)}  {data.PASSKEY_QUESTION}"
        n_fill = L - 1 - len(tok(fixed, add_special_tokens=False).input_ids) - 2
        if grass:
            g = tok(" " + data.GRASS_FILLER, add_special_tokens=False).input_ids
            fill_ids = (g * (n_fill // len(g) + 1))[:n_fill]
        else:
            fill_ids = self.maker.book_slice(n_fill).tolist()
        text = tok.decode(fill_ids).strip()
        cut = int(depth * len(text))
        # move the cut to the nearest sentence end so the needle starts a sentence
        ends = [i + 1 for i in range(len(text)) if text[i] in ".!?" and (i + 1 == len(text) or text[i + 1] == " ")]
        if ends and 0 < depth < 1:
            cut = min(ends, key=lambda e: abs(e - cut))
        before, after = text[:cut].strip(), text[cut:].strip()
        needle = data.PASSKEY_NEEDLE.format(key=key)
        prompt = " ".join(x for x in (data.PASSKEY_INTRO, before, needle, after, data.PASSKEY_QUESTION) if x)
        p_ids = tok(prompt).input_ids  # with BOS
        a_ids = tok(" " + key, add_special_tokens=False).input_ids
        return p_ids, a_ids

    @torch.no_grad()
    def passkey(self, lengths, depths, per_depth: int, grass: bool = False, seed: int = 7) -> dict:
        """Exact-match pass-key accuracy (greedy = teacher-forced argmax over all answer tokens)."""
        model = self.model
        rng = np.random.default_rng(seed)
        res: dict = {}
        for L in lengths:
            acc_by_depth, lens = {}, []
            for d in depths:
                ok = 0
                for _ in range(per_depth):
                    key = str(int(rng.integers(10000, 100000)))
                    p_ids, a_ids = self.passkey_prompt(L, d, key, rng, grass)
                    lens.append(len(p_ids))
                    ids = torch.tensor([p_ids + a_ids], device=self.device)
                    with self.amp():
                        _, pred = token_losses(model, ids)
                    n_a = len(a_ids)
                    ok += bool((pred[0, -n_a:] == ids[0, -n_a:]).all())
                acc_by_depth[f"{d:.2f}"] = ok / per_depth
            res[L] = {
                "acc": float(np.mean(list(acc_by_depth.values()))),
                "by_depth": acc_by_depth,
                "prompt_tokens": [int(min(lens)), int(max(lens))],
            }
        return res

    @torch.no_grad()
    def generate_check(self, L: int, n: int) -> dict:
        """Greedy generate() on text pass-key prompts: confirms the argmax metric with the HF decode path."""
        rng = np.random.default_rng(3)
        ok, samples = 0, []
        for i in range(n):
            key = str(int(rng.integers(10000, 100000)))
            p_ids, _ = self.passkey_prompt(L, (i + 0.5) / n, key, rng, False)
            ids = torch.tensor([p_ids], device=self.device)
            with self.amp():
                g = self.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=self.tok.pad_token_id)
            text = self.tok.decode(g[0, len(p_ids) :], skip_special_tokens=True)
            ok += text.strip().startswith(key)
            samples.append({"key": key, "generated": text})
        return {"acc": ok / n, "samples": samples}


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------
def pick_sdpa_backend(model, device: torch.device, amp):
    """Return a context factory that pins SDPA to flash attention when it runs this model here."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return nullcontext, "default (cpu)"
    ids = torch.randint(0, 100, (2, 256), device=device)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(be), amp():
                model(input_ids=ids).logits.float().sum().backward()
            model.zero_grad(set_to_none=True)
            return (lambda be=be: sdpa_kernel(be)), name
        except RuntimeError as e:  # this backend refuses these shapes/dtypes: try the next one
            log.warning("SDPA backend %s unusable: %s", name, str(e).splitlines()[0])
            model.zero_grad(set_to_none=True)
    return nullcontext, "default"


def cmd_train(args: argparse.Namespace) -> None:
    p = PRESETS[args.preset]()
    if args.total_s:
        p.total_s = args.total_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(out / "train.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(fh)
    torch.manual_seed(p.seed)
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics: dict = {
        "preset": args.preset,
        "config": asdict(p),
        "device": str(device),
        "torch": torch.__version__,
        "curve": [],
        "probes": [],
    }

    def amp():
        # bf16 autocast on the GPU; plain fp32 on CPU (bf16 matmuls are emulated and very slow there)
        if device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    # ---- data ----
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    carry = Path(args.carry)
    t = time.time()
    ids, starts = data.read_ids_xz(carry)
    if p.max_train_books:
        starts = starts[: p.max_train_books + 1]
        ids = ids[: starts[-1]]
    test_texts = data.read_corpus_xz(carry / "test.txt.xz")
    metrics["data"] = {
        "train_books": len(starts) - 1,
        "train_tokens": int(len(ids)),
        "test_chunks": len(test_texts),
        "read_s": time.time() - t,
    }
    log.info("data: %s", metrics["data"])
    maker = data.SampleMaker(tok, ids, starts, np.random.default_rng(p.seed))

    phase_idx = mp.Value("i", 0)
    stream = RowStream(maker, p.phases, p.batch_tokens, phase_idx, p.seed)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=p.workers,
        prefetch_factor=4,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    it = iter(loader)  # fork the workers before CUDA is initialised
    if device.type == "cuda":
        metrics["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- model ----
    model = build_model(p, tok).to(device)
    n_params = sum(x.numel() for x in model.parameters())
    metrics["params"] = n_params
    log.info("model: %.2f M params (%.1f MB bf16)", n_params / 1e6, n_params * 2 / 1e6)
    sdpa_ctx, backend = pick_sdpa_backend(model, device, amp)
    metrics["sdpa_backend"] = backend
    log.info("SDPA backend: %s", backend)
    decay = [x for x in model.parameters() if x.dim() >= 2]
    no_decay = [x for x in model.parameters() if x.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.peak_lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    ev = Evaluator(p, tok, test_texts, device, amp)
    ev.model = model

    def save(tag: str) -> None:
        t = time.time()
        mdir = out / "model"
        # a bf16 copy: converting the model in place would round the fp32 master weights
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(mdir, max_shard_size="15MB")
        # also write the top-level rope_theta that transformers 4.x reads (5.x reads rope_parameters)
        cfg = json.loads((mdir / "config.json").read_text())
        cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
        (mdir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (mdir / "generation_config.json").unlink(missing_ok=True)  # keep the files that come back <= 8
        big = [f.name for f in mdir.iterdir() if f.stat().st_size >= 15_000_000]
        if big:
            log.warning("files >= 15 MB: %s", big)
        log.info("saved %s model in %.1f s", tag, time.time() - t)

    def probe(step: int, tokens: int) -> None:
        model.eval()
        with sdpa_ctx():
            t = time.time()
            r = {
                "step": step,
                "tokens": tokens,
                "time": time.time() - T0,
                "nll_by_position": ev.ppl(p.probe_segments, (max(p.ppl_ctx),))["nll_by_position"],
            }
            for L in p.probe_pk_lengths:
                r[f"passkey_{L}"] = ev.token_space_retrieval("passkey", L, p.probe_pk_n, key_len=5)["exact"]
            r[f"facts_{max(p.probe_pk_lengths)}"] = ev.token_space_retrieval("facts", max(p.probe_pk_lengths), 4, k=8)[
                "token_acc"
            ]
            r["probe_s"] = time.time() - t
        model.train()
        metrics["probes"].append(r)
        log.info(
            "probe step %d: nll by pos %s | %s",
            step,
            " ".join(f"{k}:{v:.3f}" for k, v in r["nll_by_position"].items()),
            " ".join(f"{k}={v:.2f}" for k, v in r.items() if k.startswith(("passkey", "facts"))),
        )

    # ---- loop ----
    t_start = time.time()
    t_end = T0 + p.total_s - p.eval_reserve_s
    span = t_end - t_start
    if span <= 0:
        raise RuntimeError(f"no training time left: setup took {t_start - T0:.0f} s of {p.total_s} s")
    log.info("setup took %.1f s; training for %.0f s", t_start - T0, span)
    step, tokens, discarded = 0, 0, 0
    acc_hits = torch.zeros(4, device=device)
    acc_cnt = torch.zeros(4, device=device)
    loss_sum = torch.zeros((), device=device)
    t_log, tok_log, next_probe = time.time(), 0, time.time() + p.probe_every_s
    cur = 0
    model.train()
    while True:
        now = time.time()
        frac = (now - t_start) / span
        if frac >= 1.0:
            break
        ph = max(i for i, x in enumerate(p.phases) if x.start <= frac)
        if ph != cur:
            log.info(
                "phase %d -> %d (seq_len %d) at step %d, %.1f M tokens",
                cur,
                ph,
                p.phases[ph].seq_len,
                step,
                tokens / 1e6,
            )
            save(f"phase-{cur}")
            cur = ph
            phase_idx.value = ph
        batch = next(it)
        L = p.phases[cur].seq_len
        if batch["ids"].shape[1] != L:  # built for the previous phase
            discarded += 1
            continue
        ids = batch["ids"].to(device, non_blocking=True)
        w = batch["weight"].to(device, non_blocking=True)[:, 1:]
        ans = batch["answer"].to(device, non_blocking=True)[:, 1:].long()
        lr = (
            p.peak_lr
            * min(1.0, (step + 1) / p.warmup_steps)
            * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        with sdpa_ctx(), amp():
            nll, pred = token_losses(model, ids)
        loss = (nll * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            hit = (pred == ids[:, 1:]).float()
            acc_hits += torch.zeros(4, device=device).index_add_(0, ans.flatten(), hit.flatten())
            acc_cnt += torch.bincount(ans.flatten(), minlength=4).float()
            loss_sum += loss.detach()
        step += 1
        tokens += ids.numel()
        if step % p.log_every == 0:
            dt = time.time() - t_log
            a = (acc_hits / acc_cnt.clamp(min=1)).tolist()
            c = acc_cnt.tolist()
            rec = {
                "step": step,
                "tokens": tokens,
                "time": time.time() - T0,
                "seq_len": L,
                "lr": lr,
                "loss": loss_sum.item() / p.log_every,
                "tok_per_s": (tokens - tok_log) / dt,
                "ans_acc_dense": a[1] if c[1] else None,
                "ans_acc_facts": a[2] if c[2] else None,
                "ans_acc_passkey": a[3] if c[3] else None,
            }
            metrics["curve"].append(rec)
            log.info(
                "step %5d L=%5d loss %.3f lr %.2e %.0fk tok/s | answer acc dense %s facts %s passkey %s",
                step,
                L,
                rec["loss"],
                lr,
                rec["tok_per_s"] / 1e3,
                *(
                    f"{x:.2f}" if x is not None else "-"
                    for x in (rec["ans_acc_dense"], rec["ans_acc_facts"], rec["ans_acc_passkey"])
                ),
            )
            acc_hits.zero_()
            acc_cnt.zero_()
            loss_sum.zero_()
            t_log, tok_log = time.time(), tokens
        if time.time() >= next_probe:
            probe(step, tokens)
            next_probe = time.time() + p.probe_every_s
    train_s = time.time() - t_start
    metrics["train"] = {
        "steps": step,
        "tokens": tokens,
        "train_s": train_s,
        "setup_s": t_start - T0,
        "discarded_batches": discarded,
        "final_loss": metrics["curve"][-1]["loss"] if metrics["curve"] else None,
    }
    log.info("trained %d steps, %.1f M tokens in %.0f s", step, tokens / 1e6, train_s)
    save("final")
    del it, loader  # stop the workers

    # ---- final eval (each part only while the hard deadline allows; metrics written after each) ----
    def dump() -> None:
        metrics["total_s"] = time.time() - T0
        with open(out / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=1, default=str)

    dump()
    hard = T0 + p.total_s + 15.0
    Lmax = max(p.pk_lengths)
    parts = [
        ("ppl", lambda: ev.ppl()),
        ("passkey", lambda: ev.passkey(p.pk_lengths, p.pk_depths, p.pk_per_depth)),
        (
            "passkey_grass",
            lambda: ev.passkey(
                p.pk_lengths, (0.0, 0.25, 0.5, 0.75, 1.0), max(1, p.pk_per_depth // 2), grass=True, seed=8
            ),
        ),
        ("facts", lambda: {L: ev.token_space_retrieval("facts", L, 8, k=min(8, L // 128)) for L in p.pk_lengths}),
        ("generate_check", lambda: ev.generate_check(Lmax, 4)),
    ]
    model.eval()
    metrics["eval"] = {}
    t = time.time()
    for name, fn in parts:
        if time.time() > hard:
            log.warning("eval part %s skipped: past the deadline", name)
            metrics.setdefault("eval_skipped", []).append(name)
            continue
        try:
            # generate() decodes one token at a time: leave it the default SDPA dispatch
            with sdpa_ctx() if name != "generate_check" else contextlib.nullcontext():
                r = fn()
        except Exception:  # keep the trained model and the other results if one eval part breaks
            log.error("eval part %s failed:\n%s", name, traceback.format_exc())
            metrics["eval_error"] = traceback.format_exc()
            continue
        if name == "ppl":
            metrics["eval"].update(r)
        else:
            metrics["eval"][name] = r
        log.info("eval %s done (%.0f s)", name, time.time() - t)
        dump()
    metrics["eval"]["eval_s"] = time.time() - t
    dump()
    summary(metrics)


def summary(m: dict) -> None:
    tr = m.get("train", {})
    print("\n==== testbed summary ====")
    print(
        f"params {m['params'] / 1e6:.2f} M | steps {tr.get('steps')} | tokens {tr.get('tokens', 0) / 1e6:.1f} M"
        f" | train {tr.get('train_s', 0):.0f} s | final loss {tr.get('final_loss')} | sdpa {m.get('sdpa_backend')}"
    )
    e = m.get("eval")
    if not e:
        print("no eval:", m.get("eval_error", "")[-500:])
        return
    if "ppl" in e:
        print("held-out PPL: " + " | ".join(f"{k}: {v:.2f}" for k, v in e["ppl"].items()))
        print(
            "NLL by position (longest windows): " + " | ".join(f"{k}: {v:.3f}" for k, v in e["nll_by_position"].items())
        )
    for key, name, field_ in (
        ("passkey", "passkey (book filler)", "acc"),
        ("passkey_grass", "passkey (grass filler)", "acc"),
        ("facts", "facts exact", "exact"),
    ):
        if key in e:
            print(f"{name}: " + " | ".join(f"{k}: {v[field_]:.2f}" for k, v in e[key].items()))
    if "generate_check" in e:
        print(f"generate() check: {e['generate_check']['acc']:.2f} | eval {e.get('eval_s', 0):.0f} s")
    print(f"total {m['total_s']:.0f} s" + (" | EVAL FAILED (see train.log)" if "eval_error" in m else ""))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--books", default=str(data.BOOKS_DIR))
    ap.add_argument("--tokenizer", default=str(HERE / "tokenizer"))
    ap.add_argument("--carry", default=str(HERE.parent / ".carry"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tokenizer")
    s.add_argument("--vocab-size", type=int, default=14336)
    s = sub.add_parser("pack")
    s.add_argument("--max-books", type=int, default=0)
    s.add_argument("--test-chars", type=int, default=100_000)
    s = sub.add_parser("distill-corpus", help="retrieval-mixed text corpus for gate distillation (xz)")
    s.add_argument("--out", default=str(HERE.parent / ".gpu" / "distill_mix.txt.xz"))
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--n-books", type=int, default=50)
    s = sub.add_parser("train")
    s.add_argument("--preset", choices=sorted(PRESETS), required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--total-s", type=float, default=0.0, help="override the preset's wall-clock budget")
    args = ap.parse_args()
    commands = {"tokenizer": cmd_tokenizer, "pack": cmd_pack, "distill-corpus": cmd_distill_corpus, "train": cmd_train}
    commands[args.cmd](args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
