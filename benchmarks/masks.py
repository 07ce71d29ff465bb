"""Benchmark: LT-SFT mask selection (the global top-K of |theta1 - theta0|) on XLM-R base shapes.

What it measures, on float32 tensors with the shapes of XLM-R base's 277.45M base parameters (the
encoder of XLMRobertaForTokenClassification / ForMaskedLM: embeddings 250002x768, 514x768, 1x768,
12 BERT-base layers, no pooler; random values, nothing is downloaded): theta0 = randn * 0.02,
theta1 = theta0 + randn * 1e-3, and K = `--k` (default 7.6M, the paper's language-delta budget).

* sftstore: `sftstore.train.masks.lottery_ticket_mask(theta1, theta0, K)`, which computes the
  differences chunk by chunk (three passes, histograms of the float32 bit patterns).
* baseline 1, measured at full size: `torch.topk` on the fully materialised score vector (all
  |theta1 - theta0| written into one preallocated 1.1 GB float32 tensor), then a flat bool mask
  scattered from the top-K indices and split into per-parameter views. Its ties are not
  deterministic, which the random data here does not exercise.
* baseline 2, EXTRAPOLATED: composable-sft's `unfreeze_k_most_changed_params` (`.tolist()` of each
  difference and of the current mask, a Python loop appending `abs(d)`, `np.partition`, then
  `abs_delta >= thresh` masks). At full size it takes tens of seconds and ~15 GB, so it runs on the
  first 1/20 of every parameter with K/20, and its time and extra memory are multiplied by 20
  (linear extrapolation; the partition step is linear, so this is close, if anything low).

Each measurement runs in a fresh child process (multiprocessing, spawn), which builds the tensors,
resets its peak-RSS counter (`/proc/self/clear_refs` = 5) and reports the best of `--repeats` times
and its peak RSS (VmHWM) minus its RSS before the first timed call: the extra memory the method
needs, its result included. On CUDA the extra memory is `torch.cuda.max_memory_allocated` over
the allocation before (device memory), and CUDA is synchronised around each timed call.

Run:

    python benchmarks/masks.py                   # CPU, default K = 7.6M
    python benchmarks/masks.py --device cuda
    python benchmarks/masks.py --small           # tiny shapes, a smoke test in seconds
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sftstore.train.masks import jaccard, lottery_ticket_mask, mask_nnz

XLMR_BASE_PARAMETERS = 277_453_056
BASELINE_SUBSET = 20
TARGET_SECONDS = 3.0
TARGET_EXTRA_BYTES = 0.5 * 2**30


# ---- data -----------------------------------------------------------------------------------------


def xlmr_base_shapes(small: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of XLM-R base's encoder parameters, as `base_parameters` lists them."""
    vocab, positions, hidden, ffn, layers = (250_002, 514, 768, 3072, 12) if not small else (5000, 66, 64, 256, 2)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (positions, hidden),
        "embeddings.token_type_embeddings.weight": (1, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        prefix = f"encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[prefix + part + ".weight"] = (hidden, hidden)
            shapes[prefix + part + ".bias"] = (hidden,)
        shapes[prefix + "attention.output.LayerNorm.weight"] = (hidden,)
        shapes[prefix + "attention.output.LayerNorm.bias"] = (hidden,)
        shapes[prefix + "intermediate.dense.weight"] = (ffn, hidden)
        shapes[prefix + "intermediate.dense.bias"] = (ffn,)
        shapes[prefix + "output.dense.weight"] = (hidden, ffn)
        shapes[prefix + "output.dense.bias"] = (hidden,)
        shapes[prefix + "output.LayerNorm.weight"] = (hidden,)
        shapes[prefix + "output.LayerNorm.bias"] = (hidden,)
    return shapes


def build_thetas(small: bool, seed: int, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """theta0 = randn * 0.02 and theta1 = theta0 + randn * 1e-3, built in place (no large temporaries)."""
    generator = torch.Generator().manual_seed(seed)
    theta0, theta1 = {}, {}
    for name, shape in xlmr_base_shapes(small).items():
        t0 = torch.randn(shape, generator=generator).mul_(0.02)
        t1 = t0.clone()
        for chunk in t1.view(-1).split(2**22):
            chunk.add_(torch.randn(chunk.shape, generator=generator), alpha=1e-3)
        theta0[name], theta1[name] = t0.to(device), t1.to(device)
    return theta1, theta0


# ---- measurement (in a child process) ----------------------------------------------------------------


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryMeter:
    """Extra peak memory from `start()`: RSS on the CPU, allocated device memory on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.exact = True

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.exact = False  # the peak so far stays in VmHWM: the extra is an upper bound
        self.before = proc_status_bytes("VmRSS")

    def extra(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.before
        return proc_status_bytes("VmHWM") - self.before


def busy_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine so far (all states but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object, float]:
    """Best time of `repeats` calls (the previous result freed before each call), the last result, and
    the CPU seconds that other processes used meanwhile (a contention check)."""
    best, result = float("inf"), None
    others = busy_cpu_seconds() - own_cpu_seconds()
    for _ in range(repeats):
        result = None
        gc.collect()
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result, busy_cpu_seconds() - own_cpu_seconds() - others


@torch.no_grad()
def topk_masks(theta1: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Baseline 1: all scores in one tensor, `torch.topk`, a flat bool mask split into views."""
    names = list(theta1)
    numels = [theta1[name].numel() for name in names]
    device = theta1[names[0]].device
    scores = torch.empty(sum(numels), dtype=torch.float32, device=device)
    for name, piece in zip(names, scores.split(numels)):
        torch.sub(theta1[name].reshape(-1), theta0[name].reshape(-1), out=piece).abs_()
    indices = torch.topk(scores, k, sorted=False).indices
    del scores
    selected = torch.zeros(sum(numels), dtype=torch.bool, device=device)
    selected[indices] = True
    return {name: piece.view(theta1[name].shape) for name, piece in zip(names, selected.split(numels))}


@torch.no_grad()
def composable_sft_masks(theta1: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Baseline 2: composable-sft's `unfreeze_k_most_changed_params`, with no parameter masked yet."""
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in theta1.items()}
    diffs = []
    for name, p in theta1.items():
        delta = (p - theta0[name].to(p.device)).view(-1).tolist()
        mask = masks[name].view(-1).tolist()
        for d, m in zip(delta, mask):
            if not m:
                diffs.append(abs(d))
    if k > len(diffs):
        raise ValueError(f"Was requested to unfreeze {k} params, but only {len(diffs)} are frozen.")
    diffs = np.partition(diffs, len(diffs) - k)
    thresh = diffs[len(diffs) - k]
    for name, p in theta1.items():
        abs_delta = (p - theta0[name].to(p.device)).abs()
        to_mask = (abs_delta >= thresh) & (~masks[name])
        masks[name] = to_mask | masks[name]
    return masks


def measure(method: str, small: bool, k: int, repeats: int, device_name: str, threads: int | None, seed: int) -> dict:
    """Run in a fresh child: build the tensors, then time `method` and measure its extra peak memory."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    theta1, theta0 = build_thetas(small, seed, device)
    report: dict = {"threads": torch.get_num_threads()}
    if method == "composable-sft":
        k = round(k / BASELINE_SUBSET)
        theta1 = {n: t.reshape(-1)[: t.numel() // BASELINE_SUBSET] for n, t in theta1.items()}
        theta0 = {n: t.reshape(-1)[: t.numel() // BASELINE_SUBSET] for n, t in theta0.items()}
        fn = lambda: composable_sft_masks(theta1, theta0, k)  # noqa: E731
    elif method == "topk":
        fn = lambda: topk_masks(theta1, theta0, k)  # noqa: E731
    else:
        fn = lambda: lottery_ticket_mask(theta1, theta0, k)  # noqa: E731
    meter = MemoryMeter(device)
    meter.start()
    seconds, masks, others_cpu = timed_runs(fn, repeats, device)
    report.update(seconds=seconds, extra=meter.extra(), exact_memory=meter.exact, nnz=mask_nnz(masks), k=k,
                  total=sum(t.numel() for t in theta1.values()), others_cpu=others_cpu)
    if method == "sftstore":  # after the measurement: checks against the scores and torch.topk
        report.update(check_selection(theta1, theta0, masks, topk_masks(theta1, theta0, k)))
    return report


@torch.no_grad()
def check_selection(theta1, theta0, masks, topk) -> dict:
    """Every selected score >= every other one; masks differ from torch.topk's only on ties at the threshold."""
    lowest_in, highest_out, differing, differing_off_threshold = float("inf"), 0.0, 0, 0
    for name in masks:
        scores = (theta1[name] - theta0[name]).abs()
        inside = scores[masks[name]]
        outside = scores[~masks[name]]
        lowest_in = min(lowest_in, inside.min().item()) if inside.numel() else lowest_in
        highest_out = max(highest_out, outside.max().item()) if outside.numel() else highest_out
    for name in masks:
        scores = (theta1[name] - theta0[name]).abs()
        diff = masks[name] ^ topk[name].to(masks[name].device)
        differing += int(diff.sum())
        differing_off_threshold += int((scores[diff] != lowest_in).sum())
    if highest_out > lowest_in or differing_off_threshold:
        raise AssertionError(
            f"selection is not a top-K: lowest selected {lowest_in}, highest unselected {highest_out}, "
            f"{differing_off_threshold} entries differ from torch.topk away from the threshold"
        )
    ties = sum(int(((theta1[n] - theta0[n]).abs() == lowest_in).sum()) for n in masks)
    return {"jaccard_vs_topk": jaccard(masks, topk), "differing": differing, "ties": ties, "threshold": lowest_in}


def measure_in_child(
    method: str,
    *,
    small: bool = False,
    k: int = 7_600_000,
    repeats: int = 3,
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """`measure(method, ...)` in a fresh child process (spawn); `method`: sftstore, topk or composable-sft.

    The report: seconds (best of `repeats`), extra (bytes), exact_memory, nnz, k, total, threads,
    others_cpu, and for sftstore the checks of `check_selection`. Also called by benchmarks/train.py.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(measure, (method, small, k, repeats, device, threads, seed))


def run_child(method: str, args: argparse.Namespace) -> dict:
    return measure_in_child(method, small=args.small, k=args.k, repeats=args.repeats, device=args.device,
                            threads=args.threads, seed=args.seed)


def small_k(k: int) -> int:
    """K scaled down to the `--small` shapes (in proportion to the number of parameters)."""
    small_total = sum(int(np.prod(shape)) for shape in xlmr_base_shapes(True).values())
    return max(BASELINE_SUBSET, round(k * small_total / XLMR_BASE_PARAMETERS))


# ---- report -----------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    seconds: float
    extra: float  # bytes
    note: str = ""


def render(rows: Sequence[Row], markdown: bool) -> str:
    ours = rows[0]
    header = ["method", "time", "extra peak memory", "time / sftstore", "memory / sftstore", "note"]
    table = [header]
    for row in rows:
        table.append([
            row.method,
            f"{row.seconds:.2f} s",
            f"{row.extra / 2**30:.3f} GiB",
            f"{row.seconds / ours.seconds:.1f}×",
            f"{row.extra / ours.extra:.1f}×" if ours.extra > 0 else "—",
            row.note,
        ])
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in table]
        lines.insert(1, "|" + "|".join(["---"] + ["---:"] * 4 + [":---"]) + "|")
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:-1], widths[1:-1])] + [line[-1]])
        for line in table
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="where the tensors live and selection runs (cpu, cuda)")
    parser.add_argument("--k", type=int, default=7_600_000, help="entries to select (default: 7.6M)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    parser.add_argument("--skip-baselines", action="store_true", help="measure sftstore only")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    parser.add_argument("--small", action="store_true", help="tiny shapes and K scaled down (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.small:
        args.k = small_k(args.k)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    total = sum(int(np.prod(shape)) for shape in xlmr_base_shapes(args.small).values())
    print(
        f"torch {torch.__version__}, device {args.device}, {args.repeats} repeats (best of); "
        f"{total:,} parameters ({total * 4 / 2**30:.2f} GiB float32 each for theta0 and theta1), K = {args.k:,}"
    )
    ours = run_child("sftstore", args)
    if ours["nnz"] != args.k:
        raise AssertionError(f"sftstore selected {ours['nnz']:,} entries, not {args.k:,}")
    rows = [Row("sftstore lottery_ticket_mask", ours["seconds"], ours["extra"], "chunked 3-pass histogram")]
    notes = [
        f"sftstore: exactly K selected; every selected |diff| >= every unselected one (threshold "
        f"{ours['threshold']:.6g}, {ours['ties']} entries equal to it); Jaccard with torch.topk's masks "
        f"{ours['jaccard_vs_topk']:.7f}: they differ in {ours['differing']} entries, all ties at the threshold",
        f"threads: {ours['threads']} (torch.get_num_threads in the children)",
    ]
    reports = {"sftstore": ours}
    if not args.skip_baselines:
        topk = reports["torch.topk"] = run_child("topk", args)
        rows.append(Row("torch.topk on all scores (materialised)", topk["seconds"], topk["extra"], "measured"))
        lists = reports["composable-sft"] = run_child("composable-sft", args)
        rows.append(Row(
            f"composable-sft Python list + np.partition (x{BASELINE_SUBSET})",
            lists["seconds"] * BASELINE_SUBSET,
            lists["extra"] * BASELINE_SUBSET,
            f"EXTRAPOLATED ×{BASELINE_SUBSET} from 1/{BASELINE_SUBSET} subset "
            f"({lists['total']:,} entries, K = {lists['k']:,}): {lists['seconds']:.2f} s, "
            f"{lists['extra'] / 2**30:.3f} GiB",
        ))
        if not all(report["exact_memory"] for report in (ours, topk, lists)):
            notes.append("memory: /proc/self/clear_refs unavailable; extra memory is an upper bound")
    print()
    print(render(rows, args.markdown))
    print()
    if not args.small:
        time_ok = "met" if ours["seconds"] <= TARGET_SECONDS else "MISSED"
        memory_ok = "met" if ours["extra"] <= TARGET_EXTRA_BYTES else "MISSED"
        notes.append(
            f"targets: time <= {TARGET_SECONDS:.0f} s {time_ok}; extra memory <= "
            f"{TARGET_EXTRA_BYTES / 2**30:.1f} GiB {memory_ok} (the result masks, {total / 2**30:.2f} GiB, included)"
        )
    load = ", ".join(f"{name} {report['others_cpu']:.1f} s" for name, report in reports.items())
    notes.append(f"CPU time used by other processes during the timed runs (contention check): {load}")
    for note in notes:
        print(note)
    print(f"total runtime {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
