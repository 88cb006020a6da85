"""Build the demo's checkpoints: ``python -m stopkit.toy.build --stage base``, then ``--stage adapter``.

Stage ``base`` trains a tiny LlamaForCausalLM from scratch on CPU on fresh ``train``-split problems
(loss on the solution tokens only), saves it with its tokenizer under ``--out`` (default: the
package assets), then samples held-out ``test`` problems with plain ``model.generate`` and logs how
often it slips (written to ``report.json`` beside the model). Deterministic given ``--seed`` and
``--threads``.

Stage ``adapter`` labels train-split prefixes with Monte-Carlo rollouts and trains the STOP scorer
on them, through the same functions as ``stopkit label`` and ``stopkit train``, and saves it under
the package assets beside the model (with ``report.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from stopkit.toy import ADAPTER_DIR, MAX_NEW_TOKENS, MODEL_DIR, PREFIX_TOKENS, TEMPERATURE
from stopkit.toy.task import (
    QUICK_SHARE,
    Problem,
    apply_op,
    check,
    extract_answer,
    extract_steps,
    generate,
    is_quick,
    quick_op,
    slip_rate,
)
from stopkit.toy.tokenizer import build_tokenizer

log = logging.getLogger("stopkit.toy.build")


def model_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The toy architecture: 4 layers, hidden 256, 4 query / 2 key-value heads of 64, MLP 512."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        max_position_embeddings=256,
        # rope_theta: transformers 5 maps it to rope_parameters, which 4.x (supported) lacks
        rms_norm_eps=1e-5,
        rope_theta=10000.0,  # type: ignore[call-arg]
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_batch(
    problems: list[Problem], tokenizer: PreTrainedTokenizerBase, rng: random.Random
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` [B, T] of slipping traces
    (``Problem.sample_solution``); labels only on the solution and eos."""
    rows, starts = [], []
    for p in problems:
        q = tokenizer(p.question)["input_ids"]
        s = tokenizer(p.sample_solution(rng), add_special_tokens=False)["input_ids"]
        rows.append(q + s + [tokenizer.eos_token_id])
        starts.append(len(q))
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, s : len(r)] = ids[i, s : len(r)]
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_base(
    steps: int, batch_size: int, lr: float, seed: int, log_every: int = 50
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Train the toy model from scratch; returns (model, tokenizer)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(tokenizer))
    log.info("toy model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        ),
    )
    eq_id = tokenizer.convert_tokens_to_ids("=")
    model.train()
    bar = tqdm(range(steps), desc="train base", unit="step")
    for step in bar:
        k = 2 * (seed * 1_000_003 + step)
        batch = make_batch(generate(batch_size, seed=k), tokenizer, random.Random(k + 1))
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():  # loss on the result tokens (after "=") and on all the others
                nll = torch.nn.functional.cross_entropy(
                    out.logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none"
                )
                is_res = batch["input_ids"][:, :-1] == eq_id
                is_tgt = batch["labels"][:, 1:] >= 0
                res = (nll[is_res & is_tgt].mean().item(), nll[~is_res & is_tgt].mean().item())
            bar.set_postfix(result_loss=f"{res[0]:.3f}", other_loss=f"{res[1]:.3f}")
            log.info(
                "step %d loss %.4f result_loss %.4f other_loss %.4f lr %.2e",
                step,
                out.loss.item(),
                *res,
                sched.get_last_lr()[0],
            )
    return model.eval(), tokenizer


def first_slip(problem: Problem, text: str) -> int | None:
    """Index of the first step of ``text`` that differs from the chain its approach (careful or
    quick) would write without slips, None if none."""
    ref, x = [], problem.start
    for (op, c), y in zip(
        problem.ops, problem.chain(quick_op if is_quick(text) else apply_op), strict=True
    ):
        ref.append((x, op, c, y))
        x = y
    got = extract_steps(text)
    for i, r in enumerate(ref):
        if i >= len(got) or got[i] != r:
            return i
    return len(ref) if len(got) > len(ref) else None


