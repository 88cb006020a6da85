"""stopkit demo: the shipped toy model and adapter load, the demo runs end to end (tiny sizes), and
a small fixed run is pinned: the same JSON in this process and in a fresh one, and the shipped
scorer's kept paths beat random's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stopkit.toy import demo

KEYS = {"avg_at_k", "maj_at_k", "pass_at_k", "vote_accuracy", "kept_accuracy", "tokens", "seconds"}
WALL_CLOCK = {"seconds", "seconds_total"}


def test_run_demo_small():
    cfg = demo.DemoConfig(problems=2, n=4, keep=2)
    results = demo.run_demo(cfg, progress=False)
    assert set(results["methods"]) == set(demo.METHODS)
    for name, m in results["methods"].items():
        assert set(m) >= KEYS, name
        assert 0.0 <= m["vote_accuracy"] <= 1.0 and 0.0 <= m["kept_accuracy"] <= 1.0
        assert m["tokens"] > 0
    full, stop = results["methods"]["full"], results["methods"]["stop"]
    # pruning 4 -> 2 after l_p tokens generates fewer tokens than running all 4 to the end
    assert stop["tokens"] < full["tokens"]
    # every unfinished path of a problem is scored once: at most 4 paths x 4 [STOP] tokens each
    assert 0 < stop["scoring_tokens"] <= 4 * 4 and full["scoring_tokens"] == 0


def _without_wall_clock(obj):
    if isinstance(obj, dict):
        return {k: _without_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK}
    if isinstance(obj, list):
        return [_without_wall_clock(v) for v in obj]
    return obj


def test_demo_is_pinned():
    """32 problems, 8 paths, keep 2: the CLI's JSON in a fresh process (another hash seed) is
    byte-for-byte this process's run once the wall-clock fields are removed, and the shipped
    adapter's kept paths are right clearly more often than random's (an untrained scorer's are
    not)."""
    config = demo.DemoConfig(problems=32, n=8, keep=2, methods=("stop", "random"))
    here = demo.run_demo(config, progress=False)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stopkit",
            "demo",
            "--json",
            "--problems",
            "32",
            "--n",
            "8",
            "--keep",
            "2",
            "--methods",
            "stop,random",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    there = json.loads(out.stdout)
    assert json.dumps(_without_wall_clock(there)) == json.dumps(_without_wall_clock(here))
    stop, rand = here["methods"]["stop"], here["methods"]["random"]
    assert stop["runs"] == rand["runs"] == 32
    assert stop["kept_accuracy"] >= rand["kept_accuracy"] + 0.1


def test_demo_cli_json():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stopkit",
            "demo",
            "--json",
            "--problems",
            "1",
            "--n",
            "4",
            "--keep",
            "2",
            "--methods",
            "full,stop",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = json.loads(out.stdout)
    assert set(results["methods"]) == {"full", "stop"}
    assert set(results["methods"]["stop"]) >= KEYS


def test_demo_rejects_unknown_method():
    with pytest.raises(ValueError, match="methods"):
        demo.run_demo(demo.DemoConfig(problems=1, n=2, keep=1, methods=("full", "nope")))


def test_build_adapter_stage_runs_the_label_and_train_pipeline(tmp_path):
    from stopkit.stop import StopScorer
    from stopkit.toy import MODEL_DIR, load_model
    from stopkit.toy.build import build_adapter

    kw = dict(
        label_seeds=[5, 6],
        problems=3,
        prefix_tokens=8,
        rollouts=2,
        traces=2,
        epochs=1,
        lr=1e-3,
        lora_rank=4,
        batch_size=4,
        seed=0,
    )
    report = build_adapter(MODEL_DIR, tmp_path / "adapter", work_dir=tmp_path / "work", **kw)
    assert report["records"] == 12
    # labelled by 2 Ray workers (a local Ray instance, started and stopped): the same records
    build_adapter(MODEL_DIR, tmp_path / "adapter2", work_dir=tmp_path / "work2", jobs=2, **kw)
    for shard in (5, 6):
        name = f"labels-{shard}.jsonl"
        one, two = ((tmp_path / w / name).read_text().splitlines() for w in ("work", "work2"))
        assert len(one) == 6 and sorted(one) == sorted(two)
    import ray

    assert not ray.is_initialized()
    model, _ = load_model()
    scorer = StopScorer.load(tmp_path / "adapter", model)
    assert scorer.num_tokens == 4
