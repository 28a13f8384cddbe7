"""Training data for distillation: documents -> token ids (cached) -> fixed-length packed rows.

Sources: :func:`seerattn.data.resolve_data`, the one resolution that evaluation uses too (a books
folder with ``MANIFEST.tsv``, whose rows of ``data_split`` are used; any other folder, every file of
which is training data; single ``.txt[.gz|.xz]`` / ``.jsonl[.gz|.xz]`` / ``.parquet`` files; never a
hub download). A text file is one document, or several split at ``document_separator`` (e.g.
``"\\x00"`` for the corpus ``testbed/train.py pack`` writes); JSONL / parquet give one document per
row (column ``text_field``, read through ``datasets``).

Packing: every document becomes ``[BOS] tokens [EOS]`` (whichever of the two the tokenizer has;
at least one is required so that documents stay separated); documents are concatenated into one
stream that is cut into rows of ``seq_len`` tokens (a row may start inside a document; the
remainder shorter than one row is dropped). The file order is shuffled by the seed before
tokenising (so ``max_data_tokens`` takes a random subset); rows are visited in a new seeded
permutation each epoch. Which rows a step uses depends only on (seed, step, batch layout), so a
resumed run sees exactly the data an uninterrupted run would.

Token ids are written once to ``<cache>/tokens-<key>.bin`` (uint16 when the vocabulary fits, else
uint32) with a JSON sidecar; the key covers the files (path, size, mtime), split, field, token
limit, seed and the tokenizer, so a change in any of them re-tokenises. A cache is checked against its
sidecar (size, sha256 of the ids) whenever it is opened: rank 0 rebuilds a damaged one with a warning,
other ranks stop with an error naming the file. Partial files of a killed tokenisation are removed by
the next run of the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import iter_documents, resolve_sources

__all__ = [
    "PackedRows",
    "RowOrder",
    "TokenCacheError",
    "TokenFile",
    "iter_documents",
    "prepare_tokens",
    "resolve_sources",
    "sample_range",
    "separator_ids",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- tokens
def separator_ids(tokenizer) -> tuple[int | None, int | None]:
    """(BOS, EOS) ids put around every document; at least one must exist."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token; packing needs one to "
            "separate documents (set tokenizer.bos_token or eos_token)"
        )
    return bos, eos


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{blob}|{separator_ids(tokenizer)}".encode()).hexdigest()


class TokenCacheError(ValueError):
    """A token cache that does not match its sidecar (damaged, truncated, torn): the message names the file."""


@dataclass(frozen=True)
class TokenFile:
    """A cached token stream: ``path`` (raw ids), ``dtype``, ``n_tokens``, ``digest`` (sha256 of the ids)."""

    path: Path
    dtype: str
    n_tokens: int
    digest: str
    n_documents: int

    def load(self) -> np.ndarray:
        """The ids as a read-only memory map [n_tokens]."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def verify(self) -> None:
        """Raise :class:`TokenCacheError` unless the file has the sidecar's size and sha256 (one read of the file)."""
        want = self.n_tokens * np.dtype(self.dtype).itemsize
        have = self.path.stat().st_size if self.path.is_file() else None
        if have != want:
            got = "no file" if have is None else f"{have} bytes"
            raise TokenCacheError(
                f"token cache {self.path} has {got}; its sidecar says {self.n_tokens} tokens of {self.dtype} "
                f"({want} bytes)"
            )
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != self.digest:
            raise TokenCacheError(
                f"token cache {self.path} does not match the sha256 in its sidecar (damaged or overwritten): "
                f"{digest.hexdigest()[:16]}... vs {self.digest[:16]}..."
            )


