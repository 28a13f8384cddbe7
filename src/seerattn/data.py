"""Where text comes from: the one resolution of ``--data`` (eval, quickstart) and a recipe's ``data`` (distill).

Training (:mod:`seerattn.train.data`) and evaluation (:mod:`seerattn.eval.data`) both call
:func:`resolve_data`, so a path means the same documents everywhere. Accepted sources:

- a **folder with** ``MANIFEST.tsv`` (tab-separated, columns ``file`` and ``split``, ``title`` used
  when present; the layout of ``data/books-sample`` and of the full books corpus): the files of the
  rows whose ``split`` is the one asked for (``train`` for distillation, ``test`` for evaluation);
- a **folder without a manifest**: every ``.txt`` / ``.txt.gz`` / ``.txt.xz`` / ``.jsonl[.gz|.xz]`` /
  ``.parquet`` file below it, sorted by path. There is no split: every file is evaluation data for
  ``seerattn eval`` and every file is training data for ``seerattn distill`` (keep held-out text in
  another folder, or add a manifest);
- a **file**: ``.txt[.gz|.xz]`` (one document, or several split at a separator in training),
  ``.jsonl[.gz|.xz]`` or ``.parquet`` (one document per row, the text in the column ``text_field``).

JSONL and parquet are read through the ``datasets`` library (``pip install 'seerattn[data]'``), from
the local files only (its packaged ``json`` / ``parquet`` readers, streamed: nothing is downloaded and
no Arrow copy of the data is written); plain text needs nothing beyond the standard library.
"""

from __future__ import annotations

import csv
import gzip
import logging
import lzma
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ACCEPTED",
    "MANIFEST",
    "DataFile",
    "file_kind",
    "iter_documents",
    "iter_table_texts",
    "read_manifest",
    "read_text",
    "resolve_data",
    "resolve_sources",
]

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.xz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
MANIFEST = "MANIFEST.tsv"
# What a data source may be, for error messages.
ACCEPTED = (
    f"a folder of {'/'.join(TEXT_SUFFIXES)} files (with or without {MANIFEST}), a folder of "
    f"{'/'.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files with a text column, or one such file"
)
DATA_EXTRA = "pip install 'seerattn[data]'"


@dataclass(frozen=True)
class DataFile:
    """One resolved data file.

    Attributes:
        path: the file.
        kind: ``"text"`` (the whole file is one document), ``"jsonl"`` or ``"parquet"`` (a document per row).
        title: the manifest's ``title`` when the file is listed in one with that column, else the file name.
    """

    path: Path
    kind: str
    title: str


def file_kind(path: Path) -> str | None:
    """``"text"``, ``"jsonl"``, ``"parquet"`` from the file name, or None for any other file."""
    name = path.name.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def read_manifest(folder: str | Path, split: str | None) -> list[DataFile]:
    """The files of ``folder/MANIFEST.tsv`` whose ``split`` column is ``split`` (every row for None), in manifest order.

    Raises a clear error for a malformed manifest, a split with no rows (naming the splits present),
    listed files that do not exist and listed files of a type no reader accepts.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    with manifest.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"file", "split"} <= set(rows[0]):
        raise ValueError(f"{manifest} must be tab-separated with at least the columns 'file' and 'split'")
    chosen = [r for r in rows if split is None or r["split"] == split]
    if not chosen:
        splits = sorted({r["split"] for r in rows})
        raise ValueError(f"{manifest} has no row with split={split!r}; splits present: {splits}")
    bad = [r["file"] for r in chosen if file_kind(Path(r["file"])) is None]
    if bad:
        raise ValueError(f"{manifest} lists files of unknown type {bad[:5]}; accepted endings: {ALL_SUFFIXES}")
    missing = [r["file"] for r in chosen if not (folder / r["file"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{manifest} lists {len(missing)} file(s) of split {split!r} that are not in {folder}: {missing[:5]}; "
            "copy them or remove their rows from the manifest"
        )
    return [DataFile(folder / r["file"], file_kind(Path(r["file"])), r.get("title") or r["file"]) for r in chosen]


def resolve_data(sources: str | Path | Sequence[str | Path], split: str = "train") -> list[DataFile]:
    """The data files named by ``sources`` (one path or several, see the module docstring), in a fixed order.

    ``split`` selects manifest rows; a folder without a manifest (logged) and a single file have no
    split: every document is used.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    files: list[DataFile] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            if (path / MANIFEST).is_file():
                files.extend(read_manifest(path, split))
                continue
            found = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p) is not None)
            if not found:
                raise ValueError(f"data folder {path} holds no {MANIFEST} and no file ending in {ALL_SUFFIXES}")
            logger.info("%s has no %s: all %d file(s) are used (no %r split)", path, MANIFEST, len(found), split)
            files.extend(DataFile(p, file_kind(p), str(p.relative_to(path))) for p in found)
        elif path.is_file():
            kind = file_kind(path)
            if kind is None:
                raise ValueError(f"data file {path}: unknown type; accepted: {ACCEPTED}")
            files.append(DataFile(path, kind, path.name))
        else:
            raise FileNotFoundError(f"data source {path} does not exist; accepted: {ACCEPTED}")
    return files


