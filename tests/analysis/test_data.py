"""interp.data: corpora and their rows, harvesting to disk (resumable, kill-safe, many processes),
and reading the store back.

Most tests use the tiny model of ``harvest_worker`` (``support.TINY`` with a char-level tokenizer:
one token per character, so documents and rows are easy to reason about). The kill/resume and
distributed tests run ``harvest_worker.py`` in subprocesses; the CLI tests save the tiny model as
a Hugging Face directory with a small SentencePiece ``tokenizer.model`` trained here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import harvest_worker as hw
import pytest
import torch
from harvest_worker import CharTokenizer

from interp.data import ActivationStore, Corpus, CorpusError, HarvestError, StoreError, harvest
from interp.data.corpus import BOS_DOC, PAD_DOC
from interp.hooks import UnknownSiteError

WORKER = Path(hw.__file__).resolve()
SITES = hw.SITES
CTX = hw.CONTEXT


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model():
    """The tiny model with the char-level tokenizer (read-only: tests that need other weights build their own)."""
    m = hw.build_model()
    yield m
    assert not m.registry.active, "a test left hooks on the shared model"


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> Path:
    """An uninterrupted single-process run of ``harvest_worker.run`` (10 shards of 4 rows)."""
    out = tmp_path_factory.mktemp("reference") / "store"
    hw.run(model, out)
    return out


@contextlib.contextmanager
def intact(m):
    """After the block (which may raise): no hooks left and logits bit-identical to before."""
    ids = torch.tensor([[2, 40, 41, 42, 7, 8]])
    before = m(ids)
    try:
        yield
    finally:
        assert not m.registry.active
        assert torch.equal(m(ids), before)


def files(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (hidden ones included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def st_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def assert_same_store(a: Path, b: Path) -> None:
    """The two harvest directories hold the same store: first what the files say (plan, manifest,
    rows, every shard's tensors and metadata), then, last, every file byte for byte."""
    from safetensors.torch import load_file

    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb), "the two directories hold different files"
    assert not [n for n in fa if n.startswith(".")], f"temporary files left in {a}: {sorted(fa)}"
    for name in ("plan.json", "manifest.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    for name in sorted(n for n in fa if n.endswith(".safetensors")):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert sorted(ta) == sorted(tb), name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{name}: {key} differs"
        assert st_header(a / name).get("__metadata__") == st_header(b / name).get("__metadata__"), name
    differ = sorted(n for n in fa if fa[n] != fb[n])
    assert not differ, (f"same tensors and metadata, but these files are not byte-identical: {differ}; e.g. the "
                        f"headers of {differ[0]} start {(a / differ[0]).read_bytes()[8:70]!r} and "
                        f"{(b / differ[0]).read_bytes()[8:70]!r}")


def harvest_batches(n_rows: int, shard_rows: int, batch: int):
    """The (start, stop) row ranges of the forward passes a harvest makes (per shard, then per batch)."""
    for lo in range(0, n_rows, shard_rows):
        hi = min(lo + shard_rows, n_rows)
        for a in range(lo, hi, batch):
            yield a, min(a + batch, hi)


def expected(m, rows, sites, *, batch: int, shard_rows: int, dtype=torch.bfloat16):
    """run_with_cache over the same rows in the same batches (no stop_at_layer), cast to ``dtype``."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for a, b in harvest_batches(rows.n_rows, shard_rows, batch):
        mask = rows.mask[a:b]
        _, cache = m.run_with_cache(rows.ids[a:b], sites, attention_mask=None if bool(mask.all()) else mask)
        for s in sites:
            out[s].append(cache[s].to(dtype))
    return {s: torch.cat(v) for s, v in out.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(out: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kwargs)


DOCS = ["The cat sat on the mat.", "", "A second document,\nwith two lines.", "x" * 40, "short",
        "Numbers 0123456789 and symbols !?#.", "   ", "last one here"]


# ---------------------------------------------------------------------- corpus: sources
def test_list_corpus_skips_empty_documents():
    c = Corpus(DOCS)
    assert list(c.documents()) == [d for d in DOCS if d.strip()]
    assert c.name == f"{len(DOCS)} texts" and Corpus(DOCS, name="mine").name == "mine"
    assert c.describe()["sha256"] == c.identity() and len(c.identity()) == 64


def test_txt_blank_line_blocks_and_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nstill first\n\n\n  \nsecond\n\nthird a\nthird b", encoding="utf-8")
    assert list(Corpus(path).documents()) == ["first line\nstill first", "second", "third a\nthird b"]
    assert list(Corpus(str(path), split="line").documents()) == ["first line", "still first", "second", "third a",
                                                                  "third b"]
    assert Corpus(path).name == "corpus.txt"
    # the same documents from a list have the same identity (what they say, not where they came from)
    assert Corpus(path).identity() == Corpus(["first line\nstill first", "second", "third a\nthird b"]).identity()
    with pytest.raises(CorpusError, match="split must be 'blank' or 'line'"):
        Corpus(path, split="para")


def test_jsonl_text_and_custom_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "alpha", "body": "one"}, {"text": "beta\nbeta", "body": "two"}, {"text": "", "body": "three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(Corpus(path).documents()) == ["alpha", "beta\nbeta"]  # the empty text is skipped
    assert list(Corpus(path, field="body").documents()) == ["one", "two", "three"]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n{"text": "never read"}\n', encoding="utf-8")
    c = Corpus(path)  # read lazily: the error comes when the documents are read
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:3 is not JSON"):
        list(c.documents())
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3 is not JSON"):
        c.rows(CharTokenizer(), 4)


@pytest.mark.parametrize("line", ['{"body": "no text"}', '{"text": 3}', '["text"]', '"text"'])
def test_jsonl_line_without_the_text_field(tmp_path, line):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.jsonl:2 has no string field 'text'"):
        Corpus(path).identity()


def test_corpus_source_errors(tmp_path):
    with pytest.raises(CorpusError, match="no corpus file at .*missing.txt"):
        Corpus(tmp_path / "missing.txt")
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"c\.csv: a corpus file is \.txt or \.jsonl"):
        Corpus(tmp_path / "c.csv")
    with pytest.raises(CorpusError, match="not one string"):
        Corpus("a text\nwith a newline is not a path")


# ---------------------------------------------------------------------- corpus: rows
def test_packed_rows_trace_every_token_to_its_document(tok):
    c = Corpus(DOCS)
    docs = list(c.documents())
    rows = c.rows(tok, 12)
    assert rows.packed and rows.context == 12 and rows.ids.shape == (rows.n_rows, 12)
    assert rows.ids.dtype == torch.long and rows.doc.shape == rows.pos.shape == rows.ids.shape
    assert (rows.ids[:, 0] == 2).all() and (rows.doc[:, 0] == BOS_DOC).all() and (rows.pos[:, 0] == 0).all()
    assert (rows.doc[:, 1:] >= 0).all(), "packed rows are full: no padding"
    assert rows.n_tokens() == rows.n_rows * 12 and bool(rows.mask.all())
    stream = [t for d in docs for t in tok.encode(d, bos=False)]
    assert rows.n_rows == len(stream) // 11  # only the last, partial row is dropped
    # every token goes back to (document, token index), and each document reads back in order
    got: dict[int, list[tuple[int, int]]] = {}
    for r in range(rows.n_rows):
        for j in range(1, 12):
            got.setdefault(int(rows.doc[r, j]), []).append((int(rows.pos[r, j]), int(rows.ids[r, j])))
    assert sorted(got) == list(range(len(got)))
    last = max(got)
    for d, items in got.items():
        positions = [p for p, _ in items]
        assert positions == list(range(len(items))), f"document {d}: positions {positions}"
        want = tok.encode(docs[d], bos=False)
        assert [t for _, t in items] == (want if d < last else want[:len(items)]), f"document {d}"
    assert rows.n_docs == len(docs)


def test_packed_rows_stop_at_max_tokens(tok):
    c = Corpus(DOCS)
    full = c.rows(tok, 8)
    for budget in (8, 20, 24, 31):
        rows = c.rows(tok, 8, max_tokens=budget)
        assert rows.n_rows == budget // 8 and rows.n_tokens() <= budget
        assert torch.equal(rows.ids, full.ids[:rows.n_rows]) and torch.equal(rows.doc, full.doc[:rows.n_rows])


def test_unpacked_rows_one_per_document_truncated_and_padded(tok):
    c = Corpus(DOCS)
    docs = list(c.documents())
    rows = c.rows(tok, 10, pack=False)
    assert not rows.packed and rows.n_rows == len(docs) == rows.n_docs
    for r, d in enumerate(docs):
        toks = tok.encode(d, bos=False)[:9]
        n = len(toks) + 1
        assert rows.ids[r].tolist() == [2] + toks + [0] * (10 - n)
        assert rows.doc[r].tolist() == [BOS_DOC] + [r] * len(toks) + [PAD_DOC] * (10 - n)
        assert rows.pos[r].tolist() == [0] + list(range(len(toks))) + [0] * (10 - n)
        assert rows.mask[r].tolist() == [1] * n + [0] * (10 - n)
    assert rows.n_tokens() == sum(min(len(d), 9) + 1 for d in docs)
    assert (rows.doc == PAD_DOC).any() and (rows.doc[docs.index("x" * 40)] != PAD_DOC).all()
    # max_tokens counts real tokens only; a document that does not fit ends the rows
    budget = rows.mask[:3].sum().item()
    cut = c.rows(tok, 10, pack=False, max_tokens=int(budget) + 1)
    assert cut.n_rows == 3 and torch.equal(cut.ids, rows.ids[:3])


def test_rows_are_deterministic_and_identity_follows_the_text(tok):
    a, b = Corpus(DOCS).rows(tok, 12), Corpus(list(DOCS)).rows(tok, 12)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("ids", "doc", "pos"))
    assert Corpus(DOCS).identity() == Corpus(list(DOCS)).identity()
    changed = list(DOCS)
    changed[2] = changed[2].replace("second", "Second")
    assert Corpus(changed).identity() != Corpus(DOCS).identity()
    assert Corpus(DOCS[:-1]).identity() != Corpus(DOCS).identity()
    assert Corpus(["ab", "c"]).identity() != Corpus(["a", "bc"]).identity()  # document boundaries count


def test_rows_errors(tok):
    for context in (1, 0, True, 4.0):
        with pytest.raises(CorpusError, match="context must be an int of at least 2"):
            Corpus(DOCS).rows(tok, context)
    with pytest.raises(CorpusError, match=r"gives no row of 50 tokens \(pack=True needs"):
        Corpus(["short", "texts"]).rows(tok, 50)
    with pytest.raises(CorpusError, match="gives no row"):
        Corpus([" ", ""]).rows(tok, 4, pack=False)


# ---------------------------------------------------------------------- store round trip
@pytest.fixture(scope="module")
def packed(model, tmp_path_factory):
    """Three sites over DOCS packed in rows of 12, 5 rows per shard, 3 rows per forward."""
    out = tmp_path_factory.mktemp("packed") / "store"
    store = harvest(model, DOCS, SITES, out, context=12, batch_size=3, shard_tokens=60, progress=False)
    return store, Corpus(DOCS).rows(model.tokenizer, 12)


def test_store_equals_run_with_cache_in_bfloat16(model, packed):
    store, rows = packed
    assert sorted(store.sites) == sorted(SITES) and store.dtype == torch.bfloat16 and store.shard_rows == 5
    assert store.n_rows == rows.n_rows and store.context == 12 and store.positions == list(range(12))
    assert torch.equal(store.ids, rows.ids) and torch.equal(store.doc, rows.doc) and torch.equal(store.pos, rows.pos)
    assert store.manifest["n_tokens"] == rows.n_rows * 12 and bool(store.valid().all())
    assert len(store.manifest["shards"]) == -(-rows.n_rows // 5) >= 3
    want = expected(model, rows, SITES, batch=3, shard_rows=5)
    dims = {"blocks.1.resid_post": (32,), "blocks.3.mlp.hidden": (64,), "embed": (32,)}
    for site in SITES:
        view = store[site]
        assert view.shape == (rows.n_rows, 12, *dims[site]) and len(view) == rows.n_rows
        assert view.dtype == torch.bfloat16
        got = view[:]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want[site]), site
        assert torch.equal(view[7], want[site][7]) and torch.equal(view[-1], want[site][-1])
        assert torch.equal(view[[9, 0, 9, 4]], want[site][[9, 0, 9, 4]])  # across shards, repeated, any order
        assert torch.equal(view[2:11:3], want[site][2:11:3])
    assert "3 sites" in repr(store) and "bfloat16" in repr(store) and "embed" in repr(store["embed"])
    with pytest.raises(IndexError, match=f"row {rows.n_rows} is outside"):
        store["embed"][[0, rows.n_rows]]
    with pytest.raises(KeyError, match="was not harvested"):
        store["blocks.0.resid_post"]


@pytest.mark.parametrize("positions, kept", [(-1, [11]), (slice(1, None), list(range(1, 12))), ([0, -1], [0, 11])])
def test_positions_store_only_those_positions(model, packed, tmp_path, positions, kept):
    full, _ = packed
    store = harvest(model, DOCS, SITES, tmp_path / "h", context=12, batch_size=3, shard_tokens=60,
                    positions=positions, progress=False)
    assert store.positions == kept and store.manifest["n_tokens"] == store.n_rows * len(kept)
    for site in SITES:
        assert store[site].shape[:2] == (full.n_rows, len(kept))
        assert torch.equal(store[site][:], full[site][:][:, kept]), site
    assert sum(x.shape[0] for x in store.batches("embed", 7, shuffle=False)) == store.n_rows * len(kept)


def test_float32_store_is_exact(model, tmp_path):
    rows = Corpus(DOCS).rows(model.tokenizer, 12)
    store = harvest(model, DOCS, SITES, tmp_path / "h", context=12, batch_size=3, shard_tokens=60,
                    dtype=torch.float32, progress=False)
    assert store.dtype == torch.float32 and store.manifest["dtype"] == "float32"
    want = expected(model, rows, SITES, batch=3, shard_rows=5, dtype=torch.float32)
    for site in SITES:
        assert torch.equal(store[site][:], want[site]), site


@pytest.mark.parametrize("sites", [["embed"], ["logits", "blocks.5.resid_post"]])
def test_first_and_last_sites(model, tmp_path, sites):
    """embed alone (the run stops before layer 0) and the logits (the run goes to the end)."""
    rows = Corpus(DOCS).rows(model.tokenizer, 12)
    store = harvest(model, DOCS, sites, tmp_path / "h", context=12, batch_size=3, shard_tokens=60, progress=False)
    want = expected(model, rows, sites, batch=3, shard_rows=5)
    for site in sites:
        assert torch.equal(store[site][:], want[site]), site


@pytest.fixture(scope="module")
def unpacked(model, tmp_path_factory):
    """One document per row, rows of 10 (so some are cut, most are padded), 3 rows per shard."""
    out = tmp_path_factory.mktemp("unpacked") / "store"
    store = harvest(model, DOCS, SITES, out, context=10, batch_size=2, shard_tokens=30, pack=False, progress=False)
    return store, Corpus(DOCS).rows(model.tokenizer, 10, pack=False)


def test_unpacked_store_values_and_padding(model, unpacked):
    store, rows = unpacked
    assert store.manifest["pack"] is False and store.n_rows == rows.n_rows and torch.equal(store.doc, rows.doc)
    assert torch.equal(store.valid(), rows.doc != PAD_DOC) and store.manifest["n_tokens"] == rows.n_tokens()
    want = expected(model, rows, SITES, batch=2, shard_rows=3)
    valid = store.valid()
    for site in SITES:
        assert torch.equal(store[site][:][valid], want[site][valid]), site


def test_batches_yield_exactly_the_real_tokens(unpacked):
    store, rows = unpacked
    valid_vectors = store["blocks.3.mlp.hidden"][:][store.valid()]  # row-major
    n = store.manifest["n_tokens"]
    assert valid_vectors.shape == (n, 64)
    ordered = list(store.batches("blocks.3.mlp.hidden", 8, shuffle=False))
    assert [b.shape[0] for b in ordered] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    assert torch.equal(torch.cat(ordered), valid_vectors), "shuffle=False is row-major, padding left out"
    shuffled = torch.cat(list(store.batches("blocks.3.mlp.hidden", 8, seed=0, buffer_shards=2)))
    assert shuffled.shape == valid_vectors.shape and not torch.equal(shuffled, valid_vectors)

    def sort_rows(x):
        return sorted(map(tuple, x.float().tolist()))

    assert sort_rows(shuffled) == sort_rows(valid_vectors)
    cast = next(iter(store.batches("embed", 4, dtype=torch.float32, device="cpu")))
    assert cast.dtype == torch.float32 and cast.shape == (4, 32)


def test_batches_are_seeded(packed):
    store, _ = packed

    def run(seed, **kw):
        return torch.cat(list(store.batches("blocks.1.resid_post", 16, seed=seed, buffer_shards=2, **kw)))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    everything = store["blocks.1.resid_post"][:].reshape(-1, 32)
    assert a.shape == c.shape == everything.shape
    assert torch.equal(run(0, shuffle=False), everything)


def test_texts_of_unpacked_rows(unpacked, tok):
    store, _ = unpacked
    docs = list(Corpus(DOCS).documents())
    assert store.texts(range(store.n_rows), tokenizer=tok) == [d[:9] for d in docs]
    assert store.texts(0, tokenizer=tok) == [docs[0][:9]]
    assert store.token_strings(4, tokenizer=tok) == ["<bos>", *docs[4][:9]]
    with pytest.raises(StoreError, match="pass tokenizer=model.tokenizer"):
        store.texts([0])  # the manifest names no model directory


# ---------------------------------------------------------------------- harvest: bad arguments
@pytest.mark.parametrize("names, kwargs, error, match", [
    ("embed", {"dtype": torch.int8}, HarvestError, r"dtype torch\.int8 cannot be stored"),
    ("embed", {"batch_size": 0}, HarvestError, "batch_size must be a positive int, got 0"),
    ("embed", {"shard_tokens": True}, HarvestError, "shard_tokens must be a positive int, got True"),
    ("blocks.0.attn.pattern", {}, HarvestError, "one value per pair of tokens"),
    ("embed", {"positions": []}, HarvestError, r"positions=\[\] selects no position of a 16-token row"),
    ("blocks.1.resid_pots", {}, UnknownSiteError, r"unknown site 'blocks\.1\.resid_pots'"),
    ("embed", {"context": 1}, CorpusError, "context must be an int of at least 2"),
])
def test_harvest_argument_errors(model, tmp_path, names, kwargs, error, match):
    settings = {"context": 16, **kwargs}
    with intact(model), pytest.raises(error, match=match):
        harvest(model, DOCS, names, tmp_path / "h", progress=False, **settings)
    assert not (tmp_path / "h").exists(), "nothing is written before the settings are checked"


def test_harvest_needs_a_tokenizer(tmp_path):
    import support

    m = support.make_model(support.TINY)
    with intact(m), pytest.raises(HarvestError, match="needs the model's tokenizer"):
        harvest(m, DOCS, "embed", tmp_path / "h", context=8, progress=False)


# ---------------------------------------------------------------------- resume
def test_unfinished_store_resumes_and_ignores_temp_files(model, reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()
    for k in range(1, 10):  # only shard 0 survived the "crash"
        (out / f"shard_{k:05d}.safetensors").unlink()
    garbage = out / ".shard_00003.safetensors.tmp-123-456"
    garbage.write_bytes(b"\x00\xffnot a shard" * 10)
    with pytest.raises(StoreError, match="has not finished; rerun the same command to resume it"):
        ActivationStore(out)
    store = hw.run(model, out)
    assert not garbage.exists(), "a killed run's temporary file is removed on rerun"
    assert store.n_rows == hw.ROWS
    assert_same_store(out, reference)


def test_finished_store_never_reads_a_temp_file(model, reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    garbage = out / ".shard_00003.safetensors.tmp-123-456"
    garbage.write_bytes(b"garbage")
    before = ActivationStore(reference)["blocks.3.mlp.hidden"][:]
    assert torch.equal(ActivationStore(out)["blocks.3.mlp.hidden"][:], before)
    hw.run(model, out)  # a rerun of a finished harvest: nothing to compute, the stray file goes
    assert not garbage.exists()
    assert files(out) == files(reference)


def test_kill_between_rows_and_plan_resumes(model, reference, tmp_path):
    """``_prepare`` writes rows.safetensors, then plan.json: a kill in between leaves only the rows.
    The module promises "safe to kill at any moment", so a rerun must resume from there."""
    out = tmp_path / "store"
    out.mkdir()
    shutil.copy(reference / "rows.safetensors", out / "rows.safetensors")
    hw.run(model, out)
    assert_same_store(out, reference)


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the worker did not start: {line!r} {proc.stderr.read()[-2000:]}")


def _after_kill(proc: subprocess.Popen, out: Path, model, reference: Path) -> None:
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the worker finished before it was killed: make it slower"
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="has not finished; rerun"):
        ActivationStore(out)
    from safetensors.torch import load_file

    done = sorted(p.name for p in out.glob("shard_*.safetensors"))
    assert len(done) < 10
    for name in done:  # a shard under its final name is complete
        got, want = load_file(str(out / name)), load_file(str(reference / name))
        assert all(torch.equal(got[k], want[k]) for k in want) and sorted(got) == sorted(want), name
    store = hw.run(model, out)  # resume in this process
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert store.manifest["n_tokens"] == hw.ROWS * CTX
    assert_same_store(out, reference)


@pytest.mark.subprocess
@pytest.mark.parametrize("seed", [1, 2])
def test_resume_after_kill_at_a_random_moment(model, reference, tmp_path, seed):
    delay = random.Random(seed).uniform(0.5, 3.0)
    out = tmp_path / "store"
    proc = worker(out, "--sleep", "0.25")  # 20 forwards: about 5 s of harvesting
    _wait_ready(proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    _after_kill(proc, out, model, reference)


@pytest.mark.subprocess
def test_resume_after_kill_as_the_first_shard_appears(model, reference, tmp_path):
    out = tmp_path / "store"
    proc = worker(out, "--sleep", "0.25")
    _wait_ready(proc)
    first = out / "shard_00000.safetensors"
    deadline = time.monotonic() + 30
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert first.exists()
    _after_kill(proc, out, model, reference)


# ---------------------------------------------------------------------- other settings, foreign directories
def _other(model, what):
    """(model, kwargs) of a harvest that differs from harvest_worker.run in ``what``."""
    if what == "model":
        return hw.build_model(seed=1), {}
    return model, {"sites": {"sites": ["embed"]}, "context": {"context": 8}, "dtype": {"dtype": torch.float32},
                   "positions": {"positions": -1}, "pack": {"pack": False},
                   "max_tokens": {"rows": 20}}[what]


@pytest.mark.parametrize("what", ["sites", "context", "dtype", "model", "positions", "pack", "max_tokens"])
def test_rerun_with_other_settings_is_refused(model, reference, tmp_path, what):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    before = files(out)
    m, kwargs = _other(model, what)
    with intact(m), pytest.raises(HarvestError, match=rf"holds a harvest with other settings \((.*, )?{what}\b.* "
                                                      r"differ\); rerun with the same settings"):
        hw.run(m, out, **kwargs)
    assert files(out) == before, "a refused rerun changes nothing"


def test_rerun_without_shard_tokens_keeps_the_stores_own_shard_size(model, reference, tmp_path):
    """The shard size is a storage detail: a rerun that leaves shard_tokens unset returns the store as
    it was sharded (it was refused as "other settings" when the default shard size changed), one that
    asks for another shard size explicitly is refused, and a half-done run resumes with its own size."""
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    before = files(out)
    with intact(model):
        store = hw.run(model, out, shard_tokens=None)
    assert files(out) == before
    assert store.shard_rows == hw.SHARD_TOKENS // CTX and store.n_rows == hw.ROWS
    with intact(model), pytest.raises(HarvestError, match=r"other settings \(shard_rows differ\)"):
        hw.run(model, out, shard_tokens=2 * hw.SHARD_TOKENS)
    assert files(out) == before
    half = tmp_path / "half"
    shutil.copytree(reference, half)
    (half / "manifest.json").unlink()
    shards = sorted(half.glob("shard_*.safetensors"))
    for p in shards[len(shards) // 2:]:
        p.unlink()
    hw.run(model, half, shard_tokens=None)
    assert files(half) == before


def test_rerun_with_another_corpus_is_refused(model, reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    before = files(out)
    docs = hw.documents()
    docs[-1] += " changed"  # past the rows harvested, but the corpus is not the same
    with intact(model), pytest.raises(HarvestError, match=r"other settings \(corpus differ\)"):
        harvest(model, docs, SITES, out, context=CTX, batch_size=hw.BATCH, shard_tokens=hw.SHARD_TOKENS,
                max_tokens=hw.ROWS * CTX, progress=False)
    assert files(out) == before


def test_foreign_or_damaged_directory_is_refused(model, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(HarvestError, match=r"is not empty \(\['notes\.txt'\]\.\.\.\) and holds no harvest plan"):
        hw.run(model, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    hidden = tmp_path / "hidden"  # hidden files alone (e.g. .DS_Store, a killed run's temp) are no obstacle
    hidden.mkdir()
    (hidden / ".keep").write_text("")
    hw.run(model, hidden, rows=4)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "plan.json").write_text("{not json")
    with pytest.raises(HarvestError, match="plan.json is damaged; delete .* to start again"):
        hw.run(model, damaged)


# ---------------------------------------------------------------------- damaged stores
@pytest.fixture
def copy(reference, tmp_path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    ActivationStore(out)  # opens before the damage
    return out


def test_truncated_shard(copy):
    shard = copy / "shard_00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(StoreError, match=r"shard_00004\.safetensors has \d+ bytes; .*does not match its manifest"):
        ActivationStore(copy)
    # a manifest that agrees with the cut file: the shard itself is unreadable
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][4]["bytes"] = len(data) - 100
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard_00004\.safetensors is not a readable shard .*truncated"):
        ActivationStore(copy)


def test_manifest_with_a_wrong_size(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][2]["bytes"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard_00002\.safetensors has .*does not match its manifest"):
        ActivationStore(copy)


def test_missing_shard(copy):
    (copy / "shard_00009.safetensors").unlink()
    with pytest.raises(StoreError, match=r"shard_00009\.safetensors is missing"):
        ActivationStore(copy)


@pytest.mark.parametrize("text, match", [("{oops", "is not valid JSON"), ("\xff\xfe", "is not valid JSON"),
                                         ("[1, 2]", "is not a harvest manifest"),
                                         ('{"format": "other"}', "is not a harvest manifest")])
def test_bad_manifest(copy, text, match):
    (copy / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(StoreError, match=rf"manifest\.json {match}"):
        ActivationStore(copy)


def test_damaged_rows_file_and_no_harvest_at_all(copy, tmp_path):
    rows = copy / "rows.safetensors"
    rows.write_bytes(rows.read_bytes()[:-8])
    with pytest.raises(StoreError, match=r"rows\.safetensors is not a readable shard"):
        ActivationStore(copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no manifest.json in .*: not a harvest directory"):
        ActivationStore(tmp_path / "empty")


# ---------------------------------------------------------------------- disk check
def test_not_enough_disk_is_refused_with_the_estimate(model, tmp_path, monkeypatch):
    harvest_module = sys.modules["interp.data.harvest"]  # (interp.data.harvest is also the function's name)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(harvest_module.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 1024, 1024))
    out = tmp_path / "store"
    # 40 rows x 16 positions x (32 + 64 + 32) values x 2 bytes = 160 KiB
    with intact(model), pytest.raises(HarvestError, match=r"the harvest needs about 160\.0 KiB \(160\.0 KiB still to "
                                                          r"write\) but .* has 1\.0 KiB free"):
        hw.run(model, out)
    assert not (out / "plan.json").exists()
    monkeypatch.undo()
    assert hw.run(model, out).n_rows == hw.ROWS  # with the space there, the same directory is fine


# ---------------------------------------------------------------------- many processes
@pytest.mark.subprocess
def test_two_ranks_write_the_single_process_store(reference, tmp_path):
    out = tmp_path / "store"
    port = str(free_port())
    procs = [worker(out, env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "LOCAL_RANK": str(r),
                              "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
        assert so.splitlines()[-1] == f"done {hw.ROWS}"
    assert_same_store(out, reference)


# ---------------------------------------------------------------------- the command line
def _sentencepiece_model(texts: list[str]) -> bytes:
    """A character-level SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="char", vocab_size=80, hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """The tiny model (seed 0) as a Hugging Face directory, with a small tokenizer.model."""
    import hf_reference
    import support

    folder = tmp_path_factory.mktemp("tiny_hf")
    hf_reference.save_hf_checkpoint(support.make_model(support.TINY), folder)
    (folder / "tokenizer.model").write_bytes(_sentencepiece_model(hw.documents()))
    return folder


@pytest.fixture(scope="module")
def corpus_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(hw.documents()) + "\n", encoding="utf-8")
    return path


