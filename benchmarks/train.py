"""Benchmark: LT-SFT phase-2 training steps against plain full fine-tuning, and LT-SFT mask selection.

What it measures, in one run:

* (a) LT-SFT phase 2: `SparseFineTuningTrainer` with a `Support` built from `random_mask` over the
  trainable base parameters at density 2.8% (`--density`; the language budget K, 7.77M of XLM-R
  base's 277.45M), against the baseline, plain full fine-tuning of the same model with
  `transformers.Trainer` itself (not SparseFineTuningTrainer with support=None): same model and
  initial weights, same batches, same optimizer (the Trainer's default, AdamW; fused on torch >=
  2.8), same `TrainingArguments`. The model is an XLM-R-base-shaped token-classification model
  built from a config (`benchmarks/compose.py`'s `build_model`: vocab 250002, hidden 768, 12
  layers, 514 positions, type_vocab 1, random weights, nothing is downloaded; `--head masked-lm`
  for the masked-LM head instead), batch `--batch-size` (8) of `--seq-len` (128) random token ids.
  - step time: `trainer.train()` with `max_steps = warmup + steps`, a `TrainerCallback` taking
    `time.perf_counter()` at `on_step_begin` and `on_step_end` (forward, backward, gradient
    clipping, optimizer step, scheduler, zero_grad; not the data loading); the first `--warmup`
    steps are dropped and the median of the `--steps` others is reported.
  - peak memory: each variant trains in a fresh process (this script re-invoked with a hidden
    `--child VARIANT`), which reads its VmHWM (peak RSS, /proc/self/status) right after building
    the model and the data, and again after training. The table shows the absolute peaks; the
    extra memory of phase 2 is the difference of the two variants' increments (peak after training
    minus peak after building; the support, built after the first reading, counts as extra), also
    per base parameter in bytes. On CUDA: `torch.cuda.max_memory_allocated` (device memory),
    with the model moved to the GPU before the first reading.
* (b) LT-SFT mask selection: the global top-K of |theta1 - theta0| on XLM-R-base-shaped float32
  tensors, K = 7.6M, measured by `benchmarks/masks.py` (`measure_in_child`: best of
  `--mask-repeats` runs, extra peak memory in a fresh process); its baseline is `torch.topk` on
  the materialised scores, measured there in the same run (`--skip-mask-baseline` to skip it).

Targets: phase-2 step time <= 1.05x the full fine-tuning step; extra memory <= 1.2 bytes per base
parameter; mask selection <= 3 s and <= 0.5 GiB extra (the targets of benchmarks/masks.py).

Run:

    python benchmarks/train.py                  # CPU, XLM-R base shapes (a few minutes on 2 cores)
    python benchmarks/train.py --markdown       # the same table as GitHub markdown
    python benchmarks/train.py --device cuda
    python benchmarks/train.py --small          # a tiny model and tiny shapes, a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, XLMRobertaConfig, XLMRobertaForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when imported

import compose as compose_benchmark  # noqa: E402
import masks as mask_benchmark  # noqa: E402
from table import render_table  # noqa: E402

from sftstore.modeling import base_parameters  # noqa: E402
from sftstore.train.masks import parse_budget, random_mask  # noqa: E402
from sftstore.train.sparse_trainer import SparseFineTuningTrainer, Support  # noqa: E402

VARIANTS = ("full", "sft")  # baseline first
DENSITY = 0.028
MASK_K = 7_600_000
TARGET_STEP_RATIO = 1.05
TARGET_EXTRA_BYTES_PER_PARAMETER = 1.2
MASK_TARGET_SECONDS = mask_benchmark.TARGET_SECONDS
MASK_TARGET_EXTRA_BYTES = mask_benchmark.TARGET_EXTRA_BYTES
RESULT_MARKER = "train-benchmark-result"


# ---- model and data (in the child) -------------------------------------------------------------------


def build_model(head: str, small: bool) -> nn.Module:
    """The XLM-R-base-shaped model of benchmarks/compose.py (token classification), or its masked-LM twin."""
    model = compose_benchmark.build_model(small)
    if head == "token-classification":
        return model
    config = XLMRobertaConfig(**{k: v for k, v in model.config.to_dict().items()
                                 if k not in ("id2label", "label2id", "architectures")})
    return XLMRobertaForMaskedLM(config)


def build_dataset(model: nn.Module, head: str, examples: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`examples` sequences of random token ids (no padding); labels per token (MLM: 15% masked)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size - 1, (examples, seq_len), generator=generator)  # no special tokens
    if head == "token-classification":
        labels = torch.randint(config.num_labels, (examples, seq_len), generator=generator)
    else:
        masked = torch.rand((examples, seq_len), generator=generator) < 0.15
        labels = ids.masked_fill(~masked, -100)
        ids = ids.masked_fill(masked, config.vocab_size - 1)  # XLM-R's <mask> is the last token
    attention = torch.ones_like(ids)
    return [{"input_ids": i, "attention_mask": a, "labels": y} for i, a, y in zip(ids, attention, labels)]


# ---- measurement (in the child) ----------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """perf_counter at on_step_begin / on_step_end, and the CPU seconds other processes used in between."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []
        self.others_cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        mask_benchmark.synchronize(self.device)
        self._others = mask_benchmark.busy_cpu_seconds() - mask_benchmark.own_cpu_seconds()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        mask_benchmark.synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.others_cpu.append(mask_benchmark.busy_cpu_seconds() - mask_benchmark.own_cpu_seconds() - self._others)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return mask_benchmark.proc_status_bytes("VmHWM")


