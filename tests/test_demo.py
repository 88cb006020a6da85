"""stopkit demo: the shipped toy model and adapter load, and the demo runs end to end (tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stopkit.toy import demo

KEYS = {"avg_at_k", "maj_at_k", "pass_at_k", "vote_accuracy", "kept_accuracy", "tokens", "seconds"}


def test_run_demo_small():
    cfg = demo.DemoConfig(problems=2, n=4, keep=2)
    results = demo.run_demo(cfg, progress=False)
    assert set(results["methods"]) == set(demo.METHODS)
    for name, m in results["methods"].items():
        assert KEYS <= set(m), name
        assert 0.0 <= m["vote_accuracy"] <= 1.0 and 0.0 <= m["kept_accuracy"] <= 1.0
        assert m["tokens"] > 0
    full, stop = results["methods"]["full"], results["methods"]["stop"]
    # pruning 4 -> 2 after l_p tokens generates fewer tokens than running all 4 to the end
    assert stop["tokens"] < full["tokens"]
    # every unfinished path of a problem is scored once: at most 4 paths x 4 [STOP] tokens each
    assert 0 < stop["scoring_tokens"] <= 4 * 4 and full["scoring_tokens"] == 0


def test_demo_cli_json():
    out = subprocess.run([sys.executable, "-m", "stopkit", "demo", "--json", "--problems", "1", "--n",
                          "4", "--keep", "2", "--methods", "full,stop"],
                         capture_output=True, text=True, timeout=300, check=True)
    results = json.loads(out.stdout)
    assert set(results["methods"]) == {"full", "stop"}
    assert KEYS <= set(results["methods"]["stop"])


def test_demo_rejects_unknown_method():
    with pytest.raises(ValueError, match="methods"):
        demo.run_demo(demo.DemoConfig(problems=1, n=2, keep=1, methods=("full", "nope")))


def test_build_adapter_stage_runs_the_label_and_train_pipeline(tmp_path):
    from stopkit.stop import StopScorer
    from stopkit.toy import MODEL_DIR, load_model
    from stopkit.toy.build import build_adapter

    kw = dict(label_seeds=[5, 6], problems=1, prefix_tokens=8, rollouts=2, traces=1, epochs=1,
              lr=1e-3, lora_rank=4, batch_size=2, seed=0)
    report = build_adapter(MODEL_DIR, tmp_path / "adapter", work_dir=tmp_path / "work", **kw)
    assert report["records"] == 2
    # shards labelled by parallel processes hold the same records
    build_adapter(MODEL_DIR, tmp_path / "adapter2", work_dir=tmp_path / "work2", jobs=2, **kw)
    for shard in (5, 6):
        name = f"labels-{shard}.jsonl"
        assert (tmp_path / "work" / name).read_text() == (tmp_path / "work2" / name).read_text()
    model, _ = load_model()
    scorer = StopScorer.load(tmp_path / "adapter", model)
    assert scorer.num_tokens == 4
