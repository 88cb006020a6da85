"""bench/summarize_runs.py: per-case medians, ranges and target counts over benchmark JSON files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "summarize_runs.py"


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("summarize_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_json(path: Path, rows: dict[str, tuple[float, float, float]]) -> Path:
    """A pytest-benchmark JSON file with, per case id, our row (seconds, speedup, copy fraction)
    and the reference's."""
    benchmarks = []
    for case, (seconds, speedup, fraction) in rows.items():
        benchmarks.append(
            dict(
                param=f"{case}-torch-sdpa",
                params=dict(impl="torch-sdpa"),
                stats=dict(median=seconds * speedup),
                extra_info=dict(copy_fraction=0.05),
            )
        )
        benchmarks.append(
            dict(
                param=f"{case}-stopkit",
                params=dict(impl="stopkit"),
                stats=dict(median=seconds),
                extra_info=dict(
                    copy_fraction=fraction, speedup_vs_reference=speedup, isa="amx", threads=2
                ),
            )
        )
    path.write_text(
        json.dumps(
            dict(
                benchmarks=benchmarks,
                datetime="2026-12-01T05:00:00+00:00",
                commit_info=dict(id="0123456789abcdef"),
            )
        )
    )
    return path


def summary(summarize, monkeypatch, capsys, *args: str) -> dict[str, list[str]]:
    monkeypatch.setattr(sys, "argv", ["summarize_runs.py", *args])
    summarize.main()
    return {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("cpu-")
    }


def test_medians_ranges_and_counts(summarize, tmp_path, monkeypatch, capsys):
    target, other = "cpu-1.5B-B32-ctx2048-H12-KV2-q4-bf16", "cpu-8B-B64-ctx4096-H32-KV8-q1-fp32"
    paths = [
        run_json(tmp_path / f"{i}.json", {target: (s, x, f), other: (10 * s, 9.0, f + 0.1)})
        for i, (s, x, f) in enumerate(
            [(0.004, 12.0, 0.55), (0.005, 9.5, 0.45), (0.003, 15.0, 0.61)]
        )
    ]
    rows = summary(summarize, monkeypatch, capsys, *map(str, paths))
    # case, runs, ms median [min-max], speedup median [min-max], % copy median [min-max], counts
    assert rows[target] == [
        target,
        "3",
        "4.00",
        "[3.00-5.00]",
        "12.0",
        "[9.5-15.0]",
        "55.0",
        "[45.0-61.0]",
        "2/3",
        "2/3",
    ]
    assert rows[other][-2:] == ["-", "3/3"]  # speedups counted only for the target's case
    rows = summary(
        summarize,
        monkeypatch,
        capsys,
        "--min-copy",
        "0.6",
        "--speedup-cases",
        "8B",
        *map(str, paths),
    )
    assert rows[target][-2:] == ["-", "1/3"] and rows[other][-2:] == ["0/3", "2/3"]


def test_rejects_other_files(summarize, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.md").write_text("# not json")
    (tmp_path / "empty.json").write_text(json.dumps(dict(benchmarks=[], datetime="x")))
    for name, message in [
        ("notes.md", "not a pytest-benchmark JSON file"),
        ("empty.json", "no stopkit rows"),
    ]:
        monkeypatch.setattr(sys, "argv", ["summarize_runs.py", str(tmp_path / name)])
        with pytest.raises(SystemExit):
            summarize.main()
        assert message in capsys.readouterr().err
