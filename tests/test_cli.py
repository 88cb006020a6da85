"""stopkit's command line: each user error is one line ``stopkit <command>: <message>`` on stderr
with exit status 2, --debug shows the traceback, a bug keeps its traceback, Ctrl-C exits 130,
every command's help has examples, parsing does not import transformers, and ``stopkit bench``
finds bench/ or says it needs a checkout.

The commands run in-process through ``stopkit.cli.main(argv)`` on the shipped toy model and on a
tiny random model (another hidden size), and once as a subprocess."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stopkit.cli import COMMANDS, UserError, main
from stopkit.toy import ADAPTER_DIR, MODEL_DIR

TOY = str(MODEL_DIR)
SMALL = ["--n", "4", "--keep", "2", "--prefix-tokens", "4", "--max-new-tokens", "8"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Paths of good and broken inputs, by name (for str.format in the argv below)."""
    from test_reasoner import build_tiny

    from stopkit.stop import StopScorer

    root = tmp_path_factory.mktemp("cli")
    model, _tok = build_tiny()  # hidden size 128; the toy model's is 256
    StopScorer.new(model, num_tokens=4, lora_rank=4, seed=0).save(root / "tiny-adapter")

    def broken_copy(src: Path, name: str, file: str, data: bytes | None = None) -> None:
        shutil.copytree(src, root / name)
        target = root / name / file
        target.write_bytes(target.read_bytes()[:100] if data is None else data)

    broken_copy(ADAPTER_DIR, "adapter-trunc", "stop.safetensors")
    broken_copy(ADAPTER_DIR, "adapter-badjson", "stop_config.json", b"{not json")
    broken_copy(MODEL_DIR, "model-trunc", "model.safetensors")
    broken_copy(MODEL_DIR, "model-badcfg", "config.json", b"{oops")
    authors = root / "authors-garbage"  # the authors' layout, with a garbage torch.save file
    shutil.copytree(ADAPTER_DIR / "adapter", authors / "adapter")
    (authors / "assess_token_config.json").write_text(json.dumps({"num_assess_tokens": 4}))
    (authors / "assess_token_embedding.pth").write_bytes(b"PK\x03\x04 not a zip archive")
    (authors / "classifier_head.pth").write_bytes(b"not a torch file either")
    good = json.dumps({"question": "3 #1 + 1 mod 31 ?", "answer": "4"})
    (root / "good.jsonl").write_text(good + "\n")
    (root / "bad.jsonl").write_text(good + '\n{"question": oops}\n')
    (root / "labels-bad.jsonl").write_text(
        '{"prefix_token_ids": [1, 2], "soft_label": 0.5}\n{"prefix_token_ids": [1, 2], "soft_label": 2}\n'
    )
    (root / "labels.jsonl").write_text(
        "".join(
            json.dumps({"id": i % 3, "prefix_token_ids": [1, 2, 3], "soft_label": i / 6}) + "\n"
            for i in range(6)
        )
    )
    return {
        "root": str(root),
        "toy": TOY,
        "adapter": str(ADAPTER_DIR),
        **{p.name.replace("-", "_").replace(".", "_"): str(p) for p in root.iterdir()},
    }


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr without progress bars) of ``stopkit argv``."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, without_progress_bars(err)


def without_progress_bars(err: str) -> str:
    """stderr less the tqdm bars transformers draws while loading a model (each redraw starts
    with a carriage return; the last ends the line)."""
    return re.sub(r"\r[^\r\n]*\n?", "", err)


