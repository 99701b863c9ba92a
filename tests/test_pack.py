"""pack: documents -> token shards. Decoding the shards gives the documents back, the split is by
document, worker count does not change a byte, and padded rows mask exactly the padding."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from text2llm.config import PackConfig, TokenizerConfig
from text2llm.data.document import Document
from text2llm.errors import UserError
from text2llm.loader import TokenLoader
from text2llm.loss import IGNORE_INDEX
from text2llm.pack import is_val, pack, read_meta
from text2llm.tokenizer import Tokenizer, train_tokenizer

WORDS = "the a girl boy dog saw big red ball park happy sad tree ran said mom friend sun day 小 猫 在 家".split()


def _docs(n: int = 300, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.choice([3, 10, 40, 120])  # short and long documents
        text = " ".join(rng.choice(WORDS) for _ in range(k)) + rng.choice([".", "!\n", "  \n\n 😀"])
        out.append(Document(f"doc-{i}", text, "test"))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([x.text for x in _docs(400, seed=1)], d, TokenizerConfig(type="bpe", vocab_size=320, threads=1))
    return d


def _split_docs(arr: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    cuts = np.flatnonzero(arr == bos)
    docs = [arr[a:b] for a, b in zip(cuts, list(cuts[1:]) + [len(arr)])]
    assert all(d[-1] == eos for d in docs)
    return [list(d[1:-1]) for d in docs]


def _read(out, split):
    meta = read_meta(out)
    return np.concatenate([np.fromfile(out / f, dtype=meta["dtype"]) for f in meta["splits"][split]["shards"]])


def test_pack_then_decode_reproduces_documents(tok_dir, tmp_path):
    docs = _docs()
    meta = pack(docs, tok_dir, tmp_path / "out", PackConfig(val_fraction=0.2, shard_tokens=1000), progress=False)
    tok = Tokenizer.load(tok_dir)
    assert meta["dtype"] == "uint16" and meta["mode"] == "packed"
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    for split in ("train", "val"):
        want = [d.text for d in docs if is_val(d.id, 0, 0.2) == (split == "val")]
        got = [tok.decode(ids) for ids in _split_docs(_read(tmp_path / "out", split), tok.bos_id, tok.eos_id)]
        assert got == want
        info = meta["splits"][split]
        assert info["documents"] == len(want)
        assert info["bytes"] == sum(len(t.encode("utf-8")) for t in want)
        assert info["tokens"] == len(_read(tmp_path / "out", split))
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens=1000 forces several


def test_no_document_in_both_splits_and_split_is_stable(tok_dir, tmp_path):
    docs = _docs()
    pack(docs, tok_dir, tmp_path / "a", PackConfig(val_fraction=0.3), progress=False)
    tok = Tokenizer.load(tok_dir)
    train = {tok.decode(x) for x in _split_docs(_read(tmp_path / "a", "train"), 1, 2)}
    val = {tok.decode(x) for x in _split_docs(_read(tmp_path / "a", "val"), 1, 2)}
    assert train and val and not (train & val)
    # a document's split depends only on its id: adding documents never moves old ones
    n_val = sum(is_val(d.id, 0, 0.3) for d in docs)
    assert 0.2 < n_val / len(docs) < 0.4
    assert [is_val(d.id, 0, 0.3) for d in docs] == [is_val(d.id, 0, 0.3) for d in _docs()]


def test_workers_give_identical_output(tok_dir, tmp_path):
    docs = _docs(1500)
    pack(docs, tok_dir, tmp_path / "w1", PackConfig(workers=1, shard_tokens=20_000), progress=False)
    pack(docs, tok_dir, tmp_path / "w2", PackConfig(workers=2, shard_tokens=20_000), progress=False)
    m1, m2 = read_meta(tmp_path / "w1"), read_meta(tmp_path / "w2")
    assert m1["splits"] == m2["splits"]
    for split in ("train", "val"):
        for f in m1["splits"][split]["shards"]:
            assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_small_units_empty_documents_and_any_input_give_identical_output(tok_dir, tmp_path, monkeypatch, mode):
    import text2llm.pack as pack_mod

    monkeypatch.setattr(pack_mod, "CHUNK_BYTES", 700)  # many work units, cut inside runs of empty documents
    docs = _docs(400)
    for i in range(0, 400, 7):
        docs[i] = Document(docs[i].id, "", "test")
    cfg = dict(mode=mode, seq_len=16, val_fraction=0.2, shard_tokens=3000)
    runs = {"list-1": (docs, 1), "list-2": (docs, 2), "generator-2": ((d for d in docs), 2),
            "tuple-3": (tuple(docs), 3)}
    metas = {k: pack(d, tok_dir, tmp_path / k, PackConfig(workers=w, **cfg), progress=False)
             for k, (d, w) in runs.items()}
    for k in runs:
        assert metas[k]["splits"] == metas["list-1"]["splits"]
        assert metas[k]["skipped_empty"] == 58
        for split in ("train", "val"):
            for f in metas[k]["splits"][split]["shards"]:
                assert (tmp_path / k / f).read_bytes() == (tmp_path / "list-1" / f).read_bytes()
    assert len(metas["list-1"]["splits"]["train"]["shards"]) > 1
    for k in runs:  # the workers' token files are gone: only the shards and meta.json
        shards = [f for s in ("train", "val") for f in metas[k]["splits"][s]["shards"]]
        assert sorted(p.name for p in (tmp_path / k).iterdir()) == sorted(shards + ["meta.json"])
    assert pack_mod._tok is None and pack_mod._docs is None  # nothing kept alive after pack


def test_packing_a_cleaned_dir_equals_packing_its_documents(tok_dir, tmp_path, monkeypatch):
    """pack(DIR): the parent reads raw lines, the workers parse them; same bytes as pack(documents)."""
    import gzip
    import json

    import text2llm.pack as pack_mod
    from text2llm.data.readers import iter_cleaned

    monkeypatch.setattr(pack_mod, "CHUNK_BYTES", 900)
    clean = tmp_path / "clean"
    clean.mkdir()
    docs = _docs(500)
    for k, part in enumerate((docs[:260], docs[260:])):  # two shards; some records without an id
        with gzip.open(clean / f"clean-{k:05d}.jsonl.gz", "wt", encoding="utf-8") as f:
            for i, d in enumerate(part):
                rec = {"text": "" if i % 9 == 4 else d.text, "source": d.source}
                if i % 5:
                    rec["id"] = d.id
                f.write(json.dumps(rec, ensure_ascii=False) + ("\n\n" if i == 3 else "\n"))  # a blank line too
    cfg = dict(val_fraction=0.2, shard_tokens=4000)
    ref = pack(iter_cleaned(clean), tok_dir, tmp_path / "ref", PackConfig(workers=1, **cfg), progress=False)
    for w in (1, 2):
        meta = pack(clean, tok_dir, tmp_path / f"dir-{w}", PackConfig(workers=w, **cfg), progress=False)
        assert meta["splits"] == ref["splits"] and meta["skipped_empty"] == ref["skipped_empty"] > 0
        for split in ("train", "val"):
            for f in meta["splits"][split]["shards"]:
                assert (tmp_path / f"dir-{w}" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()
    with gzip.open(clean / "clean-00002.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "fine"}\n{"id": "x"}\n')
    for w in (1, 2):
        with pytest.raises(UserError, match=r"clean-00002.jsonl.gz:2: not a cleaned-shard record"):
            pack(clean, tok_dir, tmp_path / f"bad-{w}", PackConfig(workers=w, **cfg), progress=False)
    with pytest.raises(UserError, match="no such file"):
        pack(tmp_path / "missing", tok_dir, tmp_path / "m", PackConfig(), progress=False)


def test_padded_mode_masks_exactly_the_padding(tok_dir, tmp_path):
    docs = _docs()
    T = 24
    meta = pack(docs, tok_dir, tmp_path / "p", PackConfig(mode="padded", seq_len=T, val_fraction=0.0), progress=False)
    assert meta["mode"] == "padded" and meta["seq_len"] == T and meta["row_len"] == T + 1
    rows = _read(tmp_path / "p", "train").reshape(-1, T + 1)
    assert len(rows) == len(docs) == meta["splits"]["train"]["rows"]
    assert rows[:, 0].tolist() == [1] * len(rows)  # every row starts with BOS
    assert meta["splits"]["train"]["padding"] == int((rows == 0).sum())
    loader = TokenLoader(tmp_path / "p", "train", batch_size=len(rows), seq_len=T, mode="sequential")
    x, y = next(loader)
    assert x.shape == y.shape == (len(rows), T)
    rows_t = np.asarray(rows, dtype=np.int64)
    assert (x.numpy() == rows_t[:, :-1]).all()
    is_pad = rows_t[:, 1:] == 0
    assert ((y.numpy() == IGNORE_INDEX) == is_pad).all()  # masked exactly where the target is padding
    assert (y.numpy()[~is_pad] == rows_t[:, 1:][~is_pad]).all()
    # truncated documents keep their first T+1 tokens; short ones are whole, EOS included
    tok = Tokenizer.load(tok_dir)
    for d, r in zip(docs, rows):
        ids = tok.encode(d.text, add_bos=True, add_eos=True)
        assert r[: min(len(ids), T + 1)].tolist() == ids[: T + 1]


def test_padded_split_long_keeps_every_token(tok_dir, tmp_path):
    docs = _docs(120)
    T = 16
    pack(docs, tok_dir, tmp_path / "s", PackConfig(mode="padded", seq_len=T, split_long=True, val_fraction=0.0),
         progress=False)
    rows = _read(tmp_path / "s", "train").reshape(-1, T + 1)
    tok = Tokenizer.load(tok_dir)
    want = [tok.encode(d.text, add_bos=True, add_eos=True) for d in docs]
    assert len(rows) == sum(-(-(len(w) - 1) // T) for w in want)
    # rebuild each document from its windows (they overlap by one token)
    got, k = [], 0
    for w in want:
        n = -(-(len(w) - 1) // T)
        seq = list(rows[k])
        for r in rows[k + 1 : k + n]:
            assert seq[-1] == r[0]
            seq += list(r[1:])
        k += n
        got.append([int(t) for t in seq if t != 0])
    assert got == want
    meta = read_meta(tmp_path / "s")
    assert meta["splits"]["train"]["tokens"] == sum(map(len, want))
    assert meta["splits"]["train"]["bytes"] == sum(len(d.text.encode()) for d in docs)


def test_loader_crops_padded_rows_and_refuses_longer(tok_dir, tmp_path):
    pack(_docs(50), tok_dir, tmp_path / "p", PackConfig(mode="padded", seq_len=16, val_fraction=0.0), progress=False)
    x, y = next(TokenLoader(tmp_path / "p", "train", 4, 8, mode="sequential"))
    assert x.shape == (4, 8)
    with pytest.raises(UserError, match="pack.seq_len"):
        TokenLoader(tmp_path / "p", "train", 4, 32)


def test_pack_errors(tok_dir, tmp_path):
    with pytest.raises(UserError, match="no documents"):
        pack([Document("a", "", "t")], tok_dir, tmp_path / "e", PackConfig(val_fraction=0.0), progress=False)
    with pytest.raises(UserError, match="validation documents"):
        pack(_docs(3), tok_dir, tmp_path / "v", PackConfig(val_fraction=0.01, val_min_docs=5), progress=False)
    pack(_docs(10), tok_dir, tmp_path / "ok", PackConfig(val_fraction=0.0), progress=False)
    with pytest.raises(UserError, match="not empty"):
        pack(_docs(10), tok_dir, tmp_path / "ok", PackConfig(val_fraction=0.0), progress=False)
    assert not (tmp_path / "e").exists()  # nothing half-written


def test_cli_pack(tok_dir, tmp_path):
    import gzip
    import json

    clean = tmp_path / "clean"
    clean.mkdir()
    with gzip.open(clean / "clean-00000.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in _docs(200):
            f.write(json.dumps({"id": d.id, "text": d.text, "source": d.source}) + "\n")
    r = subprocess.run([sys.executable, "-m", "text2llm", "pack", str(clean), "pack.mode=padded", "pack.seq_len=32",
                        "--tokenizer", str(tok_dir), "--out", str(tmp_path / "tokens"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = read_meta(tmp_path / "tokens")
    assert meta["mode"] == "padded" and meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 200


def test_pack_leaves_the_callers_thread_settings_alone(tok_dir, tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    pack(_docs(20), tok_dir, tmp_path / "o", PackConfig(val_fraction=0.0), progress=False)
    assert "OMP_NUM_THREADS" not in os.environ  # torch imported later must still see all cores
