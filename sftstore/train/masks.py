"""Parameter masks for sparse fine-tuning: LT-SFT (global top-K), Rand-SFT, BitFit.

A *mask set* is a dict `{parameter name: torch.bool tensor of the parameter's shape}`, on the
parameter's device. `True` marks an entry that may be trained (and may appear in the delta).

LT-SFT step 2 (DESIGN.md section 5) is `lottery_ticket_mask(theta1, theta0, k)`: the K entries
with the largest `|theta1 - theta0|` over all maskable parameters, under one global threshold.
It never materialises all scores at once and never goes through Python lists: see `top_k_mask`.

Tie rule (`top_k_mask`, `lottery_ticket_mask`): order every entry by score, descending, then by
parameter name (ascending, Python string order), then by flat row-major index (ascending); the
mask holds the first K entries of that order. Equivalently, with t the K-th largest score: every
entry scoring more than t is selected, and the entries scoring exactly t are taken in (name, flat
index) order until K are selected. The result does not depend on the mapping's order, the chunk
size or the device.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import numpy as np
import torch

Masks = dict[str, torch.Tensor]
ScoreSource = torch.Tensor | Callable[[], torch.Tensor]

DEFAULT_CHUNK_SIZE = 2**22

# Non-negative float32 values have non-negative int32 bit patterns, ordered like the values.
_POS_INF_BITS = 0x7F800000  # +inf; every larger pattern is a NaN
_HIGH_SHIFT = 16
_HIGH_BINS = 1 << 15  # (bits >> 16) of a non-negative float32 lies in [0, 0x7F80]
_LOW_BINS = 1 << _HIGH_SHIFT  # exact patterns inside one high bin
_SMALL_CHUNK = 1 << 15  # chunks below this many entries are counted with `index_add_`, not `bincount`

_BUDGET_RE = re.compile(r"^\s*((?:\d[\d_]*)?(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([kKmMbBgG]?)\s*$")
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


# ---- budget -------------------------------------------------------------------------------------


def parse_budget(num_params: str | int | None, density: float | None, total: int) -> int:
    """The number K of trainable entries, from a count or from a density of `total`.

    Exactly one of `num_params` and `density` must be given:

    * `num_params`: an int, or a string such as `"7.6M"`, `"14.2M"`, `"500k"`, `"1.5B"`, `"1e6"`,
      `"123456"` or `"7_600_000"` (suffixes k = 10**3, M = 10**6, B or G = 10**9, any case). It must
      denote a whole number.
    * `density`: a float in (0, 1]; K = round(density * total).

    K must lie in [1, total]; anything else raises `ValueError` saying why.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be a positive int (the number of maskable entries), got {total!r}")
    if (num_params is None) == (density is None):
        raise ValueError("give exactly one of a parameter count (e.g. '7.6M') and a density (e.g. 0.028)")
    if num_params is not None:
        k = _parse_count(num_params)
        what = f"parameter count {num_params!r}"
    else:
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        if not 0.0 < float(density) <= 1.0:  # also rejects NaN
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        k = round(float(density) * total)
        what = f"density {density!r} of {total:,} entries"
    if k < 1:
        raise ValueError(f"{what} selects {k} entries; at least 1 is needed")
    if k > total:
        raise ValueError(f"{what} is {k:,} entries, more than the {total:,} maskable entries")
    return k