SOLVE = ["solve", *SMALL, "--method", "random"]
# (command line, what the one line must say after "stopkit <command>: ")
USER_ERRORS = {
    "missing model folder": (
        [*SOLVE, "--model", "{root}/nope", "q"],
        r"--model \S*/nope: no such folder",
    ),
    "model folder without config.json": (
        [*SOLVE, "--model", "{root}", "q"],
        r"--model \S+: no config.json there",
    ),
    "truncated model weights": (
        [*SOLVE, "--model", "{model_trunc}", "q"],
        r"cannot read --model \S*/model-trunc: Error while deserializing header",
    ),
    "model config.json not JSON": (
        [*SOLVE, "--model", "{model_badcfg}", "q"],
        r"model-badcfg/config.json' is not a valid JSON",
    ),
    "missing data file": (
        ["eval", "--model", "{toy}", "--data", "{root}/nope.jsonl", "--methods", "full", *SMALL],
        r"no problems file at \S*/nope.jsonl \(JSONL or a JSON array; question / problem",
    ),
    "bad JSON line": (
        ["eval", "--model", "{toy}", "--data", "{bad_jsonl}", "--methods", "full", *SMALL],
        r"\S*/bad.jsonl:2: not valid JSON: Expecting value",
    ),
    "bad label record": (
        ["train", "--model", "{toy}", "--data", "{labels_bad_jsonl}", "--out", "{root}/out"],
        r"\S*/labels-bad.jsonl:2: soft_label must be a real number in \[0, 1\], got 2.0$",
    ),
    "adapter of another model": (
        ["solve", *SMALL, "--model", "{toy}", "--adapter", "{tiny_adapter}", "q"],
        r"checkpoint \S*/tiny-adapter has hidden size 128 .* the model's hidden size is 256$",
    ),
    "truncated adapter safetensors": (
        ["solve", *SMALL, "--model", "{toy}", "--adapter", "{adapter_trunc}", "q"],
        (
            r"\S*/adapter-trunc/stop.safetensors is not a readable safetensors file \(truncated or "
            r"corrupt\?\): Error while deserializing header"
        ),
    ),
    "garbage .pth": (
        ["solve", *SMALL, "--model", "{toy}", "--adapter", "{authors_garbage}", "q"],
        r"\S*/assess_token_embedding.pth is not a readable torch.save file",
    ),
    "adapter config not JSON": (
        ["solve", *SMALL, "--model", "{toy}", "--adapter", "{adapter_badjson}", "q"],
        r"\S*/adapter-badjson/stop_config.json is not valid JSON",
    ),
    "checkpoint for another model given to train --init": (
        [
            "train",
            "--model",
            "{toy}",
            "--data",
            "{labels_jsonl}",
            "--out",
            "{root}/out",
            "--init",
            "{tiny_adapter}",
        ],
        r"has hidden size 128 .* hidden size is 256$",
    ),
    "--n 0": ([*SOLVE, "--n", "0", "--model", "{toy}", "q"], r"^n must be an int >= 1, got 0$"),
    "--top-p 2": (
        [*SOLVE, "--top-p", "2", "--model", "{toy}", "q"],
        r"^--top-p must be a real number in \(0, 1\], got 2.0$",
    ),
    "--n x": (
        [*SOLVE, "--n", "x", "--model", "{toy}", "q"],
        r"^argument --n: invalid int value: 'x'$",
    ),
    "--dtype float8": (
        [*SOLVE, "--dtype", "float8", "--model", "{toy}", "q"],
        r"^argument --dtype: invalid choice: 'float8'",
    ),
    "--device nonsense": (
        [*SOLVE, "--device", "nonsense", "--model", "{toy}", "q"],
        r"^argument --device: expected a torch device",
    ),
    "--seeds a,b": (
        ["eval", "--model", "{toy}", "--data", "{good_jsonl}", "--seeds", "a,b"],
        r"^argument --seeds: expected comma-separated ints, got 'a,b'$",
    ),
    "method stop without --adapter": (
        ["solve", *SMALL, "--model", "{toy}", "q"],
        r"^method stop needs --adapter",
    ),
    "eval --out is a file": (
        [
            "eval",
            "--model",
            "{toy}",
            "--data",
            "{good_jsonl}",
            "--methods",
            "full",
            *SMALL,
            "--out",
            "{good_jsonl}",
        ],
        r"^--out \S*/good.jsonl: cannot create the folder .*File exists",
    ),
    "label --max-new-tokens <= --prefix-tokens": (
        [
            "label",
            "--model",
            "{toy}",
            "--problems",
            "{good_jsonl}",
            "--out",
            "{root}/l.jsonl",
            "--prefix-tokens",
            "8",
            "--max-new-tokens",
            "8",
        ],
        r"^--max-new-tokens \(8\) must exceed",
    ),
    "train --init-token unknown": (
        [
            "train",
            "--model",
            "{toy}",
            "--data",
            "{labels_jsonl}",
            "--out",
            "{root}/out",
            "--init-token",
            "NOT-A-TOKEN",
        ],
        r"^--init-token 'NOT-A-TOKEN' is not a token",
    ),
    "train --lr 0": (
        [
            "train",
            "--model",
            "{toy}",
            "--data",
            "{labels_jsonl}",
            "--out",
            "{root}/out",
            "--lr",
            "0",
        ],
        r"^--lr must be a finite real number > 0, got 0.0$",
    ),
    "plan: budget too small": (
        [
            "plan",
            "--budget",
            "10",
            "--prefix-tokens",
            "2048",
            "--task-tokens",
            "8192",
            "--keep",
            "8",
        ],
        r"^budget_tokens=10 is too small",
    ),
    "demo --keep > --n": (
        ["demo", "--n", "2", "--keep", "3"],
        r"^keep must be an int in \[1, 2\], got 3$",
    ),
    "no command": ([], r"^the following arguments are required: command$"),
}


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_error_is_one_line_and_exit_2(case, inputs, capsys):
    argv, message = USER_ERRORS[case]
    argv = [a.format(**inputs) for a in argv]
    code, out, err = run(argv, capsys)
    prog = f"stopkit {argv[0]}" if argv else "stopkit"
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: ") and re.search(message, err[len(prog) + 2 : -1]), err
    assert out == ""


