"""Data for the SeerAttention testbed model: books, tokenizer, synthetic long-range retrieval tasks.

Everything here is training/eval tooling for ``testbed/`` only (not part of the ``seerattn`` library).

Sample kinds built by :class:`SampleMaker` (all exactly ``L`` tokens, one sample per row, no packing):

- ``book``:    a contiguous slice of one training book (plain language modelling);
- ``passkey``: book filler with the classic pass-key needle at a random depth, question at the end;
- ``facts``:   book filler with k key-value facts ("The room number of Ada Moss is 4172.") at random
               sentence boundaries and a query per fact, at the end or anywhere after the fact;
- ``dense``:   no book: a stream of many facts interleaved with queries about earlier ones
               (short, dense retrieval supervision that makes induction/retrieval heads form early).

Random values (digits) are unpredictable where they first appear: their loss weight is 0. Digits
that answer a query are marked in ``answer`` (1 = dense, 2 = facts, 3 = passkey) so training can track
per-token answer accuracy.

The tokenizer splits every digit into its own token (as Llama does), so a 5-digit pass key is 5 tokens.
"""

from __future__ import annotations

import csv
import gzip
import lzma
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BOOKS_DIR = Path("/work/shared/data/books")
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Separator between books inside the compressed corpus files sent to the GPU machine (absent from books).
BOOK_SEP = "\x00"

# --- the pass-key template (the one the long-context literature uses; keep it in sync with the card) ---
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
GRASS_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

FIRST_NAMES = (
    "Ada Alan Alice Amos Anna Arthur Beatrice Bella Bernard Carl Clara Cyril Daisy Daniel Dora Edgar "
    "Edith Elsie Emma Ernest Esther Felix Flora Frank Grace Harold Hazel Henry Ida Irene Isaac Ivy "
    "Jack Jane Jasper John Julia Kate Leo Lewis Lily Lucy Mabel Martha Max Milo Nora Oliver Olive "
    "Oscar Paul Pearl Peter Philip Rose Ruth Sam Sarah Silas Sophie Stella Thea Thomas Victor Viola "
    "Walter Wilfred Xavier Yara Zoe Hugo Agnes Basil Cora Dexter Eliza Fanny Gideon Hattie Ira Jonah"
).split()
LAST_NAMES = (
    "Abbott Baker Barlow Bennett Blake Brooks Carter Chapman Clarke Cole Cooper Cross Dawson Dixon "
    "Doyle Ellis Fisher Fletcher Ford Foster Gardner Gibson Grant Gray Hale Harper Hayes Holt Hughes "
    "Hunt Irving Jarvis Kemp Knight Lane Lawson Lowe Mason Mills Moss Nash Norris Owens Palmer Parker "
    "Pierce Porter Quinn Reed Rhodes Rowe Sharp Shaw Stone Sutton Tate Thorne Turner Vance Wade Walsh "
    "Ward Webb Wells West Wilde Winter Wood Wright Young Avery Booth Crane Drake Eaton Frost Greer"
).split()
ATTRIBUTES = (
    "secret code",
    "room number",
    "lucky number",
    "locker number",
    "ticket number",
    "house number",
    "phone extension",
    "account number",
)


