"""Held-out documents for evaluation, tokenised lazily.

``--data`` is resolved by :func:`seerattn.data.resolve_data`, the rules training uses too: a folder
with ``MANIFEST.tsv`` (its rows of the asked split, ``test`` by default; ``title`` is used when
present), a folder without one (every file is evaluation data), a single text file, or JSONL /
parquet files (one document per row, column ``text_field``). Text files are read and tokenised
only as far as an evaluation needs (a prefix long enough for the windows asked for), so a small CPU
run does not tokenise millions of characters; JSONL / parquet rows are read when the books are opened.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import iter_table_texts, read_manifest, read_text, resolve_data

__all__ = ["BookInfo", "TokenizedBooks", "read_manifest", "segment_windows"]

logger = logging.getLogger(__name__)

# Characters read per wanted token on the first try (English BPE runs ~4 chars/token); doubled
# until the book has enough tokens or ends.
_CHARS_PER_TOKEN_GUESS = 6
# Tokens dropped at the end of a prefix: the last ones may be a word cut in half by the char cut.
_CUT_MARGIN = 8


@dataclass(frozen=True)
class BookInfo:
    """One evaluation document: a whole text file, or row ``row`` of a JSONL / parquet file."""

    path: Path
    title: str
    row: int | None = None


class TokenizedBooks:
    """Lazily tokenised books of one split.

    Args:
        data: a data source or several (see :func:`seerattn.data.resolve_data`).
        tokenizer: a Hugging Face tokenizer (``tokenizer(text, add_special_tokens=False)``).
        split: manifest split to use (a folder without a manifest and single files have none).
        max_books: use only the first documents.
        text_field: the JSONL key / parquet column holding each document's text.
    """

    def __init__(
        self,
        data: str | Path | Sequence[str | Path],
        tokenizer,
        split: str = "test",
        max_books: int | None = None,
        text_field: str = "text",
    ):
        if max_books is not None and max_books < 1:
            raise ValueError(f"max_books must be a positive number of documents or None, got {max_books}")
        self.books: list[BookInfo] = []
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._complete: set[int] = set()
        for f in resolve_data(data, split):
            if max_books is not None and len(self.books) == max_books:
                break
            if f.kind == "text":
                self.books.append(BookInfo(f.path, f.title))
                continue
            for row, text in enumerate(iter_table_texts(f.path, text_field)):
                self._text[len(self.books)] = text
                self.books.append(BookInfo(f.path, f"{f.title}#{row}", row))
                if max_books is not None and len(self.books) == max_books:
                    break

    def __len__(self) -> int:
        return len(self.books)

    def text(self, i: int) -> str:
        if i not in self._text:
            self._text[i] = read_text(self.books[i].path)
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