def child(variant: str, args: argparse.Namespace) -> dict:
    """Train `variant` (full: transformers.Trainer; sft: SparseFineTuningTrainer + random support) and report."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.head, args.small)
    dataset = build_dataset(model, args.head, args.batch_size * (args.warmup + args.steps), args.seq_len, args.seed)
    if device.type == "cuda":
        model.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    built = peak_memory(device)
    trainable = {name: p for name, p in base_parameters(model).items() if p.requires_grad}
    total = sum(p.numel() for p in base_parameters(model).values())
    report: dict = {"variant": variant, "base_parameters": total, "threads": torch.get_num_threads(), "built": built}
    with tempfile.TemporaryDirectory(prefix="sftstore-train-bench-") as tmp:
        training_args = TrainingArguments(
            output_dir=tmp,
            max_steps=args.warmup + args.steps,
            per_device_train_batch_size=args.batch_size,
            weight_decay=args.weight_decay,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=device.type != "cuda",
            seed=args.seed,
            dataloader_num_workers=0,
        )
        timer = StepTimer(device)
        common = dict(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
        if variant == "sft":
            k = parse_budget(None, args.density, sum(p.numel() for p in trainable.values()))
            masks = random_mask(trainable, k, seed=args.seed)
            support = Support(model, masks)
            del masks
            trainer = SparseFineTuningTrainer(support=support, **common)
            report.update(k=k, nnz=support.nnz, frozen=len(trainer._frozen),
                          support_bytes=sum(i.numel() * i.element_size() + v.numel() * v.element_size()
                                            for i, v in zip(support.indices.values(), support.start_values.values())))
        else:
            trainer = Trainer(**common)
        result = trainer.train()
    report["peak"] = peak_memory(device)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    report.update(
        seconds=timer.seconds[args.warmup:],  # the warmup steps are not timed
        others_cpu=timer.others_cpu[args.warmup:],
        loss=result.training_loss,
        optimizer=f"{type(optimizer).__name__}" + (" (fused)" if optimizer.defaults.get("fused") else
                                                   " (foreach)" if optimizer.defaults.get("foreach") else ""),
        trainer=type(trainer).__name__,
    )
    return report


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """`child(variant)` in a fresh Python process: this script with `--child VARIANT`."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", variant,
        "--device", args.device, "--head", args.head, "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--density", repr(args.density), "--weight-decay", repr(args.weight_decay), "--seed", str(args.seed),
    ]
    command += ["--small"] if args.small else []
    command += ["--threads", str(args.threads)] if args.threads is not None else []
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER + " "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"child {variant!r} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


