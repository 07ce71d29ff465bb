"""Benchmark: sftstore's delta format, load, compose and revert against the composable-sft format.

What it measures, in one run on an XLM-R-base-shaped token-classification model (random weights,
277.45M base parameters, built from a config: nothing is downloaded):

* a language delta (7.67M non-zeros) and a task delta (14.16M non-zeros plus the dense
  `classifier` head), supports drawn uniformly over all base parameters, values `randn * 1e-3`;
* file size per non-zero of `sft_delta.safetensors`; `save_pretrained` of the language delta
  (sha256, three atomic, fsync'ed writes); `from_pretrained` of both deltas, one after the other
  and on a 2-thread pool (full validation and sha256 each time);
* file size per non-zero in format version 2 (the default: one-byte index gaps plus escapes) and in
  version 1 (int32 indices);
* compose (`task.apply(model)`, then `language.apply(model)`: the path that gathers the original
  values so that revert is exact) and revert (both handles, last applied first); on the CPU both
  again with the pure-PyTorch pass, the fallback where the fused C pass is not built;
* a hot swap on a resident model: `ComposedModel.swap(task=..., language=...)` between two
  (task, language) pairs of the same sizes (revert both, apply both, in canonical order);
* a plain copy of all base weights into preallocated buffers, as a memory-bandwidth reference;
* the baseline, measured in the same run: the format of cambridgeltl/composable-sft, where each
  parameter is `{'size', 'index_steps': Python list of gaps between sorted flat indices (the first
  gap is the first index), 'values'}` in one `torch.save`d dict `{'diffs': ..., 'abs': head}`.
  Its apply decodes (Python list -> tensor -> cumsum) and adds with `index_add_`.

Every time is the best of `--repeats` runs (time.perf_counter; CUDA is synchronised around each
timed call). Files are read with a warm page cache. Correctness is checked on the way: after the
first compose one parameter equals base + both dense deltas within 1e-6, and after the last revert
sampled parameters (and the head) are bit-identical to copies taken before composing.

Run:

    python benchmarks/compose.py                  # CPU, prints a table
    python benchmarks/compose.py --markdown       # the same table as GitHub markdown
    python benchmarks/compose.py --device cuda    # compose/revert on the GPU
    python benchmarks/compose.py --small          # a tiny model, for a smoke test in seconds

Notes:

* Temporary files go to the system temp directory (set TMPDIR to choose the disk).
* On CUDA the sftstore deltas are moved to the GPU before compose is timed (`SparseDelta.to`);
  the baseline's apply includes its host-to-device copies, as that tool does on first apply.
* The baseline's load is `torch.load(path, weights_only=False)` (we wrote the file ourselves).
  composable-sft itself decodes at load time and goes through a coalesced sparse COO tensor, which
  costs more than the plain cumsum + `index_add_` timed here, so the baseline is favoured.
* The baseline has no exact revert (it subtracts), so its revert is not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import AutoModelForTokenClassification, XLMRobertaConfig

from sftstore import native
from sftstore.compose import ComposedModel
from sftstore.config import BaseModelInfo, DeltaConfig
from sftstore.delta import ParameterDelta, SparseDelta, index_dtype_for
from sftstore.demo import NER_LABELS
from sftstore.format import TENSORS_FILE
from sftstore.modeling import base_parameters, fingerprint, head_parameters
from table import render_table  # benchmarks/table.py (the script's folder is on sys.path)

T = TypeVar("T")

XLMR_BASE_PARAMETERS = 277_453_056  # base parameters of XLMRobertaForTokenClassification (no pooler)
BASELINE_FILE = "pytorch_diff.bin"
VALUE_SCALE = 1e-3


# ---- model and deltas -------------------------------------------------------------------------


def build_model(small: bool) -> nn.Module:
    """An XLM-R-base-shaped token-classification model with random weights (or a tiny one)."""
    # XLMRobertaConfig() defaults to BERT's vocabulary and positions, so the base shapes are explicit.
    shapes: dict[str, Any] = dict(vocab_size=250_002, max_position_embeddings=514, type_vocab_size=1)
    if small:
        shapes.update(
            vocab_size=10_000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256
        )
    config = XLMRobertaConfig(
        **shapes,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=len(NER_LABELS),
        id2label=dict(enumerate(NER_LABELS)),
        label2id={label: i for i, label in enumerate(NER_LABELS)},
    )
    return AutoModelForTokenClassification.from_config(config).eval()


def sample_positions(total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct positions in [0, total), uniformly at random, sorted (int64).

    Draws with replacement and deduplicates until `k` are distinct, then keeps a uniform random
    `k` of them: much cheaper than `torch.randperm(total)` (2 s instead of 18 s for 14M of 277M).
    """
    if not 0 < k <= total:
        raise ValueError(f"cannot choose {k} positions out of {total}")
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        missing = k - chosen.numel()
        draw = torch.randint(total, (missing + missing // 20 + 1000,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return chosen[keep].sort().values


def random_params(params: dict[str, nn.Parameter], nnz: int, generator: torch.Generator) -> dict[str, ParameterDelta]:
    """A random sparse delta with `nnz` non-zeros spread uniformly over the concatenated parameters."""
    names = list(params)
    numels = torch.tensor([params[n].numel() for n in names])
    ends = numels.cumsum(0)
    positions = sample_positions(int(ends[-1]), nnz, generator)
    bounds = torch.searchsorted(positions, ends).tolist()
    deltas, start = {}, 0
    for name, stop, offset in zip(names, bounds, (ends - numels).tolist()):
        if stop > start:
            numel = params[name].numel()
            indices = (positions[start:stop] - offset).to(index_dtype_for(numel))
            values = torch.randn(stop - start, generator=generator) * VALUE_SCALE
            deltas[name] = ParameterDelta(indices, values, tuple(params[name].shape))
        start = stop
    return deltas


def build_deltas(model: nn.Module, lang_nnz: int, task_nnz: int, seed: int) -> tuple[SparseDelta, SparseDelta]:
    """A language delta and a task delta (with a dense head) against `model`'s current weights."""
    params = base_parameters(model)
    digests = fingerprint(model)
    base = BaseModelInfo(
        id="benchmark/xlm-roberta-base-random",
        arch_digest=digests.arch_digest,
        weights_digest=digests.weights_digest,
    )
    num_parameters = sum(p.numel() for p in params.values())
    method = {"name": "random-benchmark", "seed": seed}
    generator = torch.Generator().manual_seed(seed)
    language = SparseDelta(
        random_params(params, lang_nnz, generator),
        DeltaConfig(kind="language", language="hau", base_model=base, num_parameters=num_parameters, method=method),
    )
    head = {name: torch.randn(p.shape, generator=generator) * 0.02 for name, p in head_parameters(model).items()}
    task = SparseDelta(
        random_params(params, task_nnz, generator),
        DeltaConfig(
            kind="task", task="ner", task_type="token-classification", labels=list(NER_LABELS),
            base_model=base, num_parameters=num_parameters, method=method,
        ),
        head,
    )
    return language, task


# ---- timing -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Seconds that `fn()` takes (device work included), and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def best_of(fn: Callable[[], object], repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """The fastest of `repeats` timed calls of `fn`."""
    return min(timed(fn, device)[0] for _ in range(repeats))


def collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- sftstore -----------------------------------------------------------------------------------


@dataclass
class FileTimes:
    bytes_per_nnz: tuple[float, float]  # language, task
    bytes_per_nnz_v1: tuple[float, float]
    save: float
    load: float
    load_threaded: float


def bytes_per_nnz(dirs: Sequence[Path], deltas: Sequence[SparseDelta]) -> tuple[float, float]:
    language, task = ((d / TENSORS_FILE).stat().st_size / delta.nnz for d, delta in zip(dirs, deltas))
    return language, task


def measure_files(language: SparseDelta, task: SparseDelta, workdir: Path, repeats: int) -> FileTimes:
    """File sizes (format versions 2 and 1), `save_pretrained` of the language delta, `from_pretrained` of
    both deltas (version 2)."""
    v1_dirs = [workdir / "sft-lang-v1", workdir / "sft-task-v1"]
    for delta, directory in zip((language, task), v1_dirs):
        delta.save_pretrained(directory, format_version=1)
    sizes_v1 = bytes_per_nnz(v1_dirs, (language, task))
    dirs = [workdir / "sft-lang", workdir / "sft-task"]
    save = best_of(lambda: language.save_pretrained(dirs[0]), repeats)
    task.save_pretrained(dirs[1])
    sizes = bytes_per_nnz(dirs, (language, task))

    def load_threaded() -> list[SparseDelta]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(SparseDelta.from_pretrained, dirs))

    load = best_of(lambda: [SparseDelta.from_pretrained(d) for d in dirs], repeats)
    return FileTimes(sizes, sizes_v1, save, load, best_of(load_threaded, repeats))


def snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the named base parameters and of the whole head."""
    params = {**base_parameters(model), **head_parameters(model)}
    return {name: params[name].detach().clone() for name in [*names, *head_parameters(model)]}


def check_compose(model: nn.Module, before: dict[str, torch.Tensor], name: str, deltas: Sequence[SparseDelta]) -> None:
    """Base parameter `name` must equal its original value plus every delta's dense difference."""
    expected = before[name].clone()
    for delta in deltas:
        if name in delta.params:
            expected += delta.params[name].to_dense().to(expected.device)
    error = (base_parameters(model)[name].detach() - expected).abs().max().item()
    if error > 1e-6:
        raise AssertionError(f"compose: '{name}' differs from base + deltas by {error:g}")


def check_reverted(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    params = {**base_parameters(model), **head_parameters(model)}
    changed = [name for name, tensor in before.items() if not torch.equal(params[name].detach(), tensor)]
    if changed:
        raise AssertionError(f"revert: not bit-identical to the base: {changed}")


def measure_compose(
    model: nn.Module, task: SparseDelta, language: SparseDelta, repeats: int, device: torch.device
) -> tuple[float, float]:
    """Best compose (task, then language) and revert (language, then task) times, verified."""
    deltas = [task, language] if device.type == "cpu" else [task.to(device), language.to(device)]
    names = list(base_parameters(model))
    sampled = [names[0], names[len(names) // 2], names[-1]]
    before = snapshot(model, sampled)
    compose_times, revert_times = [], []
    for repeat in range(repeats):
        seconds, handles = timed(lambda: [delta.apply(model) for delta in deltas], device)
        compose_times.append(seconds)
        if repeat == 0:
            check_compose(model, before, sampled[1], deltas)
        revert_times.append(timed(lambda: [handle.revert() for handle in reversed(handles)], device)[0])
        handles = None  # free the originals before the next repeat
    check_reverted(model, before)
    return min(compose_times), min(revert_times)


def renamed(delta: SparseDelta, **fields: str) -> SparseDelta:
    """The same tensors under another name (another pair to swap to, of exactly the same size)."""
    return SparseDelta(delta.params, dataclasses.replace(delta.config, **fields), delta.head)


def measure_swap(
    model: nn.Module, task: SparseDelta, language: SparseDelta, repeats: int, device: torch.device
) -> float:
    """Best hot swap of the (task, language) pair on a resident model, alternating between two pairs; the
    model is the base again afterwards (checked)."""
    pairs = [(task, language), (renamed(task, task="pos"), renamed(language, language="swa", languages=["swa"]))]
    if device.type != "cpu":
        pairs = [(t.to(device), lang.to(device)) for t, lang in pairs]
    names = list(base_parameters(model))
    before = snapshot(model, [names[0], names[len(names) // 2], names[-1]])
    composed = ComposedModel(model, "benchmark", fingerprint(model))
    composed.swap(task=pairs[0][0], language=pairs[0][1])
    seconds = []
    for repeat in range(repeats):
        new_task, new_language = pairs[(repeat + 1) % 2]
        seconds.append(timed(lambda t=new_task, lang=new_language: composed.swap(task=t, language=lang), device)[0])
    composed.reset()
    check_reverted(model, before)
    return min(seconds)


def measure_copy(model: nn.Module, repeats: int, device: torch.device) -> float:
    """A plain copy of every base parameter into preallocated buffers."""
    params = list(base_parameters(model).values())
    buffers = [torch.empty_like(p) for p in params]

    def copy_all() -> None:
        for dst, src in zip(buffers, params):
            dst.copy_(src.detach())

    return best_of(copy_all, repeats, device)


# ---- baseline: the composable-sft format ---------------------------------------------------------


def encode_baseline(delta: SparseDelta) -> dict[str, Any]:
    """`{'diffs': {name: {'size', 'index_steps', 'values'}}, 'abs': head}` as composable-sft saves it."""
    diffs = {}
    for name, entry in delta.params.items():
        indices = entry.indices.long()
        diffs[name] = {
            "size": torch.Size(entry.shape),
            "index_steps": torch.diff(indices, prepend=indices.new_zeros(1)).tolist(),
            "values": entry.values.clone(),
        }
    return {"diffs": diffs, "abs": dict(delta.head)}


@torch.no_grad()
def apply_baseline(encoded: dict[str, Any], model: nn.Module, device: torch.device) -> None:
    """Decode the gaps (list -> tensor -> cumsum) and add the values into the weights; set the head."""
    params = base_parameters(model)
    for name, diff in encoded["diffs"].items():
        indices = torch.tensor(diff["index_steps"], dtype=torch.int64).cumsum(0)
        params[name].data.view(-1).index_add_(0, indices.to(device), diff["values"].to(device))
    model_params = dict(model.named_parameters())
    for name, tensor in encoded["abs"].items():
        model_params[name].data.copy_(tensor)


@dataclass
class BaselineTimes:
    bytes_per_nnz: tuple[float | None, float | None]  # language, task
    save: float | None
    load: float | None
    apply: float | None


NO_BASELINE = BaselineTimes((None, None), None, None, None)


def measure_baseline(
    language: SparseDelta, task: SparseDelta, model: nn.Module, workdir: Path, repeats: int, device: torch.device
) -> BaselineTimes:
    """Size, save (language delta), load and apply (task, then language) of the baseline format.

    Changes `model`'s weights (the deltas are added `repeats` times and never removed).
    """
    deltas = [language, task]
    paths = [workdir / f"baseline-{delta.kind}" / BASELINE_FILE for delta in deltas]
    encoded = [encode_baseline(delta) for delta in deltas]
    for path in paths:
        path.parent.mkdir()
    save = best_of(lambda: torch.save(encoded[0], paths[0]), repeats)
    for obj, path in zip(encoded[1:], paths[1:]):
        torch.save(obj, path)
    encoded = None  # free the encoded lists before measuring load
    collect()
    sizes = (paths[0].stat().st_size / language.nnz, paths[1].stat().st_size / task.nnz)
    load = best_of(lambda: [torch.load(path, weights_only=False) for path in paths], repeats)
    loaded = [torch.load(path, weights_only=False) for path in reversed(paths)]  # task first, as compose
    apply = best_of(lambda: [apply_baseline(obj, model, device) for obj in loaded], repeats, device)
    return BaselineTimes(sizes, save, load, apply)


# ---- report -------------------------------------------------------------------------------------


@dataclass
class Row:
    operation: str
    ours: float
    baseline: float | None = None
    target: float | None = None
    unit: str = "s"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "B":
        return f"{value:.3f} B"
    return f"{value * 1e3:.2f} ms" if value < 0.01 else f"{value:.3f} s"


def cells(row: Row, small: bool) -> list[str]:
    ratio = f"{row.baseline / row.ours:.1f}×" if row.baseline is not None else "—"
    if row.target is None:
        target, status = "—", "—"
    else:
        target = "≤ " + fmt(row.target, row.unit)
        status = "n/a (--small)" if small else ("met" if row.ours <= row.target else "MISSED")
    return [row.operation, fmt(row.ours, row.unit), fmt(row.baseline, row.unit), ratio, target, status]


def render(rows: Sequence[Row], markdown: bool, small: bool) -> str:
    header = ["operation", "sftstore", "baseline (composable-sft)", "baseline / sftstore", "target", "status"]
    return render_table(header, [cells(row, small) for row in rows], markdown)


def build_rows(
    files: FileTimes,
    compose: float,
    revert: float,
    plain: tuple[float, float] | None,
    swap: float,
    copy: float,
    baseline: BaselineTimes | None,
    device: torch.device,
    gib: float,
) -> list[Row]:
    """The table: sizes, save, load, compose, revert, their sum and the copy reference."""
    base = baseline or NO_BASELINE
    load_compose_baseline = None if base.load is None or base.apply is None else base.load + base.apply
    return [
        Row("bytes per non-zero, language delta", files.bytes_per_nnz[0], base.bytes_per_nnz[0], 5.1, "B"),
        Row("bytes per non-zero, task delta", files.bytes_per_nnz[1], base.bytes_per_nnz[1], 5.1, "B"),
        Row("bytes per non-zero, language delta, format v1", files.bytes_per_nnz_v1[0], base.bytes_per_nnz[0],
            unit="B"),
        Row("bytes per non-zero, task delta, format v1", files.bytes_per_nnz_v1[1], base.bytes_per_nnz[1], unit="B"),
        Row("save language delta", files.save, base.save, 0.2),
        Row("load both deltas (one after the other)", files.load, base.load, 0.15),
        Row("load both deltas (2 threads)", files.load_threaded, None, 0.15),
        Row(f"compose both ({device.type})", compose, base.apply, 0.005 if device.type == "cuda" else 0.14),
        Row(f"revert both ({device.type})", revert, None, 0.10),
        *([Row("compose both (cpu, pure-PyTorch pass)", plain[0]), Row("revert both (cpu, pure-PyTorch pass)", plain[1])]
          if plain else []),
        Row(f"hot swap of the (task, language) pair ({device.type})", swap, None, 0.5),
        Row("load + compose both (sum of the two)", files.load + compose, load_compose_baseline),
        Row(f"reference: plain copy of all base weights ({gib:.2f} GiB, {device.type})", copy),
    ]


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="where compose and revert run (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--lang-nnz", type=int, default=7_670_000, help="non-zeros of the language delta")
    parser.add_argument("--task-nnz", type=int, default=14_160_000, help="non-zeros of the task delta")
    parser.add_argument("--skip-baseline", action="store_true", help="measure sftstore only")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    parser.add_argument(
        "--small", action="store_true", help="a tiny model and proportionally fewer non-zeros (smoke test)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.small)
    params = base_parameters(model)
    total = sum(p.numel() for p in params.values())
    scale = total / XLMR_BASE_PARAMETERS if args.small else 1.0
    lang_nnz, task_nnz = round(args.lang_nnz * scale), round(args.task_nnz * scale)
    gib = sum(p.numel() * p.element_size() for p in params.values()) / 2**30
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.repeats} repeats "
        f"(best of), warm page cache\nbase parameters: {total:,} ({gib:.2f} GiB float32); "
        f"language delta {lang_nnz:,} nnz, task delta {task_nnz:,} nnz + dense head\n"
        f"CPU compose/revert pass: {'fused C kernel' if native.available() else 'pure PyTorch (C kernel not built)'}"
    )
    language, task = build_deltas(model, lang_nnz, task_nnz, args.seed)
    model.to(device)
    with tempfile.TemporaryDirectory(prefix="sftstore-bench-") as tmp:
        workdir = Path(tmp)
        files = measure_files(language, task, workdir, args.repeats)
        collect()
        compose, revert = measure_compose(model, task, language, args.repeats, device)
        collect()
        plain = None
        if device.type == "cpu" and native.available():
            with native.disabled():
                plain = measure_compose(model, task, language, args.repeats, device)
            collect()
        swap = measure_swap(model, task, language, args.repeats, device)
        collect()
        copy = measure_copy(model, args.repeats, device)
        collect()
        baseline = None
        if not args.skip_baseline:
            baseline = measure_baseline(language, task, model, workdir, args.repeats, device)
            collect()
    rows = build_rows(files, compose, revert, plain, swap, copy, baseline, device, gib)
    print()
    print(render(rows, args.markdown, args.small))
    print()
    if baseline is None:
        print("baseline: skipped (--skip-baseline)")
    else:
        print(
            "baseline: measured on both deltas; save = torch.save of the language delta (no fsync, unlike sftstore); "
            "load = torch.load(weights_only=False); compose = decode (list -> tensor -> cumsum) + index_add_"
        )
    print(
        "correctness: compose matches base + dense deltas (<= 1e-6); "
        "revert is bit-identical (sampled parameters + head)"
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"total runtime {time.perf_counter() - started:.1f} s, peak RSS {peak_mib:,.0f} MiB")


if __name__ == "__main__":
    main()
