"""benchmarks/quality.py's runner: case selection by name and group, and the summary against the baseline
(the training itself is what the benchmark measures; tests/test_muon.py etc. cover the options)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cases_select_by_name_and_group(quality):
    en = quality.select("en")
    assert en[0] == "baseline" and "muon" in en and all(quality.CASES[n]["group"] == "en" for n in en)
    assert quality.select("bos,baseline") == ["baseline", "bos"]  # registry order, each once
    with pytest.raises(SystemExit, match="unknown case or group nope"):
        quality.select("nope")
    from text2llm.config import load_config

    for name in quality.CASES:  # every case's overrides are valid config
        c = quality.case(name)
        load_config(c["config"], c["overrides"])


def test_summary_compares_each_seed_with_the_baseline(quality):
    recs = [{"case": "baseline", "seed": 1, "val_bpb": 1.0, "steps": 10, "tokens_per_s": 5.0},
            {"case": "baseline", "seed": 2, "val_bpb": 1.1, "steps": 10, "tokens_per_s": 5.0},
            {"case": "muon", "seed": 1, "val_bpb": 0.9, "steps": 9, "tokens_per_s": 4.0},
            {"case": "muon", "seed": 2, "val_bpb": 1.111, "steps": 9, "tokens_per_s": 4.0}]
    s = quality.summarize(recs)
    assert s["muon"]["vs_baseline_pct"] == [-10.0, 1.0] and s["muon"]["wins_every_seed"] is False
    assert s["baseline"]["val_bpb_spread"] == pytest.approx(0.1) and "vs_baseline_pct" not in s["baseline"]