# ---- report ------------------------------------------------------------------------------------------


@dataclass
class Row:
    quantity: str
    ours: float
    baseline: float | None
    unit: str  # s, GiB, B
    target: float | None = None  # on `ours`, or on the ratio when `ratio_target`
    ratio_target: bool = False


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "GiB":
        return f"{value / 2**30:.3f} GiB"
    if unit == "B":
        return f"{value:.3f} B"
    return f"{value * 1e3:.2f} ms" if value < 0.01 else f"{value:.3f} s"


def cells(row: Row, small: bool) -> list[str]:
    ratio = row.ours / row.baseline if row.baseline else None
    if row.target is None:
        target, status = "—", "—"
    else:
        target = f"≤ {row.target:.2f}× baseline" if row.ratio_target else "≤ " + fmt(row.target, row.unit)
        value = ratio if row.ratio_target else row.ours
        status = "n/a (--small)" if small else ("met" if value is not None and value <= row.target else "MISSED")
    return [row.quantity, fmt(row.ours, row.unit), fmt(row.baseline, row.unit),
            f"{ratio:.3f}×" if ratio is not None else "—", target, status]


def render(rows: Sequence[Row], markdown: bool, small: bool) -> str:
    header = ["quantity", "sftstore", "baseline", "sftstore / baseline", "target", "status"]
    return render_table(header, [cells(row, small) for row in rows], markdown)