def _cache_key(
    files: Sequence[Path],
    split: str,
    text_field: str,
    separator: str | None,
    max_tokens: int | None,
    seed: int,
    shuffle: bool,
    tokenizer,
) -> str:
    desc = {
        "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "split": split,
        "text_field": text_field,
        "separator": separator,
        "max_tokens": max_tokens,
        "seed": seed,
        "shuffle_files": shuffle,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def _batches(docs: Iterator[str], max_chars: int = 1 << 22, max_docs: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _open_cache(meta_path: Path, bin_path: Path) -> TokenFile:
    """The cache described by the sidecar ``meta_path``, verified (:meth:`TokenFile.verify`)."""
    try:
        meta = json.loads(meta_path.read_text())
        tf = TokenFile(
            bin_path, str(meta["dtype"]), int(meta["n_tokens"]), str(meta["digest"]), int(meta["n_documents"])
        )
        np.dtype(tf.dtype)
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise TokenCacheError(f"token cache sidecar {meta_path} is unreadable: {e!r}") from e
    tf.verify()
    return tf


def _remove_stale_tmp(bin_path: Path) -> None:
    """Delete the partial files of this cache that a killed tokenisation left (``.<name>.tmp-<pid>``, pid gone).

    A partial file whose pid is alive on this host belongs to a tokenisation still running (another run
    sharing the cache folder) and is kept; those of other caches are left to their own next run.
    """
    stem = bin_path.name.removesuffix(".bin")
    for tmp in bin_path.parent.glob(f".{stem}.*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            logger.warning("removing %s, left by an interrupted tokenisation (process %s is gone)", tmp, pid)
            tmp.unlink(missing_ok=True)
        except PermissionError:  # the process exists (another user's)
            pass


def prepare_tokens(
    sources: Sequence[str | Path],
    tokenizer,
    cache_dir: str | Path,
    *,
    split: str = "train",
    text_field: str = "text",
    separator: str | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    build: bool = True,
    wait_s: float = 0.0,
) -> TokenFile:
    """Tokenise the documents of ``sources`` into a cached token file (reused when present).

    Args:
        sources, split, text_field, separator: see :func:`resolve_sources` / :func:`iter_documents`.
        tokenizer: a transformers tokenizer (its BOS/EOS separate documents).
        cache_dir: folder of the cache.
        max_tokens: stop after this many tokens (the last document is cut).
        seed, shuffle: the file order is shuffled with ``seed`` when ``shuffle``.
        build: when False, do not tokenise: wait up to ``wait_s`` seconds for the cache to appear
            (non-zero ranks wait for rank 0's file this way rather than in a collective barrier,
            whose timeout a long tokenisation could exceed), then raise.
    """
    files = resolve_sources(sources, split)
    if shuffle:
        random.Random(seed).shuffle(files)
    key = _cache_key(files, split, text_field, separator, max_tokens, seed, shuffle, tokenizer)
    cache_dir = Path(cache_dir)
    bin_path, meta_path = cache_dir / f"tokens-{key}.bin", cache_dir / f"tokens-{key}.json"
    if not build:
        deadline = time.monotonic() + wait_s
        next_note = time.monotonic() + 60
        while not meta_path.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
            if time.monotonic() > next_note:
                logger.info("waiting for the token cache %s (written by rank 0)", meta_path)
                next_note += 60
        if not meta_path.is_file():
            raise FileNotFoundError(f"token cache {bin_path} is missing (rank 0 should have written it)")
    if build:
        _remove_stale_tmp(bin_path)
    if meta_path.is_file():  # the sidecar is written last: present = the cache was complete once
        try:
            tf = _open_cache(meta_path, bin_path)
        except TokenCacheError as e:
            if not build:
                raise TokenCacheError(f"{e}; rank 0 rebuilds it: start again") from e
            logger.warning("%s: rebuilding it", e)
            meta_path.unlink()
            bin_path.unlink(missing_ok=True)
        else:
            logger.info("token cache hit (size and sha256 checked): %s", bin_path)
            return tf
    cache_dir.mkdir(parents=True, exist_ok=True)
    bos, eos = separator_ids(tokenizer)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    n_tokens = n_docs = 0
    logger.info("tokenising %d file(s) into %s", len(files), bin_path)
    with open(tmp, "wb") as out:
        for batch in _batches(iter_documents(files, text_field, separator)):
            ids_list = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            head = np.array([bos] if bos is not None else [], dtype=np.int64)
            tail = np.array([eos] if eos is not None else [], dtype=np.int64)
            parts = []
            for ids in ids_list:
                parts += [head, np.asarray(ids, dtype=np.int64), tail]
            arr = np.concatenate(parts)
            if max_tokens is not None:
                arr = arr[: max_tokens - n_tokens]
            if arr.size and (arr.min() < 0 or arr.max() >= vocab):
                raise ValueError(f"tokenizer produced ids outside [0, {vocab})")
            buf = arr.astype(dtype).tobytes()
            out.write(buf)
            digest.update(buf)
            n_tokens += arr.size
            n_docs += len(ids_list)
            if max_tokens is not None and n_tokens >= max_tokens:
                break
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, bin_path)
    meta = {
        "dtype": np.dtype(dtype).name,
        "n_tokens": n_tokens,
        "digest": digest.hexdigest(),
        "n_documents": n_docs,
        "files": len(files),
        "key": key,
    }
    tmp_meta = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_meta, meta_path)  # the sidecar appears last: its presence means the cache is complete
    logger.info("tokenised %d documents into %d tokens", n_docs, n_tokens)
    return TokenFile(bin_path, meta["dtype"], n_tokens, meta["digest"], n_docs)


# ---------------------------------------------------------------------------------------- rows
class PackedRows:
    """The token stream cut into ``len(self)`` rows of ``seq_len`` tokens."""

    def __init__(self, tokens: TokenFile, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self._ids = tokens.load()
        self.n_rows = tokens.n_tokens // seq_len
        if self.n_rows < 1:
            raise ValueError(
                f"the data has {tokens.n_tokens} tokens, fewer than one row of seq_len={seq_len}; add "
                "data or lower seq_len"
            )

    def __len__(self) -> int:
        return self.n_rows

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` as int64 ids [seq_len]."""
        if not 0 <= i < self.n_rows:
            raise IndexError(f"row {i} out of range [0, {self.n_rows})")
        chunk = np.asarray(self._ids[i * self.seq_len : (i + 1) * self.seq_len], dtype=np.int64)
        return torch.from_numpy(chunk)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        """Rows stacked: [len(indices), seq_len] int64."""
        return torch.stack([self.row(i) for i in indices])


class RowOrder:
    """Global sample index -> row index: epoch ``e`` visits the rows in permutation ``perm(seed, e)``."""

    def __init__(self, n_rows: int, seed: int, shuffle: bool = True):
        self.n_rows, self.seed, self.shuffle = n_rows, seed, shuffle
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache[epoch] = torch.randperm(self.n_rows, generator=g) if self.shuffle else torch.arange(self.n_rows)
        return self._cache[epoch]

    def __call__(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n_rows)
        return int(self._perm(epoch)[pos])


def sample_range(step: int, micro: int, rank: int, world_size: int, micro_batch_size: int, batch_size: int) -> range:
    """Global sample indices of one micro-batch.

    Step ``s`` consumes samples ``[s * batch_size, (s + 1) * batch_size)``; within it micro-batch
    ``a`` of rank ``r`` takes ``micro_batch_size`` samples starting at ``(a * world_size + r) *
    micro_batch_size``. A single process with accumulation thus groups samples exactly as several
    ranks do, so results agree across world sizes at equal global and micro batch.
    """
    start = step * batch_size + (micro * world_size + rank) * micro_batch_size
    return range(start, start + micro_batch_size)
