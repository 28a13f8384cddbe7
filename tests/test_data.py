"""``--data`` / recipe ``data``: one resolution for training and evaluation, every accepted kind, clear errors.

Tiny files in ``tmp_path``; a character tokenizer stands in for a Hugging Face one where only
``tokenizer(text, add_special_tokens=False)`` is needed (evaluation), the testbed's tokenizer where
packing needs BOS/EOS and a vocabulary (training).
"""

from __future__ import annotations

import csv
import gzip
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seerattn.data import DataFile, iter_documents, read_manifest, resolve_data, resolve_sources
from seerattn.eval.data import TokenizedBooks, segment_windows
from seerattn.train import data as train_data

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "books-sample"
ACCEPTED = r"accepted: a folder of \.txt/\.txt\.gz/\.txt\.xz files \(with or without MANIFEST\.tsv\)"


class CharTokenizer:
    """One token per character (code point mod 256): enough for TokenizedBooks and segment_windows."""

    bos_token_id = 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 256 for c in text]}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix)
    if opener is None:
        path.write_text(text, encoding="utf-8")
    else:
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _books(folder: Path) -> Path:
    """A books folder: two train files and one test file with a MANIFEST.tsv (title column present)."""
    rows = ["file\ttitle\tsplit"]
    for name, title, split, text in [
        ("b.txt.gz", "Bee", "train", "bee text"),
        ("a.txt", "Ay", "test", "ay text"),
        ("c.txt.gz", "Cee", "train", "cee text"),
    ]:
        _write(folder / name, text)
        rows.append(f"{name}\t{title}\t{split}")
    (folder / "MANIFEST.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def _eval_texts(books: TokenizedBooks) -> list[str]:
    return [books.text(i) for i in range(len(books))]


def _same_for_train_and_eval(source, split: str) -> list[str]:
    """The documents training reads from ``source`` equal those evaluation reads (one resolution)."""
    train = list(train_data.iter_documents(train_data.resolve_sources([source], split)))
    evaluated = _eval_texts(TokenizedBooks(source, CharTokenizer(), split=split))
    assert train == evaluated
    return train


# ------------------------------------------------------------------------------- accepted kinds
def test_books_folder_with_manifest(tmp_path):
    books = _books(tmp_path / "books")
    assert [f.path.name for f in resolve_data(books, "train")] == ["b.txt.gz", "c.txt.gz"]  # manifest order
    assert resolve_data(books, "test") == [DataFile(books / "a.txt", "text", "Ay")]
    assert [f.title for f in read_manifest(books, None)] == ["Bee", "Ay", "Cee"]
    assert _same_for_train_and_eval(books, "train") == ["bee text", "cee text"]
    assert _same_for_train_and_eval(books, "test") == ["ay text"]
    assert [b.title for b in TokenizedBooks(books, CharTokenizer(), split="train").books] == ["Bee", "Cee"]


def test_folder_without_manifest_is_all_data_for_both(tmp_path, caplog):
    folder = tmp_path / "plain"
    _write(folder / "z.txt", "zed")
    _write(folder / "sub" / "m.txt.gz", "em")
    _write(folder / "a.txt.gz", "ay")
    (folder / "notes.md").write_text("not data")  # other files are not data
    with caplog.at_level("INFO", logger="seerattn.data"):
        assert [f.title for f in resolve_data(folder, "test")] == ["a.txt.gz", "sub/m.txt.gz", "z.txt"]
    assert "has no MANIFEST.tsv: all 3 file(s) are used (no 'test' split)" in caplog.text
    # no split: evaluation (split test) and training (split train) both read every file
    assert _same_for_train_and_eval(folder, "test") == ["ay", "em", "zed"]
    assert _same_for_train_and_eval(folder, "train") == ["ay", "em", "zed"]


@pytest.mark.parametrize("name", ["book.txt", "book.txt.gz", "book.txt.xz"])
def test_single_text_file(tmp_path, name):
    text = "one whole book\nwith two lines"
    path = _write(tmp_path / name, text)
    assert resolve_data(path) == [DataFile(path, "text", name)]
    assert _same_for_train_and_eval(path, "test") == [text]
    assert _same_for_train_and_eval(str(path), "train") == [text]  # a str works as well as a Path


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.xz"])
def test_jsonl_file_one_document_per_row(tmp_path, name):
    pytest.importorskip("datasets")
    rows = [{"text": "first doc", "id": 1}, {"text": "second doc", "id": 2}]
    path = _jsonl(tmp_path / name, rows)
    assert resolve_data(path)[0].kind == "jsonl"
    assert _same_for_train_and_eval(path, "test") == ["first doc", "second doc"]
    books = TokenizedBooks(path, CharTokenizer())
    assert [(b.title, b.row) for b in books.books] == [(f"{name}#0", 0), (f"{name}#1", 1)]
    assert books.tokens(1, 3).tolist() == [ord(c) for c in "second doc"]


def test_parquet_and_a_folder_of_tables_with_another_text_column(tmp_path):
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "tables"
    folder.mkdir()
    pq.write_table(pa.table({"body": ["p one", "p two"], "n": [1, 2]}), folder / "b.parquet")
    _jsonl(folder / "a.jsonl", [{"body": "j one"}])
    files = resolve_sources(folder)
    assert [p.name for p in files] == ["a.jsonl", "b.parquet"]
    expected = ["j one", "p one", "p two"]
    assert list(iter_documents(files, text_field="body")) == expected
    assert _eval_texts(TokenizedBooks(folder, CharTokenizer(), text_field="body")) == expected
    assert len(TokenizedBooks(folder, CharTokenizer(), text_field="body", max_books=2)) == 2


def test_mixed_folder_and_several_sources_keep_order(tmp_path):
    pytest.importorskip("datasets")
    books = _books(tmp_path / "books")
    extra = _jsonl(tmp_path / "extra.jsonl", [{"text": "row doc"}])
    assert [p.name for p in resolve_sources([extra, books])] == ["extra.jsonl", "b.txt.gz", "c.txt.gz"]
    assert list(iter_documents(resolve_sources([extra, books]))) == ["row doc", "bee text", "cee text"]


def test_repository_sample_is_the_default_and_holds_long_test_books():
    """data/books-sample: test books long enough for the quickstart's and eval's default windows."""
    test = resolve_data(SAMPLE, "test")
    assert [f.title for f in test] == ["The Son of Tarzan", "Persuasion", "Emma"]
    assert [f.path.name for f in resolve_data(SAMPLE, "train")] == ["00011.txt.gz", "00012.txt.gz"]
    assert sum(f.path.stat().st_size for f in resolve_data(SAMPLE, "test")) < 4_000_000
    books = TokenizedBooks(SAMPLE, CharTokenizer())
    windows = segment_windows(books, 4096, 8, span=16384)
    assert len(windows) == 8 and all(w.shape == (4096,) for w in windows)
    with (SAMPLE / "MANIFEST.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:  # byte copies of the corpus: each decompresses to its manifest's character count
        with gzip.open(SAMPLE / r["file"], "rt", encoding="utf-8") as book:
            assert len(book.read()) == int(r["chars"])
    from seerattn.cli.eval import DEFAULT_DATA

    assert (ROOT / DEFAULT_DATA).resolve() == SAMPLE.resolve()


# ------------------------------------------------------------------------------------- errors
def test_missing_path_and_unknown_kinds_name_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"data source {tmp_path / 'nope'} does not exist; {ACCEPTED}"):
        resolve_data(tmp_path / "nope")
    csv_file = _write(tmp_path / "table.csv", "a,b\n")
    with pytest.raises(ValueError, match=rf"data file {csv_file}: unknown type; {ACCEPTED}"):
        resolve_data(csv_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"holds no MANIFEST.tsv and no file ending in \('.txt'"):
        resolve_data(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # evaluation: the same error
        TokenizedBooks(tmp_path / "nope", CharTokenizer())
    with pytest.raises(ValueError, match="max_books must be a positive number"):
        TokenizedBooks(_books(tmp_path / "books"), CharTokenizer(), max_books=0)


def test_manifest_errors(tmp_path):
    books = _books(tmp_path / "books")
    with pytest.raises(ValueError, match=r"no row with split='dev'; splits present: \['test', 'train'\]"):
        resolve_data(books, "dev")
    (books / "c.txt.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 1 file\(s\) of split 'train' that are not in .*\['c.txt.gz'\]"):
        resolve_data(books, "train")
    (books / "MANIFEST.tsv").write_text("file\tsplit\nx.doc\ttest\n")
    with pytest.raises(ValueError, match=r"lists files of unknown type \['x.doc'\]"):
        resolve_data(books, "test")
    (books / "MANIFEST.tsv").write_text("name,split\na.txt,test\n")
    with pytest.raises(ValueError, match="must be tab-separated with at least the columns 'file' and 'split'"):
        resolve_data(books, "test")


def test_table_errors_name_file_and_row(tmp_path):
    pytest.importorskip("datasets")
    no_text = _jsonl(tmp_path / "no_text.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(ValueError, match=r"no_text.jsonl: row 2 has no value in column 'text' \(columns: \['body'"):
        list(iter_documents([no_text]))
    ints = _jsonl(tmp_path / "ints.jsonl", [{"text": 7}])
    with pytest.raises(ValueError, match=r"ints.jsonl: row 1 has a value of type int in column 'text'"):
        TokenizedBooks(ints, CharTokenizer())
    broken = _write(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": oops\n')
    with pytest.raises(ValueError, match="broken.jsonl: could not be read as jsonl"):
        list(iter_documents([broken]))
    fake = _write(tmp_path / "fake.parquet", "not parquet at all")
    with pytest.raises(ValueError, match="fake.parquet: could not be read as parquet"):
        list(iter_documents([fake]))
    empty = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        list(iter_documents([empty]))


def test_tables_without_datasets_name_the_extra(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": "x"}])
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"docs.jsonl needs the `datasets` library.*seerattn\[data\]"):
        list(iter_documents([path]))
    with pytest.raises(ModuleNotFoundError, match=r"seerattn\[data\]"):
        TokenizedBooks(path, CharTokenizer())
    _write(tmp_path / "t.txt", "plain text needs nothing")
    assert list(iter_documents([tmp_path / "t.txt"])) == ["plain text needs nothing"]


def test_tables_are_read_without_network(tmp_path):
    """The datasets readers run with the hub switched off (local packaged builders only)."""
    pytest.importorskip("datasets")
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": "offline"}])
    code = (
        "from seerattn.data import iter_documents, resolve_sources; "
        f"print(list(iter_documents(resolve_sources({str(path)!r}))))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['offline']"


# -------------------------------------------------------------------------------------- CLIs
def test_cli_data_errors_come_before_the_model(tmp_path, monkeypatch, capsys):
    """A wrong --data stops quickstart (one line) and eval before any weights are loaded."""
    pytest.importorskip("transformers")
    from seerattn.cli import main

    monkeypatch.chdir(ROOT)
    import seerattn.eval as ev

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(ev, "load_eval_model", no_model)
    bad = _write(tmp_path / "data.csv", "a,b")
    assert main(["quickstart", "--fast", "--data", str(bad), "-o", str(tmp_path / "q")]) == 2
    out, err = capsys.readouterr()
    assert "passkey prompts of 512 tokens" in out  # the plan is printed first
    assert f"seerattn quickstart: error: data file {bad}: unknown type; accepted: a folder of" in err
    nope = tmp_path / "nope"
    assert main(["eval", "ppl", "--model", "testbed/model", "--data", str(nope), "-o", str(tmp_path / "e")]) == 2
    assert f"seerattn eval: error: data source {nope} does not exist; accepted: a folder of" in capsys.readouterr().err


def test_quickstart_estimate_grows_with_the_work():
    from seerattn.cli.quickstart import _plan, estimate_seconds

    fast, default = estimate_seconds(512, 1, "cpu"), estimate_seconds(4096, 2, "cpu")
    assert 0 < fast < default and estimate_seconds(4096, 8, "cpu") > default
    assert estimate_seconds(4096, 2, "cuda") is None
    assert "2 window(s) and 3 passkey prompts of 4096 tokens" in _plan(4096, 2, "cpu")
    assert "GPU" in _plan(4096, 2, "cuda")


def test_sample_through_the_testbed_tokenizer():
    """The sample's test books tokenise to non-empty windows through the real tokenizer (fresh-clone data)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "testbed" / "model")
    books = TokenizedBooks(SAMPLE, tok)
    w = segment_windows(books, 256, 3)
    assert [int(x.numel()) for x in w] == [256, 256, 256]
    assert not torch.equal(w[0], w[1])


def test_recipes_default_data_lives_in_the_repository(monkeypatch):
    """No recipe's data points outside the repository; the testbed recipe's resolves from a fresh clone."""
    yaml = pytest.importorskip("yaml")
    monkeypatch.chdir(ROOT)
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        data = yaml.safe_load(recipe.read_text())["data"]
        assert all(not Path(d).is_absolute() and ".." not in Path(d).parts for d in data), (recipe.name, data)
    from seerattn.train import load_recipe

    config = load_recipe("recipes/testbed.yaml", [])
    files = resolve_sources(config.data, config.data_split)
    assert [p.name for p in files] == ["00011.txt.gz", "00012.txt.gz"]  # the sample's train books, never test


# ------------------------------------------------------------------------- token cache (issue 14 item 3)
@pytest.fixture(scope="module")
def testbed_tokenizer():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "testbed" / "model")


def _cache(tmp_path: Path, tok, **kw):
    docs = tmp_path / "docs"
    if not docs.is_dir():
        for i, text in enumerate(["the king and the queen", "a river of stone", "blue doors open slowly"]):
            _write(docs / f"{i}.txt", text)
    return train_data.prepare_tokens([docs], tok, tmp_path / "cache", shuffle=False, **kw)


def test_token_cache_damaged_at_the_same_size_is_rebuilt_or_named(tmp_path, testbed_tokenizer, caplog):
    tf = _cache(tmp_path, testbed_tokenizer)
    good = tf.path.read_bytes()
    damaged = bytearray(good)
    damaged[2:4] = bytes([damaged[2] ^ 0xFF, damaged[3] ^ 0x0F])  # same size, other ids
    tf.path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"token cache {tf.path} does not match the sha256"):
        _cache(tmp_path, testbed_tokenizer, build=False)  # a rank that may not rebuild: stops, naming the file
    with caplog.at_level("WARNING", logger="seerattn.train.data"):
        again = _cache(tmp_path, testbed_tokenizer)  # rank 0: rebuilds
    assert f"token cache {tf.path} does not match the sha256" in caplog.text and "rebuilding" in caplog.text
    assert again.path.read_bytes() == good and again.digest == tf.digest


def test_token_cache_truncated_or_without_sidecar_is_rebuilt_or_named(tmp_path, testbed_tokenizer, caplog):
    tf = _cache(tmp_path, testbed_tokenizer)
    good = tf.path.read_bytes()
    tf.path.write_bytes(good[:-6])
    with pytest.raises(ValueError, match=rf"token cache {tf.path} has {len(good) - 6} bytes; its sidecar says"):
        _cache(tmp_path, testbed_tokenizer, build=False)
    with caplog.at_level("WARNING", logger="seerattn.train.data"):
        assert _cache(tmp_path, testbed_tokenizer).path.read_bytes() == good
    assert f"{tf.path} has {len(good) - 6} bytes" in caplog.text
    meta = tf.path.with_suffix(".json")
    meta.write_text('{"dtype": "uint16", "n_tok')  # a torn sidecar
    with pytest.raises(ValueError, match=rf"token cache sidecar {meta} is unreadable"):
        _cache(tmp_path, testbed_tokenizer, build=False)
    assert _cache(tmp_path, testbed_tokenizer).path.read_bytes() == good
    tf.path.unlink()  # sidecar without its ids
    with pytest.raises(ValueError, match=rf"token cache {tf.path} has no file; its sidecar says"):
        _cache(tmp_path, testbed_tokenizer, build=False)
    assert _cache(tmp_path, testbed_tokenizer).path.read_bytes() == good


def test_stale_tmp_of_a_killed_tokenisation_is_removed(tmp_path, testbed_tokenizer):
    tf = _cache(tmp_path, testbed_tokenizer)
    dead_pid = 2**31 - 2  # above any pid_max: no such process
    stale = [
        tf.path.with_name(f".{tf.path.name}.tmp-{dead_pid}"),
        tf.path.with_name(f".{tf.path.stem}.json.tmp-{dead_pid}"),
    ]
    live = tf.path.with_name(f".{tf.path.name}.tmp-{os.getpid()}")  # a tokenisation still running: kept
    other = tf.path.with_name(f".tokens-otherkey.bin.tmp-{dead_pid}")  # another data set's: not ours to judge
    for p in [*stale, live, other]:
        p.write_bytes(b"partial")
    _cache(tmp_path, testbed_tokenizer, build=False)  # ranks that only read never delete
    assert all(p.exists() for p in [*stale, live, other])
    _cache(tmp_path, testbed_tokenizer)
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
