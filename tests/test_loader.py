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
