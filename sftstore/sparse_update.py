"""Adding sparse values into weights in place, keeping the originals for an exact restore.

On the CPU the work goes in chunks of `CHUNK` entries: each chunk gathers the original values, then adds
into the same places while their cache lines are still hot (one trip to memory instead of two), and
chunks are spread over `torch.get_num_threads()` Python threads. A chunk is below torch's intra-op grain
size, so each runs on its own thread and the workers never contend with torch's thread pool. On other
devices each parameter is one gather and one scatter-add (the device parallelises them itself).

Adding is `flat.index_add_(indices, values)`: with unique indices each weight becomes `weight + value`,
rounded once, exactly as `before + value`. Half-precision weights add in float32 and round once.
Restoring writes the originals back (`index_put_`), whatever the weights hold by then.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

CHUNK = 16_384
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


def _split(jobs: Sequence[Job]) -> list[Job]:
    """CPU jobs cut into chunks of at most `CHUNK` entries."""
    pieces = []
    for job in jobs:
        step = CHUNK if job.flat.device.type == "cpu" else max(job.indices.numel(), 1)
        pieces += [Job(job.name, job.flat, job.indices[start : start + step], job.values[start : start + step])
                   for start in range(0, job.indices.numel(), step)]
    return pieces


def _add(job: Job, scale: float) -> Touched:
    flat, indices = job.flat, job.indices
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
    flat.index_put_((touched.indices,), touched.before)  # takes int32 indices as they are (index_copy_ does not)


def _run(function, items: Sequence, cpu: bool) -> list:
    """`function` over `items` in order, on worker threads when on the CPU and torch has more than one."""
    workers = min(torch.get_num_threads(), len(items)) if cpu else 1
    if workers <= 1:
        return [function(item) for item in items]
    size = -(-len(items) // workers)
    parts = [items[i : i + size] for i in range(0, len(items), size)]
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        results = list(pool.map(lambda part: [function(item) for item in part], parts))
    return [result for part in results for result in part]


def add_in_place(jobs: Sequence[Job], scale: float = 1.0) -> list[Touched]:
    """Add every job's values (times `scale`) into its weights; what was overwritten, to `restore`."""
    pieces = _split(jobs)
    return _run(lambda job: _add(job, scale), pieces, all(job.flat.device.type == "cpu" for job in pieces))


def restore(touched: Sequence[Touched], flats: dict[str, torch.Tensor]) -> None:
    """Write the original values back (`flats`: each parameter's flat weights by name)."""
    cpu = all(flat.device.type == "cpu" for flat in flats.values())
    _run(lambda item: _restore(flats[item.name], item), touched, cpu)
