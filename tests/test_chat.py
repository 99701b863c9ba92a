"""The chat template: stored with the tokenizer, rendered by one function, exported as Jinja so
transformers' apply_chat_template gives the identical prompt, used by `generate --chat`."""

from __future__ import annotations

import io
import json
import warnings

import pytest

from test_generate import shared_checkpoint, tiny_checkpoint

import text2llm
from text2llm.chat import ChatTemplate, chat_template_jinja, render_chat
from text2llm.cli import main
from text2llm.errors import UserError
from text2llm.infer.decoding import SamplingParams, chat_prompt, complete
from text2llm.infer.generate import TorchEngine
from text2llm.tokenizer import Tokenizer

TRICKY = [{"role": "system", "content": 'Use "quotes", {braces}, {{ jinja }} and {% raw %} é 😀 \\n'},
          {"role": "user", "content": "Hi!\n  two lines"},
          {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "A story?"}]
ODD = ChatTemplate(system="<<SYS>> {content} <</SYS>>\n\n", user="[INST] '{content}' [/INST]",
                   assistant=' "{content}" </s>\t', generation_prompt=" ✓", stop=["[INST]"])


def test_default_template():
    assert render_chat(ChatTemplate(), TRICKY[1:3]) == "User: Hi!\n  two lines\nAssistant: Hello.\nAssistant:"
    assert render_chat(ChatTemplate(), TRICKY[1:2], add_generation_prompt=False) == "User: Hi!\n  two lines\n"
    with pytest.raises(UserError, match=r"messages\[0\].role: 'robot'"):
        render_chat(ChatTemplate(), [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="exactly once"):
        ChatTemplate(user="no slot")


def test_template_is_stored_with_the_tokenizer_and_checked_on_load(tmp_path):
    from text2llm.config import load_config
    from text2llm.tokenizer import train_tokenizer

    cfg = load_config(None, ["tokenizer.vocab_size=300", "tokenizer.threads=1",
                             'tokenizer.chat_template.user="Q: {content}\\n"'])
    tok = train_tokenizer(["Once upon a time there was a cat. " * 20], tmp_path / "tok", cfg.tokenizer)
    assert Tokenizer.load(tmp_path / "tok").render_chat([{"role": "user", "content": "hi"}]) == "Q: hi\nAssistant:"
    meta = json.loads((tmp_path / "tok" / "text2llm-tokenizer.json").read_text())
    meta["chat_template"]["assistant"] = "A: no slot"
    (tmp_path / "tok" / "text2llm-tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"text2llm-tokenizer.json: chat_template.*assistant.*exactly once"):
        Tokenizer.load(tmp_path / "tok").chat_template
    del meta["chat_template"]  # a tokenizer saved before chat templates: the default
    (tmp_path / "tok" / "text2llm-tokenizer.json").write_text(json.dumps(meta))
    assert Tokenizer.load(tmp_path / "tok").chat_template == ChatTemplate()
    assert tok.encode_chat(TRICKY[1:2]) == [tok.bos_id] + tok.encode("Q: Hi!\n  two lines\nAssistant:")


@pytest.mark.parametrize("template", [ChatTemplate(), ODD], ids=["default", "odd"])
def test_transformers_apply_chat_template_gives_the_same_prompt(tmp_path_factory, tmp_path, template):
    transformers = pytest.importorskip("transformers")
    from text2llm.interop.hf import export_hf

    ckpt = shared_checkpoint(tmp_path_factory)
    if template is ODD:  # a checkpoint whose tokenizer carries another template
        ckpt = tmp_path / "ckpt"
        import shutil

        shutil.copytree(shared_checkpoint(tmp_path_factory), ckpt)
        meta_path = ckpt / "tokenizer" / "text2llm-tokenizer.json"
        meta = json.loads(meta_path.read_text())
        meta["chat_template"] = template.model_dump()
        meta_path.write_text(json.dumps(meta))
    _, tok = text2llm.load(ckpt)
    out = export_hf(ckpt, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == chat_template_jinja(template)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for gen in (True, False):
        text = hf.apply_chat_template(TRICKY, tokenize=False, add_generation_prompt=gen)
        assert text == tok.render_chat(TRICKY, gen) == render_chat(template, TRICKY, gen)
    assert hf(hf.apply_chat_template(TRICKY, tokenize=False, add_generation_prompt=True))["input_ids"] == \
        tok.encode_chat(TRICKY)


def test_generate_chat_reads_turns_from_stdin(tmp_path_factory, monkeypatch, capsys):
    ckpt = shared_checkpoint(tmp_path_factory)
    model, tok = text2llm.load(ckpt)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nMore\n"))
    assert main(["generate", str(ckpt), "--chat", "--system", "Be kind", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    replies = capsys.readouterr().out.split("\n")[:2]
    # the same conversation through the decoding loop: the second turn sees the first reply
    engine, p = TorchEngine(model), SamplingParams(max_new_tokens=4, temperature=0)
    history = [{"role": "system", "content": "Be kind"}]
    for line, got in zip(["Hi", "More"], replies):
        history.append({"role": "user", "content": line})
        ids, params = chat_prompt(tok, history, p)
        (c,) = complete(engine, tok, [], params, prompt_ids=[ids], lstrip=True)
        assert got == c.text
        history.append({"role": "assistant", "content": c.text})
    # a conversation longer than the context (64 tokens) drops its oldest turns, never cuts one
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a long story about a dog\n" * 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fit_prompts' left truncation would warn
        assert main(["generate", str(ckpt), "--chat", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count("\n") == 5
    assert main(["generate", str(ckpt), "--chat", "--prompt", "x"]) == 2


def test_chat_reply_stops_at_the_next_turn(tmp_path):
    """A base model that starts the next turn itself is cut there (the template's stop strings),
    and the reply starts at its first non-whitespace character."""

    class Scripted:  # an engine whose greedy continuation spells a fixed text
        def __init__(self, tok, text):
            self.ids, self.max_len, self.i = tok.encode(text), 64, 0
            self.V = tok.vocab_size

        def _logits(self):
            import numpy as np

            out = np.zeros((1, self.V), np.float32)
            out[0, self.ids[min(self.i, len(self.ids) - 1)]] = 10
            self.i += 1
            return out

        def prefill(self, ids, mask, total_len=None):
            return self._logits()

        def step(self, nxt):
            return self._logits()

    ckpt = tiny_checkpoint(tmp_path)
    _, tok = text2llm.load(ckpt)
    ids, p = chat_prompt(tok, [{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=30, temperature=0))
    (c,) = complete(Scripted(tok, "  Hello you.\nUser: more"), tok, [], p, prompt_ids=[ids], lstrip=True)
    assert c.text == "Hello you." and c.finish_reason == "stop"
    (c,) = complete(Scripted(tok, "\nUser: more"), tok, [], p, prompt_ids=[ids], lstrip=True)
    assert c.text == "" and c.finish_reason == "stop"  # the stop string is found before the strip
