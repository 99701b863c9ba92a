"""A verb whose optional extra is not installed says so in one line (exit 2, no traceback):
each case hides the extra's modules (sys.modules[name] = None: find_spec says absent, import fails)."""

from __future__ import annotations

import json
import sys

import pytest

from test_generate import shared_checkpoint

from text2llm.cli import main
from text2llm.errors import UserError, require


def _hide(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def _one_line(capsys, verb: str, extra: str) -> None:
    err = capsys.readouterr().err
    assert err == f"error: text2llm {verb} needs the '{extra}' extra: pip install 'text2llm[{extra}]'\n"


def test_require():
    require(("json", "os"), "x", "verb")  # present: nothing happens
    with pytest.raises(UserError, match=r"^text2llm do it needs the 'x' extra: pip install 'text2llm\[x\]'$"):
        require(("json", "surely_not_a_module_t2l"), "x", "do it")


@pytest.mark.parametrize("hidden", ["onnx", "onnxscript", "onnxruntime"])
def test_export_onnx(tmp_path_factory, tmp_path, monkeypatch, capsys, hidden):
    _hide(monkeypatch, hidden)
    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(shared_checkpoint(tmp_path_factory)), "--out", str(out)]) == 2
    _one_line(capsys, "export onnx", "export")
    assert not out.exists()


def test_export_gguf(tmp_path_factory, tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "gguf")
    assert main(["export", "gguf", str(shared_checkpoint(tmp_path_factory)), "--out", str(tmp_path / "m.gguf")]) == 2
    _one_line(capsys, "export gguf", "export")
    assert not list(tmp_path.iterdir())


def test_eval_tasks(tmp_path_factory, monkeypatch, capsys):
    _hide(monkeypatch, "lm_eval")
    assert main(["eval", str(shared_checkpoint(tmp_path_factory)), "--tasks", "hellaswag"]) == 2
    _one_line(capsys, "eval --tasks", "eval")


@pytest.mark.parametrize("verb", [["generate", "--prompt", "Tom"], ["serve", "--port", "0"]])
def test_onnx_engine(tmp_path, monkeypatch, capsys, verb):
    """generate / serve of an ONNX export dir (onnxruntime); the dir's marker is all that is read first."""
    d = tmp_path / "onnx-export"
    d.mkdir()
    (d / "text2llm-onnx.json").write_text(json.dumps({"format_version": 2}))
    _hide(monkeypatch, "onnxruntime")
    assert main([verb[0], str(d), *verb[1:]]) == 2
    _one_line(capsys, "generate / serve of an ONNX export", "export")


def test_tensorboard_is_a_note_not_an_error(tmp_path, monkeypatch, capsys):
    """Training does not need TensorBoard (train.tensorboard is on by default): without the extra it
    writes metrics.jsonl and says once, in one line, what would add the TensorBoard logs."""
    from text2llm.metrics import MetricsWriter

    _hide(monkeypatch, "tensorboard")
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.write({"step": 1, "loss": 2.0})
    w.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the 'tensorboard' extra: pip install 'text2llm[tensorboard]'" in err
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 2.0}'
    assert not (tmp_path / "tb").exists()


def test_export_and_import_hf_need_no_extra(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """The Hugging Face dir is written and read with safetensors and tokenizers (base
    dependencies): transformers is needed only to load the result in transformers."""
    _hide(monkeypatch, "transformers")
    hf = tmp_path / "hf"
    assert main(["export", "hf", str(shared_checkpoint(tmp_path_factory)), "--out", str(hf)]) == 0
    assert main(["import", "hf", str(hf), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").is_file()