def test_user_error_in_a_subprocess(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "stopkit", *SOLVE, "--model", str(tmp_path / "nope"), "q"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert p.returncode == 2
    assert without_progress_bars(p.stderr) == (
        f"stopkit solve: --model {tmp_path / 'nope'}: no such folder (nor a Hugging Face hub id)\n"
    )
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "stopkit",
            "--debug",
            *SOLVE,
            "--model",
            str(tmp_path / "nope"),
            "q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert p.returncode == 1
    assert p.stderr.startswith("Traceback (most recent call last):")
    assert p.stderr.rstrip().splitlines()[-1].startswith("stopkit.cli.errors.UserError: --model ")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, inputs, capsys):
    argv = ["solve", *SMALL, "--model", TOY, "--adapter", inputs["adapter_trunc"], "q"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(UserError, match=r"stop\.safetensors is not a readable") as e:
        main(argv)
    # the chain keeps the original error for the traceback
    assert isinstance(e.value.__cause__, ValueError)
    assert type(e.value.__cause__.__cause__).__name__ == "SafetensorError"
    assert without_progress_bars(capsys.readouterr().err) == ""


@pytest.mark.parametrize("error", [ValueError, RuntimeError, OSError, TypeError])
def test_a_bug_after_loading_keeps_its_traceback(error, monkeypatch, capsys):
    """Errors the engine raises are not the user's: main lets them through."""
    from stopkit.reasoner import ParallelReasoner

    def broken(self, *args, **kwargs):
        raise error("a bug in the engine")

    monkeypatch.setattr(ParallelReasoner, "solve", broken)
    with pytest.raises(error, match="a bug in the engine"):
        main([*SOLVE, "--model", TOY, "q"])


@pytest.mark.parametrize(
    "command,argv,message",
    [
        ("solve", [*SOLVE, "--model", TOY, "q"], "stopkit solve: interrupted\n"),
        (
            "label",
            [
                "label",
                "--model",
                TOY,
                "--problems",
                "{good_jsonl}",
                "--out",
                "{root}/l.jsonl",
                "--prefix-tokens",
                "4",
                "--max-new-tokens",
                "8",
            ],
            "stopkit label: interrupted; rerun the same command to resume\n",
        ),
    ],
)
def test_ctrl_c_is_one_line_and_exit_130(command, argv, message, inputs, monkeypatch, capsys):
    import stopkit.label
    import stopkit.reasoner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stopkit.reasoner.ParallelReasoner, "solve", interrupted)
    monkeypatch.setattr(stopkit.label, "label_problems", interrupted)
    argv = [a.format(**inputs) for a in argv]
    code, _, err = run(argv, capsys)
    assert (code, err) == (130, message)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--debug"])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"\nexamples:\n  stopkit {command}" in out


