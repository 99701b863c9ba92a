"""CLI help for every verb, config validation, and the shipped presets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from text2llm.cli import build_parser, main
from text2llm.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

VERBS = [
    ["clean"], ["tokenizer", "train"], ["pack"], ["train"], ["eval"], ["generate"], ["run"],
    ["export", "hf"], ["export", "onnx"], ["import", "hf"],
    ["compress", "quantize"], ["compress", "prune"], ["compress", "distill"], ["serve"],
]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_help_for_each_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: text2llm " + " ".join(verb))


def test_top_level_help_is_fast_and_light():
    # --help must not import torch (it would take seconds)
    code = "import sys; from text2llm.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
    r = subprocess.run([sys.executable, "-m", "text2llm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout


def test_defaults_equal_tiny_cpu_preset():
    assert load_config(REPO / "configs" / "tiny-cpu.toml").to_dict() == Config().to_dict()


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_every_preset_validates(preset):
    load_config(REPO / "configs" / preset)


def test_overrides_apply_with_toml_types():
    cfg = load_config(None, ["train.lr=1e-3", "model.n_layer=3", "model.norm=layernorm", 'run.inputs=["a.txt"]',
                             "train.compile=true"])
    assert cfg.train.lr == 1e-3 and cfg.model.n_layer == 3 and cfg.model.norm == "layernorm"
    assert cfg.run.inputs == ["a.txt"] and cfg.train.compile is True


@pytest.mark.parametrize("override, expect", [
    ("train.lrr=1", "train.lrr: unknown key (allowed: "),
    ("nosuch.x=1", "nosuch: unknown key"),
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("model.norm=batchnorm", "model.norm: Input should be 'rmsnorm' or 'layernorm'"),
    ("train.max_steps=abc", "train.max_steps: Input should be a valid integer"),
    ("model.n_head=5", "must be divisible by model.n_head"),
    ("train.seq_len=4096", "train.seq_len (4096) must be <= model.max_seq_len"),
])
def test_bad_config_one_clear_line(override, expect, capsys, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expect in str(e.value) and "\n" not in str(e.value)
    # and through the CLI: one line on stderr, exit status 2, no traceback
    rc = main(["train", override, "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and expect in err


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=2e-3", "model.d_model=128"])
    path = cfg.save(tmp_path)
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict() and again.hash() == cfg.hash()


def test_parser_has_no_unhandled_verbs():
    parser = build_parser()
    assert parser.prog == "text2llm"


def test_entry_exits_hard_after_joining_a_process_group(tmp_path):
    """After a torchrun process group, the command ends with os._exit: the exit code and the
    flushed output survive, interpreter finalization (here: an atexit handler) does not run."""
    code = ("import atexit, sys\n"
            "import text2llm.train.distributed as d\n"
            "from text2llm.cli import entry\n"
            "atexit.register(lambda: print('finalized'))\n"
            f"d.joined_process_group = {{joined}}\n"
            f"sys.argv = ['text2llm', 'eval', {str(tmp_path / 'missing')!r}, '--text', {str(tmp_path / 'missing.txt')!r}]\n"
            "print('output before exit')\n"
            "entry()\n")
    for joined, finalized in ((True, False), (False, True)):
        p = subprocess.run([sys.executable, "-c", code.format(joined=joined)], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2, p.stderr
        assert "error:" in p.stderr and "missing" in p.stderr
        assert p.stdout.startswith("output before exit")
        assert ("finalized" in p.stdout) is finalized
