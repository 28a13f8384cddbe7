"""Held-out books for evaluation: a folder of ``*.txt`` / ``*.txt.gz`` files with ``MANIFEST.tsv``.

The manifest is tab-separated with at least the columns ``file`` and ``split`` (``title`` is used
when present), as in ``../shared/data/books``. Books are tokenised lazily and only as far as an
evaluation needs (a prefix long enough for the windows asked for), so a small CPU run does not
tokenise millions of characters.
"""

from __future__ import annotations

import csv
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["BookInfo", "TokenizedBooks", "read_manifest", "segment_windows"]

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.tsv"
# Characters read per wanted token on the first try (English BPE runs ~4 chars/token); doubled
# until the book has enough tokens or ends.
_CHARS_PER_TOKEN_GUESS = 6
# Tokens dropped at the end of a prefix: the last ones may be a word cut in half by the char cut.
_CUT_MARGIN = 8


@dataclass(frozen=True)
class BookInfo:
    """One row of ``MANIFEST.tsv``."""

    path: Path
    title: str
    split: str


def read_manifest(folder: str | Path, split: str | None = "test", max_books: int | None = None) -> list[BookInfo]:
    """Books of ``split`` (all splits for ``None``) in manifest order, at most ``max_books``."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: expected a books folder like ../shared/data/books")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"file", "split"} <= set(rows[0]):
        raise ValueError(f"{path} must be tab-separated with at least the columns 'file' and 'split'")
    books = [
        BookInfo(folder / r["file"], r.get("title") or r["file"], r["split"])
        for r in rows
        if split is None or r["split"] == split
    ]
    if not books:
        splits = sorted({r["split"] for r in rows})
        raise ValueError(f"{path} has no books of split {split!r}; splits present: {splits}")
    for b in books:
        if not b.path.is_file():
            raise FileNotFoundError(f"{path} lists {b.path.name} but {b.path} does not exist")
    return books[:max_books] if max_books is not None else books


def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


class TokenizedBooks:
    """Lazily tokenised books of one split.

    Args:
        folder: books folder with ``MANIFEST.tsv``.
        tokenizer: a Hugging Face tokenizer (``tokenizer(text, add_special_tokens=False)``).
        split: manifest split to use.
        max_books: use only the first books of the split.
    """

    def __init__(self, folder: str | Path, tokenizer, split: str = "test", max_books: int | None = None):
        self.books = read_manifest(folder, split, max_books)
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._complete: set[int] = set()

    def __len__(self) -> int:
        return len(self.books)

    def text(self, i: int) -> str:
        if i not in self._text:
            self._text[i] = _read_text(self.books[i].path)
        return self._text[i]

    def tokens(self, i: int, min_tokens: int) -> torch.Tensor:
        """int64 [N] token ids of a prefix of book ``i`` with ``N >= min_tokens`` (the whole book if shorter)."""
        have = self._tokens.get(i)
        if have is not None and (have.numel() >= min_tokens or i in self._complete):
            return have
        text = self.text(i)
        chars = max(min_tokens, 1) * _CHARS_PER_TOKEN_GUESS
        while True:
            whole = chars >= len(text)
            ids = self.tokenizer(text[: min(chars, len(text))], add_special_tokens=False)["input_ids"]
            if not whole:
                ids = ids[: max(len(ids) - _CUT_MARGIN, 0)]
            if whole or len(ids) >= min_tokens:
                break
            chars *= 2
        out = torch.tensor(ids, dtype=torch.long)
        self._tokens[i] = out
        if whole:
            self._complete.add(i)
        return out


def segment_windows(
    books: TokenizedBooks, context: int, samples: int, add_bos: bool = False, span: int | None = None
) -> list[torch.Tensor]:
    """``samples`` non-overlapping windows of ``context`` tokens, deterministic, spread over the books.

    Each book is cut into consecutive slots of ``span`` tokens (default ``context``); a window is the
    *last* ``context`` tokens of a slot. So calls with one ``span`` and different contexts give
    windows that end at the same tokens: their last tokens are the same prediction targets, seen
    with more or less context. Slots are taken round-robin: slot 0 of every book, then slot 1, ... A
    book too short for its next slot is skipped from then on. With ``add_bos`` a window is the BOS
    token followed by the last ``context - 1`` tokens of the slot.

    Returns:
        a list of int64 [context] tensors.
    """
    span = context if span is None else span
    if context < 2 or samples < 1 or span < context:
        raise ValueError(
            f"need context >= 2, samples >= 1 and span >= context, got context={context}, samples={samples}, "
            f"span={span}"
        )
    bos = books.tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    body = context - (1 if add_bos else 0)
    out: list[torch.Tensor] = []
    alive = list(range(len(books)))
    slot = 0
    while len(out) < samples and alive:
        per_book = -(-(samples - len(out)) // len(alive))  # slots still needed per live book
        for i in list(alive):
            if len(out) == samples:
                break
            ids = books.tokens(i, (slot + per_book) * span)
            end = (slot + 1) * span
            if ids.numel() < end:
                alive.remove(i)
                continue
            win = ids[end - body : end]
            out.append(torch.cat([torch.tensor([bos]), win]) if add_bos else win.clone())
        slot += 1
    if len(out) < samples:
        raise ValueError(f"the {len(books)} books hold only {len(out)} slots of {span} tokens; asked for {samples}")
    return out