def test_parsing_does_not_import_transformers():
    code = (
        "import sys; from stopkit.cli import build_parser, main; build_parser(); "
        "assert main(['plan', '--budget', '100000', '--prefix-tokens', '2048', "
        "'--task-tokens', '8192', '--keep', '8']) == 0; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'peft', 'matplotlib', 'stopkit.engine')))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=True,
    )
    assert p.stdout.splitlines() == ["n=24 keep=8 expected_tokens=98304", "[]"]


# ---- stopkit bench ----------------------------------------------------------------------------------
def test_bench_finds_the_checkout_and_runs_pytest(monkeypatch, tmp_path, capsys):
    from stopkit.cli import bench

    assert bench.find_bench_dir() == ROOT / "bench"
    calls = []
    monkeypatch.setattr(bench.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert run(["bench", "-k", "write_kv", "--json", str(tmp_path / "b.json")], capsys)[0] == 0
    assert calls[0][1:4] == ["-m", "pytest", str(ROOT / "bench")]
    assert calls[0][-3:] == ["-k", "write_kv", f"--benchmark-json={tmp_path / 'b.json'}"]


def _installed_without_checkout(monkeypatch, tmp_path, direct_url: dict | None) -> None:
    """As if stopkit were installed into site-packages, from ``direct_url`` (PEP 610)."""
    import importlib.metadata

    from stopkit.cli import bench

    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages/stopkit/cli/bench.py"))

    class Dist:
        def read_text(self, name):
            assert name == "direct_url.json"
            return None if direct_url is None else json.dumps(direct_url)

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())


def test_bench_without_a_checkout_says_so(monkeypatch, tmp_path, capsys):
    _installed_without_checkout(monkeypatch, tmp_path, None)
    code, _, err = run(["bench"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("stopkit bench: the benchmarks are in bench/ of a stopkit checkout")
    code, _, err = run(["bench", "--dir", str(tmp_path / "nope")], capsys)
    assert (code, err) == (
        2,
        (
            f"stopkit bench: --dir {tmp_path / 'nope'}: no such folder; expected "
            "bench/ of a stopkit checkout\n"
        ),
    )


def test_bench_finds_the_checkout_it_was_installed_from(monkeypatch, tmp_path):
    from stopkit.cli import bench

    checkout = tmp_path / "src dir" / "stopkit"
    (checkout / "bench").mkdir(parents=True)
    (checkout / "bench" / "conftest.py").write_text("")
    _installed_without_checkout(monkeypatch, tmp_path, {"url": checkout.as_uri(), "dir_info": {}})
    assert bench.find_bench_dir() == checkout / "bench"


@pytest.mark.parametrize("command", ["solve", "label", "eval", "serve"])
def test_engine_options_reach_the_engine(command):
    """--num-blocks, --max-num-seqs, --max-batch-tokens and --compile become the engine's."""
    from stopkit.cli import build_parser
    from stopkit.cli.inputs import make_engine
    from stopkit.toy import load_model

    required = {
        "solve": ["1+1", "--prefix-tokens", "4"],
        "label": ["--problems", "p.jsonl", "--out", "o", "--prefix-tokens", "4"],
        "eval": ["--data", "d.jsonl"],
        "serve": [],
    }[command]
    model, _ = load_model()
    for extra, compiled in (([], False), (["--compile"], True)):
        args = build_parser().parse_args(
            [
                command,
                "--model",
                str(MODEL_DIR),
                *required,
                "--num-blocks",
                "40",
                "--max-num-seqs",
                "7",
                "--max-batch-tokens",
                "96",
                *extra,
            ]
        )
        engine = make_engine(args, model)
        assert (
            engine.cache.num_blocks,
            engine.scheduler.max_num_seqs,
            engine.scheduler.max_batch_tokens,
        ) == (40, 7, 96)
        assert (engine.runner.compiled_decode is not None) is compiled
