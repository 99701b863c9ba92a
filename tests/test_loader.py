"""TokenLoader: windows read across shards, exact resume, rank disjointness; document mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from text2llm.loader import TokenLoader, document_attention_mask


def _write_stream(out, shards: list[np.ndarray], dtype="uint32", val=None) -> None:
    """A token dir whose tokens are their own positions (so a batch tells where it was read)."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, a in enumerate(shards):
        names.append(f"train-{i:05d}.bin")
        a.astype(dtype).tofile(out / names[-1])
    n = sum(len(a) for a in shards)
    meta = {"mode": "packed", "dtype": dtype, "vocab_size": 1 << 20, "bos_id": 1, "eos_id": 2, "pad_id": 0,
            "splits": {"train": {"tokens": n, "documents": 1, "bytes": n, "shards": names},
                       "val": {"tokens": 0, "documents": 0, "bytes": 0, "shards": []}}}
    (out / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def stream(tmp_path):
    pos = np.arange(10_000)
    _write_stream(tmp_path / "s", [pos[:3001], pos[3001:7000], pos[7000:]])
    return tmp_path / "s"


def test_windows_are_shifted_and_cross_shards(stream):
    loader = TokenLoader(stream, "train", batch_size=8, seq_len=64, mode="sequential")
    seen = []
    for _ in range(loader.num_windows() // 8):
        x, y = next(loader)
        assert x.dtype == y.dtype == torch.int64 and x.shape == (8, 64)
        assert torch.equal(y, x + 1)  # target = next token, also across a shard boundary
        seen.append(x)
    x_all = torch.cat(seen)
    assert torch.equal(x_all[:, 0], torch.arange(len(x_all)) * 64)  # sequential: consecutive windows
    rand = TokenLoader(stream, "train", 16, 64, mode="random", seed=3)
    for _ in range(50):
        x, y = next(rand)
        assert torch.equal(y, x + 1) and int(y.max()) < 10_000


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_reads_exactly_the_same_batches(stream, mode):
    a = TokenLoader(stream, "train", 4, 32, mode=mode, seed=7)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint's state.json stores
    want = [next(a) for _ in range(200)]  # sequential wraps around in here
    b = TokenLoader(stream, "train", 4, 32, mode=mode, seed=7)
    b.load_state_dict(state)
    got = [next(b) for _ in range(200)]
    for (xa, ya), (xb, yb) in zip(want, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.batches == a.batches == 205


def test_different_seeds_differ(stream):
    x1, _ = next(TokenLoader(stream, "train", 4, 32, seed=1))
    x2, _ = next(TokenLoader(stream, "train", 4, 32, seed=2))
    assert not torch.equal(x1, x2)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_read_disjoint_tokens(stream, mode):
    world = 3
    reads = []
    for rank in range(world):
        loader = TokenLoader(stream, "train", 4, 32, mode=mode, seed=0, rank=rank, world_size=world)
        toks = set()
        for _ in range(60):
            x, y = next(loader)
            toks |= set(x.flatten().tolist()) | set(y.flatten().tolist())
        assert min(toks) >= loader.lo and max(toks) < loader.hi
        reads.append(toks)
    for i in range(world):
        for j in range(i + 1, world):
            assert not reads[i] & reads[j]
    # together the ranks cover the stream
    los = [TokenLoader(stream, "train", 4, 32, rank=r, world_size=world).lo for r in range(world)]
    assert los == [0, 3333, 6666]


def test_padded_rows_split_by_rank(tmp_path):
    R = 9
    rows = np.arange(40 * R).reshape(40, R) % 50 + 3
    rows[:, -2:] = 0  # padding
    out = tmp_path / "p"
    _write_stream(out, [rows.reshape(-1)], dtype="uint16")
    meta = json.loads((out / "meta.json").read_text())
    meta.update(mode="padded", seq_len=R - 1, row_len=R)
    (out / "meta.json").write_text(json.dumps(meta))
    firsts = []
    for rank in range(2):
        loader = TokenLoader(out, "train", 5, R - 1, mode="sequential", rank=rank, world_size=2)
        assert loader.num_windows() == 20
        x, y = next(loader)
        assert (y[:, -2:] == -100).all() and (y[:, :-2] != -100).all()  # only the padding is masked
        firsts.append(x[:, 0].tolist())
    assert firsts[0] == rows[:5, 0].tolist() and firsts[1] == rows[20:25, 0].tolist()


def test_document_attention_mask_matches_brute_force():
    torch.manual_seed(0)
    x_BT = torch.randint(1, 6, (3, 17))  # bos_id = 1 appears at random places
    x_BT[0, 0] = 1
    m = document_attention_mask(x_BT, bos_id=1)
    assert m.shape == (3, 1, 17, 17) and m.dtype == torch.bool
    for b in range(3):
        for i in range(17):
            for j in range(17):
                ok = j <= i and not (x_BT[b, j + 1 : i + 1] == 1).any()
                assert bool(m[b, 0, i, j]) == ok
    # without any BOS it is the plain causal mask
    plain = document_attention_mask(torch.full((1, 5), 7), bos_id=1)
    assert torch.equal(plain[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_document_mask_isolates_documents_in_attention():
    # a query in document 2 gives the same attention output whatever document 1 holds
    torch.manual_seed(0)
    x1 = torch.tensor([[1, 5, 6, 7, 1, 8, 9]])
    x2 = torch.tensor([[1, 4, 4, 4, 1, 8, 9]])
    emb = torch.nn.Embedding(10, 8)
    outs = []
    for x in (x1, x2):
        q = k = v = emb(x)[:, None]  # (B, 1, T, D)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_attention_mask(x, 1)))
    assert torch.allclose(outs[0][..., 4:, :], outs[1][..., 4:, :])


# ---- bos mode: best-fit packing of whole documents (train.loader = "bos") -------------------------


def _numbered_docs(root, n_docs: int = 300, seed: int = 0):
    """Packed shards (two of them) of documents BOS, a, b, filler..., EOS where (a, b) numbers the document."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(3, 60))  # some longer than a row of 33
        docs.append([1, 3 + i % 50, 3 + i // 50] + [60] * n + [2])
    flat = np.array([t for d in docs for t in d], dtype=np.uint16)
    cut = flat.size // 2 + 5  # a document crosses the shard boundary
    flat[:cut].tofile(root / "train-00000.bin")
    flat[cut:].tofile(root / "train-00001.bin")
    meta = {"format": "text2llm-tokens/1", "mode": "packed", "dtype": "uint16", "vocab_size": 64, "bos_id": 1,
            "eos_id": 2, "pad_id": 0, "tokenizer_fingerprint": "synthetic", "tokenizer_dir": "",
            "splits": {"train": {"shards": ["train-00000.bin", "train-00001.bin"], "tokens": int(flat.size),
                                 "bytes": int(flat.size), "documents": n_docs}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root, docs


def _starts_in(x_BT, y_BT):
    """(a, b) of every document start (BOS) in the rows."""
    rows = torch.cat([x_BT, y_BT[:, -1:]], dim=1).tolist()
    return [(r[j + 1], r[j + 2]) for r in rows for j in range(len(r) - 2) if r[j] == 1]


def test_bos_rows_start_with_bos_and_an_epoch_covers_every_document(tmp_path, monkeypatch):
    import text2llm.loader as L

    monkeypatch.setattr(L, "BOS_BUFFER_DOCS", 32)  # a buffer much smaller than the split, as in real data
    root, docs = _numbered_docs(tmp_path / "tok")
    ld = TokenLoader(root, "train", batch_size=4, seq_len=32, mode="bos", seed=3)
    doc_at = dict(zip(np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist(), range(len(docs))))
    read, real_read = [], ld._read
    ld._read = lambda start, n: read.append(start) or real_read(start, n)
    epoch_batches = 0
    while len({doc_at[s] for s in read}) < len(docs):
        x, y = next(ld)
        epoch_batches += 1
        assert x.shape == (4, 32) and (x[:, 0] == 1).all()  # every row starts at a document start
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert epoch_batches < 120
    assert all(s in doc_at for s in read)  # every piece of a row is a document's start
    seen = set(_starts_in(x, y))
    assert seen <= {(3 + i % 50, 3 + i // 50) for i in range(len(docs))}
    # best-fit: the rows hold most of the epoch's tokens (a longer document gives its first 33)
    assert epoch_batches * 4 * 33 <= 1.35 * sum(min(len(d), 33) for d in docs)


def test_bos_mode_resumes_exactly_and_splits_documents_by_rank(tmp_path):
    root, docs = _numbered_docs(tmp_path / "tok")
    a = TokenLoader(root, "train", batch_size=3, seq_len=32, mode="bos", seed=5)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able
    b = TokenLoader(root, "train", batch_size=3, seq_len=32, mode="bos", seed=5)
    b.load_state_dict(state)
    for _ in range(40):  # across an epoch boundary
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    r0, r1 = (TokenLoader(root, "train", 4, 32, mode="bos", rank=r, world_size=2) for r in (0, 1))
    s0 = {s for _ in range(30) for s in _starts_in(*next(r0))}
    s1 = {s for _ in range(30) for s in _starts_in(*next(r1))}
    assert s0 and s1 and not s0 & s1  # each rank reads its own documents


def test_bos_mode_refuses_padded_shards(tmp_path):
    from test_train import make_tokens
    from text2llm.errors import UserError

    root = make_tokens(tmp_path / "pad", mode="padded", seq_len=32)
    with pytest.raises(UserError, match="packed shards"):
        TokenLoader(root, "train", 2, 32, mode="bos")


def test_training_with_bos_rows_resumes_bitwise(tmp_path):
    import shutil

    from test_train import losses, make_tokens, tiny_config
    from text2llm.train.trainer import train

    tokens = make_tokens(tmp_path / "tok")
    cfg = tiny_config(max_steps=6, checkpoint_every=3, loader="bos")
    train(cfg, tokens, tmp_path / "ref", progress=False)
    shutil.copytree(tmp_path / "ref", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_0000006")
    train(cfg, tokens, tmp_path / "run", resume=True, progress=False)
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]
    assert a != losses(train(tiny_config(max_steps=6), tokens, tmp_path / "rnd", progress=False).run_dir)
