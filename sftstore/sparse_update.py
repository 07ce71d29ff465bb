"""Adding sparse values into weights in place, keeping the originals for an exact restore.

On the CPU the work goes in chunks, and the chunks go to `torch.get_num_threads()` Python threads, each
taking a contiguous run with about the same number of entries. Float32 weights with int32 indices (every
parameter below 2**31 elements) take the C extension's fused pass (`native`, built at install time
where a C compiler is available): one sweep per chunk gathers each original and adds, prefetching the
cache lines ahead, without the GIL. Otherwise (no compiler, half-precision weights, int64 indices) the
pure-PyTorch pass works in chunks of `CHUNK` entries: each chunk gathers the originals, then adds while
their cache lines are still hot; a chunk is below torch's intra-op grain size, so the workers never
contend with torch's thread pool. On other devices each parameter is one gather and one scatter-add
(the device parallelises them itself).

Adding is `weight + value` for each unique index, rounded once (`index_add_` on the PyTorch pass), so
both passes give bit-identical weights. Half-precision weights add in float32 and round once.
Restoring writes the originals back, whatever the weights hold by then.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import native

CHUNK = 16_384
KERNEL_CHUNK = 1 << 18  # entries per call of the fused pass: enough calls to balance the threads, few enough to be free
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Job:
    """Add `values * scale` into the flat weights `flat` at `indices` (unique)."""

    name: str
    flat: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class Touched:
    """What one job (or chunk of one) overwrote: the parameter's name, the indices and the original values."""

    name: str
    indices: torch.Tensor
    before: torch.Tensor


def _fused(flat: torch.Tensor, indices: torch.Tensor) -> bool:
    """Whether the fused C pass handles these weights and indices."""
    return (native.available() and flat.device.type == "cpu" and flat.dtype == torch.float32
            and indices.dtype == torch.int32)


def _chunk_size(job: Job) -> int:
    if job.flat.device.type != "cpu":
        return max(job.indices.numel(), 1)
    return KERNEL_CHUNK if _fused(job.flat, job.indices) else CHUNK


def _split(jobs: Sequence[Job]) -> list[Job]:
    """CPU jobs cut into chunks (`KERNEL_CHUNK` entries for the fused pass, `CHUNK` for PyTorch's)."""
    pieces = []
    for job in jobs:
        step = _chunk_size(job)
        pieces += [Job(job.name, job.flat, job.indices[start : start + step], job.values[start : start + step])
                   for start in range(0, job.indices.numel(), step)]
    return pieces


def _add(job: Job, scale: float) -> Touched:
    flat, indices = job.flat, job.indices
    if _fused(flat, indices):
        values = job.values.to(torch.float32)
        values = (values if scale == 1.0 else values * scale).contiguous()
        indices = indices.contiguous()
        before = torch.empty_like(values)
        native.kernel().add_keeping_originals(flat.numpy(), indices.numpy(), values.numpy(), before.numpy())
        return Touched(job.name, indices, before)
    if flat.device.type != "cpu":
        indices = indices.long()  # once, for every op below
    before = flat.index_select(0, indices)
    if flat.dtype in _HALF_DTYPES:
        after = (before.float() + job.values.float() * scale).to(flat.dtype)
        flat.index_copy_(0, indices.long(), after)
    else:
        values = job.values.to(flat.dtype)
        flat.index_add_(0, indices, values if scale == 1.0 else values * scale)
    return Touched(job.name, indices, before)


def _restore(flat: torch.Tensor, touched: Touched) -> None:
    if _fused(flat, touched.indices) and touched.before.dtype == torch.float32:
        indices, before = touched.indices.contiguous(), touched.before.contiguous()
        native.kernel().write_back(flat.numpy(), indices.numpy(), before.numpy())
        return
    flat.index_put_((touched.indices,), touched.before)  # takes int32 indices as they are (index_copy_ does not)


def _balanced(sizes: Sequence[int], parts: int) -> list[slice]:
    """At most `parts` contiguous slices of `sizes` with near-equal totals (each cut at the item boundary
    nearest to its share of the total)."""
    total, cuts, running = sum(sizes), [0], 0
    for position, size in enumerate(sizes):
        share = total * len(cuts) / parts
        if len(cuts) < parts and position > cuts[-1] and running + size / 2 > share:
            cuts.append(position)  # the share lies nearer this item's start than its end
        running += size
    cuts.append(len(sizes))
    return [slice(start, stop) for start, stop in zip(cuts, cuts[1:]) if stop > start]


def _run(function, items: Sequence, sizes: Sequence[int], cpu: bool) -> list:
    """`function` over `items` in order; on the CPU, on worker threads (as many as torch has) that each take a
    contiguous run of items of about the same total size."""
    workers = min(torch.get_num_threads(), len(items)) if cpu else 1
    if workers <= 1:
        return [function(item) for item in items]
    parts = [items[part] for part in _balanced(sizes, workers)]
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        results = list(pool.map(lambda part: [function(item) for item in part], parts))
    return [result for part in results for result in part]


def add_in_place(jobs: Sequence[Job], scale: float = 1.0) -> list[Touched]:
    """Add every job's values (times `scale`) into its weights; what was overwritten, to `restore`."""
    pieces = _split(jobs)
    cpu = all(job.flat.device.type == "cpu" for job in pieces)
    return _run(lambda job: _add(job, scale), pieces, [job.indices.numel() for job in pieces], cpu)


def restore(touched: Sequence[Touched], flats: dict[str, torch.Tensor]) -> None:
    """Write the original values back (`flats`: each parameter's flat weights by name)."""
    cpu = all(flat.device.type == "cpu" for flat in flats.values())
    _run(lambda item: _restore(flats[item.name], item), touched, [item.indices.numel() for item in touched], cpu)