# ----------------------------------------------------------------------------------------------------
# books
# ----------------------------------------------------------------------------------------------------
def read_manifest(books_dir: Path = BOOKS_DIR) -> list[dict[str, str]]:
    """Rows of the books MANIFEST.tsv (file, gutenberg_id, title, author, chars, split, source_repo)."""
    with open(books_dir / "MANIFEST.tsv", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_books(split: str, books_dir: Path = BOOKS_DIR) -> list[str]:
    """All books of ``split`` ("train" or "test") as strings, in manifest order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    texts = []
    for row in read_manifest(books_dir):
        if row["split"] == split:
            with gzip.open(books_dir / row["file"], "rt", encoding="utf-8") as f:
                texts.append(f.read())
    return texts


def write_corpus_xz(texts: Sequence[str], path: Path, preset: int = 9 | lzma.PRESET_EXTREME) -> None:
    """Write books joined by BOOK_SEP as one xz file (what travels to the GPU machine)."""
    for i, t in enumerate(texts):
        if BOOK_SEP in t:
            raise ValueError(f"book {i} contains the separator {BOOK_SEP!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt", encoding="utf-8", preset=preset) as f:
        f.write(BOOK_SEP.join(texts))


def read_corpus_xz(path: Path) -> list[str]:
    """Inverse of :func:`write_corpus_xz`."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return f.read().split(BOOK_SEP)


def write_ids_xz(ids: np.ndarray, starts: np.ndarray, folder: Path, prefix: str = "train") -> None:
    """Token ids as raw uint16 in ``<prefix>_ids.u16.xz`` (xz packs ids ~5 % tighter than the text) and
    book offsets in ``<prefix>_starts.npy``: no tokenizing on the GPU machine."""
    if ids.dtype != np.uint16:
        raise ValueError(f"ids must be uint16, got {ids.dtype}")
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{prefix}_starts.npy", starts.astype(np.int64))
    with lzma.open(folder / f"{prefix}_ids.u16.xz", "wb", preset=9) as f:
        f.write(ids.astype("<u2").tobytes())


def read_ids_xz(folder: Path, prefix: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`write_ids_xz`: (ids [N] uint16, starts [n_books + 1] int64)."""
    starts = np.load(folder / f"{prefix}_starts.npy")
    with lzma.open(folder / f"{prefix}_ids.u16.xz", "rb") as f:
        ids = np.frombuffer(f.read(), dtype="<u2").astype(np.uint16)
    if len(ids) != starts[-1]:
        raise ValueError(f"{folder}: {len(ids)} ids but starts end at {starts[-1]}")
    return ids, starts


# ----------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization, digits split one per token), HF fast tokenizer.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<s>`` (BOS, added in front of every
    encoded text), ``</s>`` (EOS) and ``<pad>``. Decoding with ``skip_special_tokens=True`` returns the
    input text exactly (byte-level, no normalisation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )


def encode_books(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize books (no BOS) into one uint16 array.

    Returns ``(ids, starts)``: ids [N] uint16, starts [n_books + 1] int64 with book b at
    ``ids[starts[b]:starts[b + 1]]``.
    """
    backend = tokenizer.backend_tokenizer
    # encode_batch_fast (tokenizers >= 0.21) skips offsets; same ids
    enc = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encs = enc(list(texts), add_special_tokens=False)
    lens = np.array([len(e.ids) for e in encs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    ids = np.empty(int(starts[-1]), dtype=np.uint16)
    for b, e in enumerate(encs):
        ids[starts[b] : starts[b + 1]] = e.ids
    return ids, starts


def distill_documents(
    books: Sequence[str],
    rng: np.random.Generator,
    n_books: int = 50,
    chars: tuple[int, int] = (6000, 20000),
    p_passkey: float = 0.35,
    p_facts: float = 0.20,
    facts: tuple[int, int] = (2, 6),
) -> list[str]:
    """Text documents for gate distillation (``seerattn distill`` joins them with BOOK_SEP).

    ``n_books`` books drawn by ``rng`` are cut into consecutive pieces of ``chars`` characters (uniform);
    with probability ``p_passkey`` a piece becomes a pass-key prompt (PASSKEY_INTRO, the needle at a
    random word boundary, PASSKEY_QUESTION and the key: the evaluation's template), with ``p_facts``
    it carries 2-6 "The code of NAME is NNNN." facts at random word boundaries with the facts restated,
    shuffled, at its end; the rest stays plain text. The retrieval pieces give the gate rows whose
    attention must reach far back: plain books alone have almost none.
    """
    if not 0 < chars[0] <= chars[1] or not 2 <= facts[0] <= facts[1] <= len(FIRST_NAMES):
        raise ValueError(
            f"need 0 < chars[0] <= chars[1] and 2 <= facts[0] <= facts[1], got chars={chars}, facts={facts}"
        )
    if p_passkey < 0 or p_facts < 0 or p_passkey + p_facts > 1:
        raise ValueError(f"p_passkey and p_facts must be >= 0 with a sum <= 1, got {p_passkey}, {p_facts}")
    picked = [books[i] for i in rng.permutation(len(books))[:n_books]]
    docs = []
    for book in picked:
        start = 0
        while start < len(book):
            end = min(start + int(rng.integers(chars[0], chars[1] + 1)), len(book))
            text, start = book[start:end], end
            if len(text) < chars[0] // 2:
                continue
            u = rng.random()
            if u < p_passkey:
                key = str(int(rng.integers(10_000, 100_000)))
                text = _insert_at_spaces(text, [" " + PASSKEY_NEEDLE.format(key=key) + " "], rng)
                text = f"{PASSKEY_INTRO} {text} {PASSKEY_QUESTION} {key}."
            elif u < p_passkey + p_facts:
                k = int(rng.integers(facts[0], facts[1] + 1))
                names = [FIRST_NAMES[i] for i in rng.choice(len(FIRST_NAMES), size=k, replace=False)]
                stated = [f"The code of {n} is {int(rng.integers(1000, 10_000))}." for n in names]
                text = _insert_at_spaces(text, [f" {f} " for f in stated], rng)
                text = text + " " + " ".join(stated[i] for i in rng.permutation(k))
            docs.append(text)
    return docs


def _insert_at_spaces(text: str, pieces: Sequence[str], rng: np.random.Generator) -> str:
    """Insert each piece after a distinct random space of ``text`` (in text order)."""
    spaces = np.flatnonzero(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) == ord(" "))
    if len(spaces) < len(pieces):
        raise ValueError(f"text has {len(spaces)} spaces, fewer than the {len(pieces)} pieces to insert")
    at = np.sort(rng.choice(spaces, size=len(pieces), replace=False))
    out, prev = [], 0
    for pos, piece in zip(at, pieces, strict=True):
        out += [text[prev : pos + 1], piece.strip(), " "]
        prev = pos + 1
    return "".join(out) + text[prev:]


# ----------------------------------------------------------------------------------------------------
# synthetic retrieval tasks, built in token space
# ----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One training row. ids [L] int64; weight [L] float32 (loss weight for predicting ids[t]);
    answer [L] int8 (0 = not an answer token, 1 dense, 2 facts, 3 passkey)."""

    ids: np.ndarray
    weight: np.ndarray
    answer: np.ndarray


class _Piece:
    """Token ids of a text piece with per-token weight/answer arrays."""

    __slots__ = ("ids", "weight", "answer")

    def __init__(self, ids: Sequence[int], weight: Sequence[float] | None = None, answer=None) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        n = len(self.ids)
        self.weight = np.ones(n, np.float32) if weight is None else np.asarray(weight, np.float32)
        self.answer = np.zeros(n, np.int8) if answer is None else np.asarray(answer, np.int8)

    def __len__(self) -> int:
        return len(self.ids)


def _cat(pieces: Sequence[_Piece]) -> _Piece:
    out = _Piece([])
    out.ids = np.concatenate([p.ids for p in pieces])
    out.weight = np.concatenate([p.weight for p in pieces])
    out.answer = np.concatenate([p.answer for p in pieces])
    return out


class SampleMaker:
    """Builds training/eval rows from a tokenized book array (see module docstring).

    ids/starts: output of :func:`encode_books`. All randomness comes from ``rng``.
    """

    def __init__(self, tokenizer, ids: np.ndarray, starts: np.ndarray, rng: np.random.Generator) -> None:
        self.ids, self.starts, self.rng = ids, starts, rng
        self.lens = np.diff(starts)
        self.bos = tokenizer.bos_token_id
        enc = tokenizer.backend_tokenizer

        def tk(text: str) -> list[int]:
            return enc.encode(text, add_special_tokens=False).ids

        self._tk = tk
        self.digit_ids = np.array([tk(str(d))[0] for d in range(10)], dtype=np.int64)
        self.space_id = tk(" ")
        if len(self.space_id) != 1 or any(len(tk(str(d))) != 1 for d in range(10)):
            raise RuntimeError("tokenizer must encode ' ' and each digit as exactly one token")
        self.first = [tk(" " + n) for n in FIRST_NAMES]
        self.last = [tk(" " + n) for n in LAST_NAMES]
        self.attr_the = [tk(" The " + a + " of") for a in ATTRIBUTES]  # " The room number of"
        self.attr_poss = [tk("'s " + a + " is") for a in ATTRIBUTES]  # "'s room number is"
        self.q_what = [tk(" What is the " + a + " of") for a in ATTRIBUTES]
        self.is_ = tk(" is")
        self.qmark = tk("?")
        self.dot = tk(".")
        self.pk_intro = tk(PASSKEY_INTRO)
        self.pk_needle_a = tk(" The pass key is")  # + key + "."
        self.pk_needle_b = tk(" Remember it.")  # + key + " is the pass key."
        self.pk_needle_c = tk(" is the pass key.")
        self.pk_question = tk(" " + PASSKEY_QUESTION)
        grass = tk(" " + GRASS_FILLER)
        self.grass = np.array(grass * (16384 // len(grass) + 2), dtype=np.int64)
        # Sentence boundaries: previous token ends a sentence, next token starts with a space.
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.ends_sentence = np.array([t is not None and t.endswith((".", "!", "?")) for t in vocab])
        self.starts_space = np.array([t is not None and t.startswith("Ġ") for t in vocab])

    # ---- building blocks ----
    def _digits(self, n: int) -> np.ndarray:
        d = self.rng.integers(0, 10, n)
        d[0] = self.rng.integers(1, 10)  # no leading zero
        return d

    def _value(self, digits: np.ndarray, role: str, kind: int) -> _Piece:
        """' ' + digit tokens; role 'fact' (unpredictable: weight 0) or 'answer' (marked)."""
        ids = np.concatenate([[self.space_id[0]], self.digit_ids[digits]])
        w = np.ones(len(ids), np.float32)
        a = np.zeros(len(ids), np.int8)
        if role == "fact":
            w[1:] = 0.0
        else:
            a[1:] = kind
        return _Piece(ids, w, a)

    def book_slice(self, n: int) -> np.ndarray:
        """n contiguous tokens of one book (books are >= 20k tokens; longer n spans two books)."""
        ok = np.nonzero(self.lens >= n)[0]
        if len(ok) == 0:
            start = int(self.rng.integers(0, len(self.ids) - n + 1))
            return self.ids[start : start + n].astype(np.int64)
        b = int(self.rng.choice(ok, p=self.lens[ok] / self.lens[ok].sum()))
        start = int(self.starts[b] + self.rng.integers(0, self.lens[b] - n + 1))
        return self.ids[start : start + n].astype(np.int64)

    def _boundaries(self, filler: np.ndarray) -> np.ndarray:
        """Positions i (1..n-1) where a piece can be inserted before filler[i] (sentence boundary)."""
        cand = np.nonzero(self.ends_sentence[filler[:-1]] & self.starts_space[filler[1:]])[0] + 1
        if len(cand) < 4:
            cand = np.arange(1, len(filler))
        return cand

    def _fact(self, kind: int):
        """A random fact. Returns (fact piece, query piece) about the same (attribute, name)."""
        r = self.rng
        a = int(r.integers(len(ATTRIBUTES)))
        name = self.first[int(r.integers(len(self.first)))] + self.last[int(r.integers(len(self.last)))]
        digits = self._digits(int(r.integers(3, 7)))
        if r.random() < 0.7:  # " The room number of Ada Moss is 4172."
            fact = _cat(
                [_Piece(self.attr_the[a] + name + self.is_), self._value(digits, "fact", kind), _Piece(self.dot)]
            )
        else:  # " Ada Moss's room number is 4172."
            fact = _cat([_Piece(name + self.attr_poss[a]), self._value(digits, "fact", kind), _Piece(self.dot)])
        # " What is the room number of Ada Moss? The room number of Ada Moss is 4172."
        query = _cat(
            [
                _Piece(self.q_what[a] + name + self.qmark + self.attr_the[a] + name + self.is_),
                self._value(digits, "answer", kind),
                _Piece(self.dot),
            ]
        )
        return fact, query, (a, tuple(name))

    def _unique_facts(self, k: int, kind: int):
        seen, out = set(), []
        while len(out) < k:
            f, q, key = self._fact(kind)
            if key not in seen:
                seen.add(key)
                out.append((f, q))
        return out

    @staticmethod
    def _insert(filler: np.ndarray, inserts: list[tuple[int, int, _Piece]]) -> _Piece:
        """Insert pieces into filler; inserts = (position, tie_order, piece), position in 0..len."""
        inserts = sorted(inserts, key=lambda x: (x[0], x[1]))
        parts, prev = [], 0
        for pos, _, piece in inserts:
            parts.append(_Piece(filler[prev:pos]))
            parts.append(piece)
            prev = pos
        parts.append(_Piece(filler[prev:]))
        return _cat(parts)

    def _finish(self, body: _Piece, L: int, bos: bool) -> Sample:
        if bos:
            body = _cat([_Piece([self.bos]), body])
        if len(body) != L:
            raise RuntimeError(f"built a sample of {len(body)} tokens, wanted {L}")
        return Sample(body.ids, body.weight, body.answer)

    # ---- sample kinds ----
    def book(self, L: int) -> Sample:
        bos = self.rng.random() < 0.5
        return self._finish(_Piece(self.book_slice(L - bos)), L, bos)

    def passkey(
        self,
        L: int,
        depth: float | None = None,
        key_len: int | None = None,
        grass: bool | None = None,
        intro: bool | None = None,
    ) -> Sample:
        """Pass-key retrieval: [BOS] [intro] filler(needle at depth) question + answer."""
        r = self.rng
        digits = self._digits(key_len if key_len is not None else int(r.choice([3, 4, 5, 5, 5, 6, 7])))
        intro = (r.random() < 0.7) if intro is None else intro
        grass = (r.random() < 0.1) if grass is None else grass
        depth = float(r.random()) if depth is None else depth
        needle = _cat(
            [
                _Piece(self.pk_needle_a),
                self._value(digits, "fact", 3),
                _Piece(self.dot),
                _Piece(self.pk_needle_b),
                _Piece(self._value(digits, "fact", 3).ids),
                _Piece(self.pk_needle_c),
            ]
        )
        question = _cat([_Piece(self.pk_question), self._value(digits, "answer", 3), _Piece(self.dot)])
        head = _Piece(self.pk_intro if intro else [])
        n_fill = L - 1 - len(head) - len(needle) - len(question)
        if n_fill < 8:
            raise ValueError(f"L={L} too short for a pass-key sample")
        if grass:
            off = int(r.integers(0, 20))
            filler = self.grass[off : off + n_fill]
        else:
            filler = self.book_slice(n_fill)
        cand = self._boundaries(filler)
        pos = int(cand[np.argmin(np.abs(cand - depth * n_fill))])
        body = _cat([head, self._insert(filler, [(pos, 0, needle)]), question])
        return self._finish(body, L, True)

    def facts(self, L: int, k: int | None = None) -> Sample:
        """k facts at random sentence boundaries of book text; each queried later (block or interleaved)."""
        r = self.rng
        if k is None:
            k = int(r.integers(2, max(3, min(24, L // 256)) + 1))
        pairs = self._unique_facts(k, 2)
        n_ins = sum(len(f) + len(q) for f, q in pairs)
        bos = r.random() < 0.5
        n_fill = L - bos - n_ins
        if n_fill < L // 4:
            raise ValueError(f"L={L} too short for {k} facts")
        filler = self.book_slice(n_fill)
        cand = self._boundaries(filler)
        inserts = []
        if r.random() < 0.5:  # all queries at the end, shuffled
            for f, _ in pairs:
                inserts.append((int(r.choice(cand)), 0, f))
            qs = [q for _, q in pairs]
            order = r.permutation(len(qs))
            inserts.append((n_fill, 1, _cat([qs[i] for i in order])))
        else:  # each query at a random boundary after its fact
            for f, q in pairs:
                i = int(r.integers(0, len(cand)))
                j = int(r.integers(i, len(cand)))
                inserts.append((int(cand[i]), 0, f))
                inserts.append((int(cand[j]) if j > i else n_fill, 1, q))
        return self._finish(self._insert(filler, inserts), L, bos)

    def dense(self, L: int) -> Sample:
        """Stream of facts and queries about earlier facts, no book text (dense retrieval supervision)."""
        r = self.rng
        seen: set = set()
        facts: list[_Piece] = []
        queries: list[_Piece] = []
        parts: list[_Piece] = [_Piece([self.bos])]
        n = 1
        p_new = float(r.uniform(0.3, 0.6))
        n_init = int(r.integers(1, 8))  # facts before the first query
        while True:
            if len(facts) < n_init or r.random() < p_new:
                f, q, key = self._fact(1)
                if key in seen:
                    continue
                seen.add(key)
                piece = f
                facts.append(f)
                queries.append(q)
            else:
                piece = queries[int(r.integers(len(queries)))]
            if n + len(piece) > L:
                break
            parts.append(piece)
            n += len(piece)
        if n < L:  # pad the tail with book text
            parts.append(_Piece(self.book_slice(L - n)))
        return self._finish(_cat(parts), L, False)

    def sample(self, L: int, mix: dict[str, float]) -> Sample:
        """One sample of a kind drawn from ``mix`` (kind -> probability)."""
        kinds = list(mix)
        p = np.array([mix[k] for k in kinds], dtype=np.float64)
        kind = kinds[int(self.rng.choice(len(kinds), p=p / p.sum()))]
        return getattr(self, kind)(L)

    def batch(self, B: int, L: int, mix: dict[str, float]) -> dict[str, np.ndarray]:
        """B samples stacked: ids [B, L] int64, weight [B, L] float32, answer [B, L] int8."""
        s = [self.sample(L, mix) for _ in range(B)]
        return {
            "ids": np.stack([x.ids for x in s]),
            "weight": np.stack([x.weight for x in s]),
            "answer": np.stack([x.answer for x in s]),
        }


def iter_segments(ids: np.ndarray, starts: np.ndarray, L: int, per_book: int) -> Iterator[np.ndarray]:
    """Up to ``per_book`` evenly spaced, non-overlapping L-token segments from each book (held-out eval)."""
    for b in range(len(starts) - 1):
        n = int(starts[b + 1] - starts[b])
        k = min(per_book, n // L)
        for j in range(k):
            off = int(starts[b]) + j * (n // max(k, 1))
            yield ids[off : off + L].astype(np.int64)
