"""train.time_budget_s: the run times its first steps, then fixes max_steps once, in config.toml."""

from __future__ import annotations

import json

from text2llm.config import load_config
from text2llm.train.trainer import _steps_within_budget, train

from conftest import TINY_OVERRIDES


def test_budget_arithmetic():
    tc = load_config(None, ["train.max_steps=1000", "train.time_budget_s=100", "train.eval_every=0"]).train
    # 10 s spent, 0.5 s/step: (95 - 10) / 0.5 = 170 more steps after step 20
    assert _steps_within_budget(tc, 20, 10.0, 0.5) == 190
    tc.max_steps = 100
    assert _steps_within_budget(tc, 20, 10.0, 0.5) == 100  # never more than max_steps
    assert _steps_within_budget(tc, 20, 500.0, 0.5) == 20  # budget already spent: stop at once


def test_tiny_budget_stops_after_probe_and_records_steps(tiny_run, tmp_path):
    cfg = load_config(None, [o for o in TINY_OVERRIDES if not o.startswith("tokenizer.")]
                      + ["train.max_steps=1000", "train.time_budget_s=0.001", "train.budget_probe_steps=3"])
    result = train(cfg, tiny_run / "tokens", tmp_path / "run", progress=False)
    assert result.step == 3
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.train.max_steps == 3 and saved.train.time_budget_s == 0  # decided once; resume stays exact
    assert load_config(result.last_checkpoint / "config.toml").train.max_steps == 3
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    # the caller's config is left as it was: the decision (and the vocab size) live in the run's config
    assert cfg.train.max_steps == 1000 and cfg.train.time_budget_s == 0.001 and cfg.model.vocab_size == 0
    assert saved.model.vocab_size > 0