def _parse_count(value: str | int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"parameter count must be an int or a string like '7.6M', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"parameter count {value!r} is not a whole number")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"parameter count must be an int or a string like '7.6M', got {type(value).__name__}")
    match = _BUDGET_RE.match(value)
    if not match or not any(c.isdigit() for c in match.group(1)):
        raise ValueError(
            f"cannot read parameter count {value!r}; expected e.g. '7.6M', '500k', '1e6' or '123456'"
        )
    try:
        number = Decimal(match.group(1).replace("_", "")) * _SUFFIXES[match.group(2).lower()]
    except InvalidOperation:
        raise ValueError(f"cannot read parameter count {value!r}; expected e.g. '7.6M', '500k', '1e6'") from None
    if number != number.to_integral_value():
        raise ValueError(f"parameter count {value!r} is {number}, not a whole number")
    return int(number)


# ---- global top-K -------------------------------------------------------------------------------


@dataclass
class _Opened:
    """One parameter's scores for one pass: `read(start, stop, out)` gives float32 scores of flat
    positions [start, stop) (contiguous, 1-D; either a view or written into `out`)."""

    shape: torch.Size
    device: torch.device
    read: Callable[[int, int, torch.Tensor], torch.Tensor]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_Opener = Callable[[], _Opened]


class _Workspace:
    """Reusable per-device chunk buffers (float32 scores, int32 keys), grown on demand."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, keys = self._buffers.get(device, (None, None))
        if scores is None or scores.numel() < size:
            scores = torch.empty(size, dtype=torch.float32, device=device)
            keys = torch.empty(size, dtype=torch.int32, device=device)
            self._buffers[device] = (scores, keys)
        return scores[:size], keys[:size]


def _tensor_opener(name: str, source: ScoreSource) -> _Opener:
    def open_scores() -> _Opened:
        scores = source() if callable(source) and not isinstance(source, torch.Tensor) else source
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores of '{name}' must be a tensor or a callable returning one, got {type(scores).__name__}")
        if scores.is_complex():
            raise TypeError(f"scores of '{name}' have dtype {scores.dtype}; expected a real dtype")
        flat = scores.detach().reshape(-1)

        def read(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
            chunk = flat[start:stop]
            if chunk.dtype == torch.float32:
                return chunk  # a contiguous view: `reshape(-1)` of anything is contiguous
            return out.copy_(chunk)

        return _Opened(scores.shape, scores.device, read)

    return open_scores


def _diff_opener(name: str, current: torch.Tensor, reference: ScoreSource) -> _Opener:
    def open_scores() -> _Opened:
        ref = reference() if callable(reference) and not isinstance(reference, torch.Tensor) else reference
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"reference of '{name}' must be a tensor or a callable returning one, got {type(ref).__name__}")
        if tuple(ref.shape) != tuple(current.shape):
            raise ValueError(f"reference of '{name}' has shape {list(ref.shape)}; the parameter has {list(current.shape)}")
        cur_flat, ref_flat = current.detach().reshape(-1), ref.detach().reshape(-1)
        device = current.device

        def read(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
            cur, ref_chunk = cur_flat[start:stop], ref_flat[start:stop].to(device, non_blocking=True)
            if cur.dtype != torch.float32 or ref_chunk.dtype != torch.float32:
                cur, ref_chunk = cur.float(), ref_chunk.float()
            return torch.sub(cur, ref_chunk, out=out).abs_()

        return _Opened(current.shape, device, read)

    return open_scores


def _chunks(opened: _Opened, chunk_size: int, workspace: _Workspace) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(start, stop, float32 scores, int32 key buffer) for each chunk of one parameter."""
    numel = opened.numel
    for start in range(0, numel, chunk_size):
        stop = min(start + chunk_size, numel)
        out, keys = workspace.get(opened.device, stop - start)
        yield start, stop, opened.read(start, stop, out), keys


def _bits(scores: torch.Tensor, clamp_negative_zero: bool) -> torch.Tensor:
    bits = scores.view(torch.int32)
    return bits.clamp(min=0) if clamp_negative_zero else bits  # -0.0 -> +0.0


def _check_chunk(name: str, scores: torch.Tensor, bits: torch.Tensor) -> bool:
    """Raise on NaN or negative scores; return True if the chunk holds -0.0 (to be read as 0)."""
    low, high = torch.stack(list(torch.aminmax(bits))).tolist()
    if high > _POS_INF_BITS or (low < 0 and bool(torch.isnan(scores).any())):
        raise ValueError(f"scores of parameter '{name}' contain NaN")
    if low < 0:
        if bool((scores < 0).any()):
            raise ValueError(f"scores of parameter '{name}' contain negative values; scores must be >= 0")
        return True
    return False


def _count_into(hist: torch.Tensor, keys: torch.Tensor) -> None:
    """hist[i] += number of entries of `keys` equal to i."""
    if keys.device.type == "cpu" and keys.numel() < _SMALL_CHUNK:
        # Few keys: add them into the histogram directly, without a histogram-sized temporary
        # (on the CPU each large op is a parallel region, slow for tiny chunks on a busy machine).
        hist.index_add_(0, keys.to(hist.device), torch.ones(keys.numel(), dtype=torch.int64, device=hist.device))
    else:
        hist.add_(torch.bincount(keys, minlength=hist.numel()).to(hist.device))


def _locate(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry and the number of entries in higher bins."""
    from_top = np.cumsum(hist[::-1])
    i = int(np.searchsorted(from_top, k))  # the first i with from_top[i] >= k
    bin_ = hist.size - 1 - i
    return bin_, int(from_top[i]) - int(hist[bin_])


def _changed(detail: str) -> RuntimeError:
    return RuntimeError(f"scores changed between passes ({detail}); score callables must be deterministic")


@torch.no_grad()
def _select(openers: Mapping[str, _Opener], k: int, chunk_size: int) -> Masks:
    """Exact global top-K by a three-pass histogram over float32 bit patterns (see `top_k_mask`)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if k < 0:
        raise ValueError(f"k = {k:,} is outside [0, number of scored entries]")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    names = sorted(openers)
    workspace = _Workspace()
    shapes: dict[str, tuple[torch.Size, torch.device]] = {}
    negative_zero: set[str] = set()

    def open_checked(name: str) -> _Opened:
        opened = openers[name]()
        if name in shapes and shapes[name][0] != opened.shape:
            raise _changed(f"'{name}' had shape {list(shapes[name][0])}, now {list(opened.shape)}")
        return opened

    # Pass 1: validate, and histogram the high 16 bits of every score's bit pattern.
    hist: torch.Tensor | None = None
    for name in names:
        opened = open_checked(name)
        shapes[name] = (opened.shape, opened.device)
        if hist is None:
            hist = torch.zeros(_HIGH_BINS, dtype=torch.int64, device=opened.device)
        if k == 0:
            continue
        for _, _, scores, keys in _chunks(opened, chunk_size, workspace):
            bits = scores.view(torch.int32)
            if _check_chunk(name, scores, bits):
                negative_zero.add(name)
                bits = bits.clamp(min=0)
            torch.bitwise_right_shift(bits, _HIGH_SHIFT, out=keys)
            _count_into(hist, keys)
    total = sum(math.prod(shape) for shape, _ in shapes.values())
    if k < 0 or k > total:
        raise ValueError(f"k = {k:,} is outside [0, {total:,}] (the number of scored entries)")
    if k == 0:
        return {name: torch.zeros(shape, dtype=torch.bool, device=device) for name, (shape, device) in shapes.items()}
    assert hist is not None
    counts = hist.cpu().numpy()  # histogram arithmetic on the host: a few small, serial steps
    if int(counts.sum()) != total:
        raise _changed("histogram count")
    high_bin, above_bin = _locate(counts, k)
    in_bin = int(counts[high_bin])

    # Pass 2: exact bit patterns inside that bin. Keys: 0 below the bin, 1 + low bits, top: above.
    base = (high_bin << _HIGH_SHIFT) - 1
    hist = torch.zeros(_LOW_BINS + 2, dtype=torch.int64, device=hist.device)
    for name in names:
        opened = open_checked(name)
        for _, _, scores, keys in _chunks(opened, chunk_size, workspace):
            torch.sub(_bits(scores, name in negative_zero), base, out=keys).clamp_(0, _LOW_BINS + 1)
            _count_into(hist, keys)
    counts = hist.cpu().numpy()
    if int(counts[-1]) != above_bin or int(counts[1:-1].sum()) != in_bin:
        raise _changed("second histogram")
    low_bin, above_low = _locate(counts[1:-1], k - above_bin)
    threshold = (high_bin << _HIGH_SHIFT) | low_bin
    ties_wanted = k - above_bin - above_low  # entries scoring exactly `threshold` to select, >= 1
    if ties_wanted == int(counts[1 + low_bin]):  # every tie is selected: `score >= t`, no ordering needed
        compare, ties_wanted = torch.ge, 0
    else:
        compare = torch.gt

    # Pass 3: the masks. score > t, and the first `ties_wanted` entries == t in (name, index) order.
    masks: Masks = {}
    selected = 0
    for name in names:
        opened = open_checked(name)
        mask = torch.empty(opened.shape, dtype=torch.bool, device=opened.device)
        flat = mask.view(-1)
        for start, stop, scores, _ in _chunks(opened, chunk_size, workspace):
            bits, out = _bits(scores, name in negative_zero), flat[start:stop]
            compare(bits, threshold, out=out)
            if ties_wanted:
                ties = bits == threshold
                count = int(ties.count_nonzero())
                if count <= ties_wanted:
                    out.logical_or_(ties)
                    ties_wanted -= count
                else:
                    out[ties.nonzero().squeeze(1)[:ties_wanted]] = True
                    ties_wanted = 0
            selected += int(out.count_nonzero())
        masks[name] = mask
    if ties_wanted or selected != k:
        raise _changed(f"{selected:,} entries selected instead of {k:,}")
    return {name: masks[name] for name in openers}


def top_k_mask(
    scores: Mapping[str, torch.Tensor] | Mapping[str, Callable[[], torch.Tensor]],
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Masks:
    """Masks selecting the `k` entries with the largest scores over all parameters (one global top-K).

    `scores` maps each parameter name to its non-negative scores: a tensor, or a zero-argument
    callable returning one (called once per pass, three times in all; it must return the same
    values each time), so that scores can be computed one parameter at a time. Scores are compared
    as float32 (float64 scores are rounded, which can only merge near-ties). Each mask has the
    score tensor's shape and device. Exactly `k` entries are selected (0 <= k <= number of
    entries); ties at the threshold follow the module's tie rule (score descending, then name,
    then flat index). NaN or negative scores raise `ValueError` naming the parameter.

    Algorithm: exact selection by histograms of the float32 bit patterns (the int32 patterns of
    non-negative floats are ordered like the floats), with torch ops on the scores' device, reading
    at most `chunk_size` scores at a time. Pass 1 counts `bits >> 16` (32768 bins) and finds the
    bin holding the k-th largest score; pass 2 counts the exact patterns inside that bin (65536
    bins), which gives the exact threshold t and how many entries equal to t are to be taken;
    pass 3 writes `score > t` (or `>= t` when every tie is taken) and adds the first ties in
    order. Extra memory: the masks, two chunk buffers and the histograms; nothing is sorted.
    """
    return _select({name: _tensor_opener(name, source) for name, source in scores.items()}, k, chunk_size)


def lottery_ticket_mask(
    current: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor] | Mapping[str, Callable[[], torch.Tensor]],
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Masks:
    """LT-SFT step 2: masks of the `k` entries with the largest `|current - reference|`.

    `current` holds the fine-tuned parameters (theta1, e.g. `base_parameters(model)`), `reference`
    the same names with the original values (theta0): tensors (on any device; moved chunk by chunk
    to the parameter's device) or callables returning them (called once per pass). The differences
    are computed chunk by chunk in float32 and never stored whole. Masks are on `current`'s devices.
    Selection and tie rule as `top_k_mask`.
    """
    missing = [name for name in current if name not in reference]
    if missing:
        raise ValueError(f"reference has no values for {len(missing)} parameter(s), e.g. {missing[:3]}")
    openers = {name: _diff_opener(name, tensor, reference[name]) for name, tensor in current.items()}
    return _select(openers, k, chunk_size)


# ---- Rand-SFT and BitFit ------------------------------------------------------------------------


def _sample_distinct(total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct positions of [0, total), a uniformly random k-subset, sorted (int64, CPU).

    Draws with replacement and deduplicates until at least `k` are distinct, then keeps a uniformly
    random `k` of them. Every step treats all positions alike, so the k-subset is uniform; memory
    and time are O(k log k), independent of `total`. Callers keep k <= total / 2.
    """
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        missing = k - chosen.numel()
        fresh = (total - chosen.numel()) / total  # chance that one draw is new
        draw = torch.randint(total, (math.ceil(missing / fresh * 1.05) + 64,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    if chosen.numel() > k:
        chosen = chosen[torch.randperm(chosen.numel(), generator=generator)[:k]].sort().values
    return chosen


@torch.no_grad()
def random_mask(shapes_or_params: Mapping[str, torch.Tensor | torch.Size], k: int, *, seed: int) -> Masks:
    """Masks selecting exactly `k` entries uniformly at random over all parameters (Rand-SFT).

    `shapes_or_params` maps names to tensors (the mask takes their shape and device) or shapes
    (masks on the CPU). Every k-subset of the concatenated entries (parameters in sorted name
    order, flat row-major within each) is equally likely. Method: `k` distinct global positions
    are drawn with a CPU `torch.Generator` seeded with `seed` (draw with replacement, deduplicate,
    repeat, then keep a uniformly random `k`; for k > total / 2 the `total - k` unselected
    positions are drawn instead), then split among the parameters. No permutation of all entries
    is ever built: memory is O(min(k, total - k)). The same seed, names and shapes give the same
    masks on any device.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    layout: dict[str, tuple[torch.Size, torch.device]] = {}
    for name, value in shapes_or_params.items():
        if isinstance(value, torch.Tensor):
            layout[name] = (value.shape, value.device)
        else:
            layout[name] = (torch.Size(value), torch.device("cpu"))
    names = sorted(layout)
    numels = [math.prod(layout[name][0]) for name in names]
    total = sum(numels)
    if not 0 <= k <= total:
        raise ValueError(f"k = {k:,} is outside [0, {total:,}] (the number of entries)")
    generator = torch.Generator().manual_seed(seed)
    invert = k > total // 2
    positions = _sample_distinct(total, total - k if invert else k, generator)
    bounds = torch.searchsorted(positions, torch.tensor(numels, dtype=torch.int64).cumsum(0)).tolist()
    masks: Masks = {}
    start, offset = 0, 0
    for name, numel, stop in zip(names, numels, bounds):
        shape, device = layout[name]
        mask = torch.full((numel,), invert, dtype=torch.bool, device=device)
        if stop > start:
            mask[(positions[start:stop] - offset).to(device)] = not invert
        masks[name] = mask.view(shape)
        start, offset = stop, offset + numel
    return {name: masks[name] for name in shapes_or_params}


def bias_mask(params: Mapping[str, torch.Tensor]) -> Masks:
    """BitFit: all of every parameter whose name ends with `bias`, nothing elsewhere.

    Note that LayerNorm biases (`...LayerNorm.bias`) count as biases here, as in BitFit; drop them
    from `params` first where they must stay frozen.
    """
    return {
        name: torch.full(tuple(param.shape), name.endswith("bias"), dtype=torch.bool, device=param.device)
        for name, param in params.items()
    }


# ---- helpers ------------------------------------------------------------------------------------


def mask_nnz(masks: Mapping[str, torch.Tensor]) -> int:
    """The number of selected entries over all masks."""
    return sum(int(mask.count_nonzero()) for mask in masks.values())


def masks_union(*mask_sets: Mapping[str, torch.Tensor]) -> Masks:
    """Entry-wise OR of mask sets; a name missing from a set counts as all False there.

    Returns new tensors, on the device of each name's first mask.
    """
    union: Masks = {}
    for masks in mask_sets:
        for name, mask in masks.items():
            if name not in union:
                union[name] = mask.clone()
            elif union[name].shape != mask.shape:
                raise ValueError(f"masks of '{name}' have different shapes: {list(union[name].shape)} and {list(mask.shape)}")
            else:
                union[name].logical_or_(mask.to(union[name].device))
    return union


def jaccard(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| of the two supports (selected (name, index) pairs); 1.0 when both are empty.

    A name missing from one set counts as all False there.
    """
    inter = 0
    for name in a.keys() & b.keys():
        if a[name].shape != b[name].shape:
            raise ValueError(f"masks of '{name}' have different shapes: {list(a[name].shape)} and {list(b[name].shape)}")
        inter += int((a[name] & b[name].to(a[name].device)).count_nonzero())
    union = mask_nnz(a) + mask_nnz(b) - inter
    return inter / union if union else 1.0