def build_rows(full: dict, sft: dict, ours_mask: dict, topk: dict | None, device: torch.device) -> list[Row]:
    memory = "peak device memory (max allocated)" if device.type == "cuda" else "peak memory (VmHWM)"
    extra = (sft["peak"] - sft["built"]) - (full["peak"] - full["built"])
    return [
        Row("step time (median)", statistics.median(sft["seconds"]), statistics.median(full["seconds"]), "s",
            TARGET_STEP_RATIO, ratio_target=True),
        Row(memory, sft["peak"], full["peak"], "GiB"),
        Row("extra memory per base parameter", extra / sft["base_parameters"], None, "B",
            TARGET_EXTRA_BYTES_PER_PARAMETER),
        Row(f"mask selection time (K = {ours_mask['k']:,})", ours_mask["seconds"], topk and topk["seconds"], "s",
            MASK_TARGET_SECONDS),
        Row("mask selection extra memory", ours_mask["extra"], topk and topk["extra"], "GiB", MASK_TARGET_EXTRA_BYTES),
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="where training and mask selection run (cpu, cuda)")
    parser.add_argument("--head", choices=("token-classification", "masked-lm"), default="token-classification")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    parser.add_argument("--density", type=float, default=DENSITY, help="support density of phase 2 (default 0.028)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: the Trainer's, 0)")
    parser.add_argument("--mask-repeats", type=int, default=3, help="timed mask selections; the best is reported")
    parser.add_argument("--skip-mask-baseline", action="store_true", help="do not measure torch.topk")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    parser.add_argument("--small", action="store_true", help="a tiny model and tiny mask shapes (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.mask_repeats < 1:
        parser.error("--steps and --mask-repeats must be at least 1, --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(RESULT_MARKER, json.dumps(child(args.child, args)), flush=True)
        return
    started = time.perf_counter()
    device = torch.device(args.device)
    mask_k = mask_benchmark.small_k(MASK_K) if args.small else MASK_K
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}; "
        f"{'tiny' if args.small else 'XLM-R-base-shaped'} {args.head} model, batch {args.batch_size} x "
        f"{args.seq_len} random tokens, {args.warmup} warmup + {args.steps} timed steps per variant, "
        f"each variant in a fresh process"
    )
    full, sft = (run_variant(variant, args) for variant in VARIANTS)
    ours_mask = mask_benchmark.measure_in_child("sftstore", small=args.small, k=mask_k, repeats=args.mask_repeats,
                                                device=args.device, threads=args.threads, seed=args.seed)
    if ours_mask["nnz"] != mask_k:
        raise AssertionError(f"mask selection selected {ours_mask['nnz']:,} entries, not {mask_k:,}")
    topk = None
    if not args.skip_mask_baseline:
        topk = mask_benchmark.measure_in_child("topk", small=args.small, k=mask_k, repeats=args.mask_repeats,
                                               device=args.device, threads=args.threads, seed=args.seed)
    rows = build_rows(full, sft, ours_mask, topk, device)
    print()
    print(render(rows, args.markdown, args.small))
    print()
    total = sft["base_parameters"]
    increments = {name: r["peak"] - r["built"] for name, r in (("sftstore", sft), ("baseline", full))}
    extra = increments["sftstore"] - increments["baseline"]
    per_step = lambda r: ", ".join(f"{s:.3f}" for s in r["seconds"])  # noqa: E731
    memory_kind = "max_memory_allocated" if device.type == "cuda" else "VmHWM"
    notes = [
        f"step time: sftstore = {sft['trainer']} (LT-SFT phase 2: random support of {sft['nnz']:,} entries = "
        f"density {args.density:g} of {total:,} base parameters, {sft['frozen']} base parameter tensors frozen); "
        f"baseline = plain transformers.{full['trainer']}, full fine-tuning of the same model, batches and "
        f"arguments; optimizer {sft['optimizer']} / {full['optimizer']}, weight decay {args.weight_decay:g}",
        f"timed steps (s): sftstore [{per_step(sft)}] (mean {statistics.mean(sft['seconds']):.3f}, "
        f"min {min(sft['seconds']):.3f}); baseline [{per_step(full)}] (mean {statistics.mean(full['seconds']):.3f}, "
        f"min {min(full['seconds']):.3f}); mean ratio {statistics.mean(sft['seconds']) / statistics.mean(full['seconds']):.3f}×, "
        f"min ratio {min(sft['seconds']) / min(full['seconds']):.3f}×",
        f"memory ({memory_kind}): after building model + data sftstore {sft['built'] / 2**30:.3f} GiB, baseline "
        f"{full['built'] / 2**30:.3f} GiB; after training {sft['peak'] / 2**30:.3f} / {full['peak'] / 2**30:.3f} GiB; "
        f"increment {increments['sftstore'] / 2**30:.3f} / {increments['baseline'] / 2**30:.3f} GiB; "
        f"extra = {extra / 2**20:,.1f} MiB = {extra / total:.3f} B per base parameter (difference of absolute "
        f"peaks: {(sft['peak'] - full['peak']) / 2**20:,.1f} MiB); the support itself holds "
        f"{sft['support_bytes'] / 2**20:,.1f} MiB ({sft['support_bytes'] / total:.3f} B per base parameter)",
        f"training loss over the {args.warmup + args.steps} steps: sftstore {sft['loss']:.4f}, baseline {full['loss']:.4f}",
        "mask selection: benchmarks/masks.py, sftstore lottery_ticket_mask vs torch.topk on materialised scores"
        + ("" if topk else " (skipped)") + f", {ours_mask['total']:,} float32 entries, best of {args.mask_repeats}; "
        f"exactly K selected, Jaccard with torch.topk {ours_mask['jaccard_vs_topk']:.7f}"
        + ("" if ours_mask["exact_memory"] else "; /proc/self/clear_refs unavailable: extra memory is an upper bound"),
        f"threads: {sft['threads']} in the training children, {ours_mask['threads']} in the mask children",
        "CPU seconds used by other processes meanwhile (contention check): training steps sftstore "
        f"{sum(sft['others_cpu']):.1f} s, baseline {sum(full['others_cpu']):.1f} s; mask selection sftstore "
        f"{ours_mask['others_cpu']:.1f} s" + (f", torch.topk {topk['others_cpu']:.1f} s" if topk else ""),
    ]
    for note in notes:
        print(note)
    print(f"total runtime {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