def _trace_accuracy(problem: Problem) -> float:
    """Probability that a training trace of ``problem`` ends right (ignoring slips that cancel)."""
    clean = math.prod(1 - slip_rate(op, c) for op, c in problem.ops)
    quick_right = problem.chain(quick_op)[-1] == problem.answer
    return clean * (1 - QUICK_SHARE + QUICK_SHARE * quick_right)


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    *,
    n: int = 16,
    temperature: float = TEMPERATURE,
    seed: int = 0,
    problems_per_batch: int = 16,
) -> dict[str, float]:
    """Sample ``n`` paths per problem with ``model.generate``; per-path and majority-vote accuracy,
    mean tokens per path, how often a path that slipped in its first third still ends right, and
    how often the steps after a path's first slip slip too."""
    torch.manual_seed(seed)
    correct, votes_right, tokens, early, early_right, per_problem = 0, 0, 0, 0, 0, []
    after_slip = [0, 0]  # steps written after a path's first slip: wrong ones, all
    quick = [0, 0]  # quick paths: all, right
    for i in tqdm(
        range(0, len(problems), problems_per_batch), desc=f"eval T={temperature}", unit="batch"
    ):
        chunk = problems[i : i + problems_per_batch]
        enc = tokenizer([p.question for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            num_return_sequences=n,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        for j, p in enumerate(chunk):
            answers, right = [], 0
            for row in new[j * n : (j + 1) * n]:
                length = int((row != tokenizer.pad_token_id).sum())
                text = cast(str, tokenizer.decode(row, skip_special_tokens=True))  # one sequence
                a = extract_answer(text)
                ok = a == p.answer
                answers.append(a)
                right += ok
                tokens += length
                quick_path = is_quick(text)
                step = quick_op if quick_path else apply_op
                if quick_path:
                    quick[0] += 1
                    quick[1] += ok
                slip = first_slip(p, text)
                if slip is not None and slip < math.ceil(len(p.ops) / 3):
                    early += 1
                    early_right += ok
                if slip is not None:
                    later = [y != step(x, op, c) for x, op, c, y in extract_steps(text)[slip + 1 :]]
                    after_slip[0] += sum(later)
                    after_slip[1] += len(later)
            correct += right
            per_problem.append(right / n)
            top = Counter(a for a in answers if a is not None).most_common(1)
            votes_right += bool(top) and top[0][0] == p.answer
    paths = len(problems) * n
    return {
        "temperature": temperature,
        "problems": len(problems),
        "n": n,
        "path_accuracy": correct / paths,
        "vote_accuracy": votes_right / len(problems),
        "mean_tokens_per_path": tokens / paths,
        "early_slip_rate": early / paths,
        "early_slip_still_right": early_right / max(1, early),
        # how often a step slips once the path has slipped: a model whose states know that a slip
        # happened could change it (the training traces keep slip_rate)
        "slip_rate_after_a_slip": after_slip[0] / max(1, after_slip[1]),
        "quick_share": quick[0] / paths,
        "quick_path_accuracy": quick[1] / max(1, quick[0]),
        "careful_path_accuracy": (correct - quick[1]) / max(1, paths - quick[0]),
        "problems_all_right": sum(a == 1.0 for a in per_problem) / len(problems),
        "problems_all_wrong": sum(a == 0.0 for a in per_problem) / len(problems),
        # what a model that works exactly as its training traces do would score per path
        "trace_path_accuracy": sum(map(_trace_accuracy, problems)) / len(problems),
    }


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Write config, float32 safetensors, tokenizer and generation config to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        max_new_tokens=MAX_NEW_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.float().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_adapter(
    model_dir: Path,
    out: Path,
    *,
    label_seeds: list[int],
    problems: int,
    prefix_tokens: int,
    rollouts: int,
    traces: int,
    epochs: int,
    lr: float,
    lora_rank: int,
    batch_size: int,
    seed: int,
    work_dir: Path,
    jobs: int = 1,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    head_hidden: int | None = None,
) -> dict:
    """Stage ``adapter``: Monte-Carlo labels and a trained STOP scorer for the model at ``model_dir``,
    through the code behind ``stopkit label`` and ``stopkit train`` (stopkit.train). For each of
    ``label_seeds``, ``problems`` train-split problems drawn with that seed are labelled into
    ``work_dir/labels-{seed}.jsonl`` (problem ids ``"{seed}-{i}"``, label seed ``seed``;
    resumable); ``jobs`` > 1 spreads them over that many Ray workers of one torch thread each
    (stopkit.distributed), with the same records. The best-validation-MSE scorer is saved to
    ``out``."""
    from stopkit.label import label_problems
    from stopkit.stop import StopScorer
    from stopkit.toy import load_model
    from stopkit.toy.tokenizer import STOP_TOKEN
    from stopkit.train import load_labels, split_by_problem, train_scorer

    work_dir.mkdir(parents=True, exist_ok=True)
    files = {shard: work_dir / f"labels-{shard}.jsonl" for shard in label_seeds}
    shards = {
        shard: [
            {"id": f"{shard}-{i}", "question": p.question, "answer": p.answer}
            for i, p in enumerate(generate(problems, seed=shard, split="train"))
        ]
        for shard in label_seeds
    }
    task: dict[str, Any] = dict(
        prefix_tokens=prefix_tokens,
        rollouts=rollouts,
        traces=traces,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        checker=check,
    )
    model, tokenizer = load_model(path=model_dir)
    t0 = time.perf_counter()
    if jobs > 1:
        from stopkit.distributed import ModelSpec, RayPool

        with RayPool(ModelSpec(str(model_dir), device="cpu"), workers=jobs) as pool:
            stats = {
                shard: pool.label_problems(shards[shard], files[shard], seed=shard, **task)
                for shard in label_seeds
            }
    else:
        stats = {
            shard: label_problems(model, tokenizer, shards[shard], files[shard], seed=shard, **task)
            for shard in label_seeds
        }
    label_s = time.perf_counter() - t0
    records = [r for f in files.values() for r in load_labels(f)]
    train, val = split_by_problem(records, 0.15, seed)
    soft = [r["soft_label"] for r in records]
    log.info(
        "labelled %d prefixes of %d problems in %.0f s: mean label %.3f, %.0f%% at 0, %.0f%% at 1",
        len(records),
        problems * len(label_seeds),
        label_s,
        sum(soft) / len(soft),
        100 * sum(s == 0 for s in soft) / len(soft),
        100 * sum(s == 1 for s in soft) / len(soft),
    )
    scorer = StopScorer.new(
        model,
        lora_rank=lora_rank,
        lora_alpha=2 * lora_rank,
        seed=seed,
        targets=targets,
        head_hidden=head_hidden,
        token_id=cast(int, tokenizer.convert_tokens_to_ids(STOP_TOKEN)),
    )
    t0 = time.perf_counter()
    history = train_scorer(
        scorer, train, val, out=out, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed
    )
    best = min(history[1:], key=lambda h: h["mse"])
    report = {
        "label_seconds": round(label_s, 1),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "label_stats": stats,
        "records": len(records),
        "mean_label": sum(soft) / len(soft),
        "prefix_tokens": prefix_tokens,
        "rollouts": rollouts,
        "traces": traces,
        "epochs": epochs,
        "lr": lr,
        "lora_rank": lora_rank,
        "targets": list(targets),
        "head_hidden": head_hidden,
        "history": history,
        "best": best,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("adapter: best validation %s, saved to %s", json.dumps(best), out)
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m stopkit.toy.build``: a maintainer's script that rebuilds the shipped assets, not
    a ``stopkit`` command, so its command line lives here with the build it drives."""
    ap = argparse.ArgumentParser(
        prog="python -m stopkit.toy.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--stage",
        required=True,
        choices=["base", "adapter"],
        help="base: the model; adapter: its STOP scorer (needs the base model)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: {MODEL_DIR} for base, {ADAPTER_DIR} for adapter)",
    )
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="adapter stage: the base model")
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=Path("toy-build"),
        help="adapter stage: where the labels-SEED.jsonl files go (resumable)",
    )
    ap.add_argument(
        "--label-seeds", default="2,3", help="adapter stage: one shard of problems per seed"
    )
    ap.add_argument(
        "--label-problems", type=int, default=1000, help="adapter stage: problems per shard"
    )
    ap.add_argument(
        "--label-jobs",
        type=int,
        default=1,
        help="adapter stage: Ray workers (one torch thread each) labelling in parallel; "
        "1: this process (default)",
    )
    ap.add_argument("--prefix-tokens", type=int, default=PREFIX_TOKENS, help="adapter stage: l_p")
    ap.add_argument(
        "--rollouts", type=int, default=8, help="adapter stage: continuations per prefix"
    )
    ap.add_argument("--traces", type=int, default=4, help="adapter stage: prefixes per problem")
    ap.add_argument("--epochs", type=int, default=8, help="adapter stage")
    ap.add_argument(
        "--adapter-lr", type=float, default=5e-4, help="adapter stage: AdamW learning rate"
    )
    ap.add_argument("--lora-rank", type=int, default=64, help="adapter stage")
    ap.add_argument(
        "--lora-targets",
        default="q_proj,v_proj",
        help="adapter stage: comma-separated Linear names that get LoRA",
    )
    ap.add_argument(
        "--head-hidden",
        type=int,
        default=None,
        help="adapter stage: hidden width of an MLP scoring head (default: linear)",
    )
    ap.add_argument("--steps", type=int, default=2800, help="base stage: optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads; the result depends on it (the shipped model: 2, 26 min)",
    )
    ap.add_argument("--eval-problems", type=int, default=128, help="held-out problems to sample")
    ap.add_argument("--eval-n", type=int, default=16, help="paths sampled per problem")
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "eval_problems", "eval_n", "label_jobs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    if args.stage == "adapter":
        build_adapter(
            args.model,
            args.out or ADAPTER_DIR,
            label_seeds=[int(x) for x in args.label_seeds.split(",")],
            problems=args.label_problems,
            prefix_tokens=args.prefix_tokens,
            rollouts=args.rollouts,
            traces=args.traces,
            epochs=args.epochs,
            lr=args.adapter_lr,
            lora_rank=args.lora_rank,
            batch_size=args.batch_size // 2,
            seed=args.seed,
            work_dir=args.work_dir,
            jobs=args.label_jobs,
            targets=tuple(args.lora_targets.split(",")),
            head_hidden=args.head_hidden,
        )
        return
    out = args.out or MODEL_DIR
    t0 = time.perf_counter()
    model, tokenizer = train_base(args.steps, args.batch_size, args.lr, args.seed)
    train_s = time.perf_counter() - t0
    save(model, tokenizer, out)
    log.info("trained in %.0f s, saved to %s", train_s, out)

    test = generate(args.eval_problems, seed=args.seed, split="test")
    report = {
        "train_seconds": round(train_s, 1),
        "eval": [],
        **{k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "threads")},
    }
    for t in (TEMPERATURE, 0.7):
        r = evaluate(model, tokenizer, test, n=args.eval_n, temperature=t, seed=args.seed)
        report["eval"].append(r)
        log.info("eval %s", json.dumps(r))
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
