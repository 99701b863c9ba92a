"""Tokenizer: three backends behind one interface, fixed special ids, lossless round trip,
Chinese without <unk>, user symbols never split, and a Hugging Face export that encodes identically."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from text2llm.config import TokenizerConfig
from text2llm.errors import UserError
from text2llm.tokenizer import Tokenizer, iter_training_texts, sample_texts, train_tokenizer

BACKENDS = ["bpe", "unigram", "bytelevel"]
EXTRAS = ["<|user|>", "<|assistant|>"]
ZH_CHARS = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持"
EN_WORDS = "the a little girl boy dog cat saw big red ball park happy sad tree ran jumped said mom dad friend sun day".split()


def _corpus() -> list[str]:
    rng = random.Random(0)
    docs = []
    for _ in range(400):  # ~120 KB of English-like stories
        sents = [" ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(5)]
        docs.append(" ".join(sents) + "\n\n\"Yes,\" she said.\tThe end 42.")
    for _ in range(200):  # ~60 KB of Chinese
        docs.append("".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(40, 120))) + "。\n“你好！”")
    docs.append("emoji 😀 👍🏽 ok " * 3 + " <|user|> hi <|assistant|> hello")
    return docs


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("tok")
    docs = _corpus()
    return {t: train_tokenizer(docs, root / t, TokenizerConfig(type=t, vocab_size=1000, user_defined_symbols=EXTRAS,
                                                              threads=1))
            for t in BACKENDS}


SAMPLES = [
    "Once upon a time, there was a little dog.",
    "中文测试：他说，“你好！”我们都很高兴。",
    "emoji 😀👍🏽🇨🇳 and mixed 中英 text ÆØÅ ß ﬁ Ω",
    "   leading, trailing and    repeated spaces   ",
    "line one\nline two\n\n\ttabbed\r\nwindows\n",
    "digits 1234567890 and symbols ~!@#$%^&*()_+{}|:\"<>?",
    "<s> text that looks like </s> <pad> <unk> tokens <0x41>",
    "<|user|> hi there <|assistant|> hello!",
    "",
    " ",
    "\n",
]


@pytest.mark.parametrize("typ", BACKENDS)
def test_fixed_special_ids(toks, typ):
    tok = toks[typ]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(6)] == ["<pad>", "<s>", "</s>", "<unk>", *EXTRAS]
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("<|assistant|>") == 5
    assert tok.vocab_size == 1000
    assert max(max(tok.encode(s), default=0) for s in SAMPLES) < tok.vocab_size


@pytest.mark.parametrize("typ", BACKENDS)
def test_round_trip_samples(toks, typ):
    tok = toks[typ]
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, (typ, s)
        assert tok.encode(s, add_bos=True, add_eos=True) == [1] + ids + [2]
        assert tok.decode([1] + ids + [2, 0, 0]) == s  # pad/BOS/EOS dropped


@pytest.mark.parametrize("typ", BACKENDS)
def test_control_tokens_never_come_from_text_and_extras_never_split(toks, typ):
    tok = toks[typ]
    ids = tok.encode("<s></s><pad><unk>")
    assert not {0, 1, 2, 3} & set(ids)
    assert tok.encode("<|user|>") == [4]
    assert tok.encode("x<|assistant|>y").count(5) == 1


@pytest.mark.parametrize("typ", BACKENDS)
def test_chinese_and_emoji_never_unknown(toks, typ):
    tok = toks[typ]
    rare = "龘靐齉𠀀 — unseen CJK, 😀 and 🫠"
    for s in [SAMPLES[1], SAMPLES[2], rare, ZH_CHARS]:
        ids = tok.encode(s)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == s


def test_chinese_is_compressed(toks):
    # a vocab trained on Chinese spends fewer than its 3 UTF-8 bytes per character
    for typ in BACKENDS:
        text = ZH_CHARS[:200]
        assert len(toks[typ].encode(text)) < len(text.encode("utf-8")) / 1.5


@pytest.mark.parametrize("typ", BACKENDS)
def test_encode_batch_equals_encode(toks, typ):
    tok = toks[typ]
    assert tok.encode_batch(SAMPLES, add_bos=True) == [tok.encode(s, add_bos=True) for s in SAMPLES]
    assert tok.encode_batch(SAMPLES, num_threads=1) == [tok.encode(s) for s in SAMPLES]


# hypothesis: any valid Unicode text round-trips (SentencePiece: except U+2581, see below)
_text = st.text(st.characters(codec="utf-8", exclude_characters="\u2581"), max_size=60)
_mixed = st.lists(st.sampled_from(SAMPLES[:8] + [" ", "  ", "\n", "\t", "中", "😀", "a"]), max_size=8).map("".join)


@pytest.mark.parametrize("typ", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_text, _mixed))
def test_round_trip_property(toks, typ, text):
    tok = toks[typ]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids


def test_sentencepiece_documented_change_u2581(toks):
    # SentencePiece spells spaces as U+2581: a literal one decodes as a space (documented)
    for typ in ("bpe", "unigram"):
        assert toks[typ].decode(toks[typ].encode("a\u2581b")) == "a b"
    assert toks["bytelevel"].decode(toks["bytelevel"].encode("a\u2581b")) == "a\u2581b"


@pytest.mark.parametrize("typ", BACKENDS)
def test_hf_export_encodes_identically(toks, typ, tmp_path):
    from transformers import AutoTokenizer

    tok = toks[typ]
    tok.save_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 0, 3)
    corpus = _corpus()
    texts = SAMPLES + corpus[:20] + corpus[400:420] + ["<0x41><s>", "a<0x41>b"]
    for s in texts:
        ids = tok.encode(s)
        assert hf.encode(s, add_special_tokens=False) == ids, s
        assert hf.encode(s) == [1] + ids  # BOS added by default, like Llama tokenizers
        assert hf.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("typ", BACKENDS)
def test_save_load_and_fingerprint(toks, typ, tmp_path):
    tok = toks[typ]
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    assert again.fingerprint == tok.fingerprint and again.vocab_size == tok.vocab_size
    assert again.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])
    meta = json.loads((tmp_path / "copy" / "text2llm-tokenizer.json").read_text())
    assert meta["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3} and meta["type"] == typ


def test_training_is_deterministic(toks, tmp_path):
    again = train_tokenizer(_corpus(), tmp_path / "bpe", TokenizerConfig(type="bpe", vocab_size=1000,
                                                                         user_defined_symbols=EXTRAS, threads=1))
    assert again.fingerprint == toks["bpe"].fingerprint


def test_tokenizer_module_needs_no_torch(toks):
    code = ("import sys; from text2llm.tokenizer import Tokenizer; "
            f"t = Tokenizer.load({str(toks['bytelevel'].path)!r}); t.encode('hi'); "
            f"Tokenizer.load({str(toks['bpe'].path)!r}).encode('hi'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sample_texts_uniform_and_first():
    docs = [f"doc {i} " * 10 for i in range(1000)]  # 70-80 bytes each
    first = sample_texts(docs, 800, "first")
    assert first == docs[: len(first)] and 800 <= sum(map(len, first)) < 900
    uni = sample_texts(docs, 8000, "uniform", seed=1)
    assert uni == sample_texts(docs, 8000, "uniform", seed=1)  # deterministic
    assert 7000 <= sum(map(len, uni)) <= 8100
    idx = [docs.index(d) for d in uni]
    assert idx == sorted(idx) and max(idx) > 500 and min(idx) < 500  # spread over the corpus, in order
    assert sample_texts(docs, 10**9, "uniform") == docs


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not empty"):
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "f").write_text("1")
        train_tokenizer(["abc"], tmp_path / "x", TokenizerConfig())
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(["", "  "], tmp_path / "y", TokenizerConfig())
    with pytest.raises(UserError, match="bytelevel needs at least"):
        train_tokenizer(["abc"], tmp_path / "z", TokenizerConfig(type="bytelevel", vocab_size=261, user_defined_symbols=["<a>", "<b>"]))
    with pytest.raises(UserError, match="clashes"):
        train_tokenizer(["abc"], tmp_path / "w", TokenizerConfig(user_defined_symbols=["<s>"]))
    with pytest.raises(UserError, match="not a tokenizer dir"):
        Tokenizer.load(tmp_path)


def test_iter_training_texts_reads_txt_and_jsonl(tmp_path):
    import gzip

    (tmp_path / "a.txt").write_text("para one\nline\n\npara two\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "1", "text": "json doc"}) + "\n")
    assert list(iter_training_texts([tmp_path])) == ["para one\nline\n\n", "para two\n", "json doc"]
    with pytest.raises(UserError, match="no such"):
        list(iter_training_texts([tmp_path / "missing"]))
    # a cleaned-shard dir: the kept documents only, never the rejected ones
    clean = tmp_path / "clean"
    clean.mkdir()
    for name, text in (("clean-00000.jsonl.gz", "kept"), ("rejected-00000.jsonl.gz", "rejected")):
        with gzip.open(clean / name, "wt", encoding="utf-8") as f:
            f.write(json.dumps({"id": "1", "text": text, "reason": "x"}) + "\n")
    assert list(iter_training_texts([clean])) == ["kept"]
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gz text")
    assert list(iter_training_texts([tmp_path / "c.txt.gz"])) == ["gz text"]


def test_cli_tokenizer_train(tmp_path):
    (tmp_path / "in.txt").write_text("\n\n".join(_corpus()[:300]), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "text2llm", "tokenizer", "train", str(tmp_path / "in.txt"),
                        "--out", str(tmp_path / "tok"), "--type", "bytelevel", "--vocab-size", "400"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 300 < Tokenizer.load(tmp_path / "tok").vocab_size <= 400  # fewer when the text runs out of merges


@pytest.fixture(scope="module")
def hf_toks(toks, tmp_path_factory):
    from transformers import AutoTokenizer

    out = {}
    for typ, tok in toks.items():
        d = tmp_path_factory.mktemp(f"hf-{typ}")
        tok.save_hf(d)
        out[typ] = AutoTokenizer.from_pretrained(d)
    return out


@pytest.mark.parametrize("typ", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_text, _mixed))
def test_hf_export_property(toks, hf_toks, typ, text):
    assert hf_toks[typ].encode(text, add_special_tokens=False) == toks[typ].encode(text)