def _cli(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "interp"]
    if torchrun:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(torchrun),
                  "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "interp"]
    return subprocess.run([*prefix, *args], cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.subprocess
def test_cli_harvest_on_one_and_two_processes(tiny_hf, corpus_txt, tmp_path):
    from interp.model import Gemma3

    common = ["harvest", "--model", str(tiny_hf), "--corpus", str(corpus_txt), "--sites", "blocks.1.resid_post",
              "--sites", "blocks.3.mlp.*", "--context", "16", "--max-tokens", "640", "--shard-tokens", "64",
              "--batch-size", "2"]
    one = _cli(*common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "ActivationStore(" in one.stdout and "640 tokens" in one.stdout
    two = _cli(*common, "--out", str(tmp_path / "two"), torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("ActivationStore(") == 1, "only rank 0 reports"
    store = ActivationStore(tmp_path / "one")
    assert store.n_rows == 40 and len(store.manifest["shards"]) == 10
    assert store.manifest["model"]["source"] == str(tiny_hf)
    assert "blocks.3.mlp.hidden" in store.sites and "blocks.3.mlp.out" in store.sites
    # the store finds the tokenizer of the model directory itself, and its rows are the corpus's
    m = Gemma3.from_pretrained(tiny_hf)
    assert store.texts([0, 1]) == [m.tokenizer.decode(store.ids[r].tolist()) for r in (0, 1)]
    assert store.texts(0)[0] in corpus_txt.read_text()
    rows = Corpus(corpus_txt).rows(m.tokenizer, 16, max_tokens=640)
    want = expected(m, rows, ["blocks.1.resid_post"], batch=2, shard_rows=4)
    assert torch.equal(store["blocks.1.resid_post"][:], want["blocks.1.resid_post"])
    assert_same_store(tmp_path / "two", tmp_path / "one")


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_cli_unknown_site_is_a_one_line_error(tiny_hf, corpus_txt, tmp_path, capsys):
    from interp.cli import main

    out = tmp_path / "h"
    rc = main(["harvest", "--model", str(tiny_hf), "--corpus", str(corpus_txt), "--sites", "blocks.1.resid_pots",
               "--out", str(out), "--context", "16", "--max-tokens", "64"])
    assert rc == 1
    err = _one_line_error(capsys)
    assert "unknown site 'blocks.1.resid_pots'" in err and "blocks.1.resid_post" in err
    assert "python -m interp info" in err and "site_names()" not in err  # advice for the shell, not Python
    assert not out.exists()


def test_cli_unknown_layer_suggests_only_real_sites(tiny_hf, corpus_txt, tmp_path, capsys):
    """blocks.9 on a 6-layer model: whatever the error suggests must be a site the model has."""
    from interp.cli import main
    from interp.model import Gemma3

    rc = main(["harvest", "--model", str(tiny_hf), "--corpus", str(corpus_txt), "--sites", "blocks.9.resid_post",
               "--out", str(tmp_path / "h"), "--context", "16", "--max-tokens", "64"])
    assert rc == 1
    err = _one_line_error(capsys)
    assert "unknown site 'blocks.9.resid_post'" in err
    real = set(Gemma3.from_pretrained(tiny_hf).site_names())
    suggested = err.split("Did you mean:", 1)[1].split("?", 1)[0] if "Did you mean:" in err else ""
    names = [s.strip() for s in suggested.split(",") if s.strip()]
    assert all(n in real for n in names), f"suggests sites this model does not have: {names}"


@pytest.mark.parametrize("corpus, match", [("missing.jsonl", "no corpus file at .*missing.jsonl"),
                                           ("corpus.csv", r"corpus\.csv: a corpus file is \.txt or \.jsonl"),
                                           ("bad.jsonl", r"bad\.jsonl:1 is not JSON")])
def test_cli_bad_corpus_is_a_one_line_error(tiny_hf, tmp_path, capsys, corpus, match):
    from interp.cli import main

    (tmp_path / "corpus.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    out = tmp_path / "h"
    rc = main(["harvest", "--model", str(tiny_hf), "--corpus", str(tmp_path / corpus), "--sites", "embed",
               "--out", str(out), "--context", "16"])
    assert rc == 1
    assert re.search(match, _one_line_error(capsys))
    assert not (out / "plan.json").exists()


def test_corpus_repr_names_it(tmp_path):
    assert repr(Corpus(["a", "b"])) == "Corpus('2 texts', 2 documents in memory)"
    path = tmp_path / "c.txt"
    path.write_text("x\n\ny")
    assert repr(Corpus(path)) == f"Corpus('c.txt', file {path})"


def test_default_shards_hold_what_fits_in_the_byte_budget(model, tmp_path, monkeypatch):
    harvest_module = sys.modules["interp.data.harvest"]
    per_row = 12 * sum(d for d in (32, 64, 32)) * 2  # positions x (resid_post + mlp.hidden + embed widths) x bf16
    monkeypatch.setattr(harvest_module, "SHARD_BYTES", 4 * per_row + 1)
    store = harvest(model, DOCS, SITES, tmp_path / "h", context=12, batch_size=3, progress=False)
    assert store.shard_rows == 4
    want = harvest(model, DOCS, SITES, tmp_path / "ref", context=12, batch_size=3, shard_tokens=48, progress=False)
    for site in SITES:
        assert torch.equal(store[site][:], want[site][:])


def test_a_store_finds_the_tokenizer_of_the_model_it_was_harvested_with(tiny_hf, corpus_txt, tmp_path):
    """The README's order: harvest with a loaded model (no model_source=), then store.texts([0])."""
    import interp
    from interp.data import Corpus

    model = interp.load(str(tiny_hf))
    assert model.source == str(tiny_hf.resolve())
    store = interp.harvest(model, Corpus(corpus_txt), "blocks.1.resid_post", tmp_path / "h", context=16,
                           max_tokens=64, progress=False)
    text = store.texts([0])[0]
    assert text and text in corpus_txt.read_text(encoding="utf-8").replace("\n\n", model.tokenizer.decode([2]))
    # a store planned before models knew their source ("" recorded) still resumes: the source is no setting
    plan = json.loads((tmp_path / "h" / "plan.json").read_text())
    plan["model"]["source"] = ""
    (tmp_path / "h" / "plan.json").write_text(json.dumps(plan))
    interp.harvest(model, Corpus(corpus_txt), "blocks.1.resid_post", tmp_path / "h", context=16, max_tokens=64,
                   progress=False)


def test_a_rerun_says_whether_it_resumes_or_has_nothing_to_do(tiny_hf, corpus_txt, tmp_path, capsys):
    """A finished harvest run again says it is complete (no empty progress bar); a partial one says
    how many shards it keeps."""
    import interp

    model, texts = interp.load(str(tiny_hf)), str(corpus_txt)
    kw = dict(context=8, max_tokens=256, shard_tokens=32, progress=True)
    interp.harvest(model, texts, "blocks.1.resid_post", tmp_path / "h", **kw)
    capsys.readouterr()
    interp.harvest(model, texts, "blocks.1.resid_post", tmp_path / "h", **kw)
    err = capsys.readouterr().err
    assert "already complete; nothing to do" in err and "tok/s" not in err and "0.00tok" not in err
    shards = sorted((tmp_path / "h").glob("shard_*.safetensors"))
    shards[-1].unlink()
    interp.harvest(model, texts, "blocks.1.resid_post", tmp_path / "h", **kw)
    err = capsys.readouterr().err
    assert f"holds {len(shards) - 1} of {len(shards)} shards: resuming" in err