def resolve_sources(sources: str | Path | Sequence[str | Path], split: str = "train") -> list[Path]:
    """The paths of :func:`resolve_data` (for callers that key caches on files)."""
    return [f.path for f in resolve_data(sources, split)]


def read_text(path: Path) -> str:
    """The whole of a ``.txt`` / ``.txt.gz`` / ``.txt.xz`` file (UTF-8)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    if name.endswith(".xz"):
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def iter_table_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` value of every row of a JSONL or parquet file, in order, through ``datasets``.

    Only local files are read (the packaged ``json`` / ``parquet`` builders, streaming: no hub
    access, no cache copy of the data). Errors name the file and the row.
    """
    kind = file_kind(path)
    if kind not in ("jsonl", "parquet"):
        raise ValueError(f"{path} is not a JSONL or parquet file (endings {JSONL_SUFFIXES + PARQUET_SUFFIXES})")
    try:
        import datasets
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"reading {path} needs the `datasets` library, which is not installed: {DATA_EXTRA} "
            f"(plain {'/'.join(TEXT_SUFFIXES)} files need nothing more)",
            name="datasets",  # the CLI reports a missing extra in one line by this name
        ) from e
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: expected one row per document with a {text_field!r} column (text_field)")
    builder = "json" if kind == "jsonl" else "parquet"
    try:  # pyarrow's ArrowInvalid (bad JSON, not a parquet file) is a ValueError
        rows = iter(datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True))
    except (ValueError, StopIteration) as e:  # StopIteration: a file with no rows
        raise ValueError(f"{path}: could not be read as {kind}: {e!r}") from e
    n = 0  # rows read so far; errors name rows 1-based
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except ValueError as e:
            raise ValueError(f"{path}: could not be read as {kind}: {e!r}") from e
        n += 1
        value = row.get(text_field)
        if not isinstance(value, str):
            what = f"a value of type {type(value).__name__}" if value is not None else "no value"
            raise ValueError(
                f"{path}: row {n} has {what} in column {text_field!r} (columns: {sorted(row)}); every row needs a "
                f"string {text_field!r} (text_field)"
            )
        yield value


def iter_documents(files: Sequence[Path], text_field: str = "text", separator: str | None = None) -> Iterator[str]:
    """Documents of ``files`` in order: a text file is one document (or several, split at ``separator``);
    a JSONL / parquet file gives one document per row (column ``text_field``)."""
    for path in files:
        kind = file_kind(path)
        if kind == "text":
            text = read_text(path)
            if separator:
                yield from (d for d in text.split(separator) if d)
            else:
                yield text
        elif kind in ("jsonl", "parquet"):
            yield from iter_table_texts(path, text_field)
        else:
            raise ValueError(f"data file {path}: unknown type; accepted endings: {ALL_SUFFIXES}")
