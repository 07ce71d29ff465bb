"""Merge several sparse deltas into one: a weighted sum, or TIES-Merging (Yadav et al., 2023).

Everything is computed per parameter over the union of the inputs' supports (concatenated flat
indices, `torch.unique(return_inverse=True)`, `index_add_`): no parameter is ever densified, and
the result touches only indices that at least one input touches.

Rules (exact):

* `sum`: `merged[j] = sum_i w_i * v_i[j]` over the inputs `i` whose support holds `j`. Default
  weights are `1/n` each, so a plain `merge` is the *average* of the deltas (composition, not
  merging, is where deltas are added at full strength); pass `weights=[1.0, 1.0]` for a plain sum.
* `ties`: default weights are `1.0` each.
  1. Trim, per input delta, over all of its entries (all parameters together, as in the paper's
     flattened task vector): with `nnz` non-zeros, keep `n_keep = ceil((1 - trim) * nnz)` entries of
     largest magnitude; the threshold is the `n_keep`-th largest `|v|`, and every entry with
     `|v| >= threshold` is kept (ties at the threshold are all kept). `trim=0.2` keeps the top 80 %
     of each delta's non-zeros, i.e. the paper's density `k = 1 - trim`, measured on the delta's
     support rather than on the whole model (the deltas are sparse already). `trim=0` keeps all.
  2. Scale the kept values by their delta's weight.
  3. Elect a sign per index: `sign(sum_i w_i * trimmed_i[j])`. An index whose sum is exactly 0
     elects no sign and is dropped.
  4. Disjoint mean: `merged[j] = mean of w_i * trimmed_i[j] over the inputs whose value at j is
     non-zero and has the elected sign`. (No final lambda scaling: scale at composition time.)

Exact zeros are dropped from the result. Values are computed in float32 and stored in the inputs'
common values dtype (float32 when they differ).

Kind and heads: the result has the inputs' common kind (mixed kinds are refused unless `kind` is
given). A task result needs identical `task_type` and `labels` across the task inputs, and heads
with identical tensor names and shapes; its head is their weighted average
`sum_i w_i * head_i / sum_i w_i` (over the task inputs). A language result carries no head.

Manifest: base model and parameter count copied from the first input (all inputs must share the
base fingerprint); `method = {"name": "merge-sum" | "merge-ties", "weights": [...], "trim": ...}`
(`trim` only for ties); `lineage = {"merged_from": [{kind, name, created_at, nnz}, ...]}` in input
order (`sft merge` adds each input's store `ref` and `tensors_sha256`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from .config import BaseModelInfo, DeltaConfig
from .delta import ParameterDelta, SparseDelta, index_dtype_for, validate_tensors
from .errors import BaseModelMismatchError, SftError

METHODS = ("sum", "ties")


class MergeError(SftError, ValueError):
    """The deltas cannot be merged as asked (kinds, labels, heads, weights or options)."""


def _check_bases(deltas: Sequence[SparseDelta]) -> None:
    first = deltas[0].config.base_model
    for delta in deltas[1:]:
        other = delta.config.base_model
        if (other.arch_digest, other.weights_digest) != (first.arch_digest, first.weights_digest):
            raise BaseModelMismatchError(
                f"cannot merge deltas of different base models: {deltas[0].kind} {deltas[0].name!r} is for "
                f"{first.id} (arch {first.arch_digest}, weights {first.weights_digest}) but {delta.kind} "
                f"{delta.name!r} is for {other.id} (arch {other.arch_digest}, weights {other.weights_digest})"
            )


def _check_shapes(deltas: Sequence[SparseDelta]) -> list[str]:
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for delta in deltas:
        for name, entry in delta.params.items():
            seen = shapes.setdefault(name, (entry.shape, delta.name))
            if seen[0] != entry.shape:
                raise BaseModelMismatchError(
                    f"cannot merge: parameter '{name}' has shape {list(seen[0])} in {seen[1]!r} "
                    f"but {list(entry.shape)} in {delta.name!r}"
                )
    return sorted(shapes)


def _weights(weights: Sequence[float] | None, n: int, method: str) -> list[float]:
    if weights is None:
        return [1.0 / n] * n if method == "sum" else [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weight(s) given for {n} deltas")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be finite numbers, got {weights}")
    return weights


def _trim_thresholds(deltas: Sequence[SparseDelta], trim: float) -> list[float]:
    """Per delta: the smallest magnitude kept (the `ceil((1 - trim) * nnz)`-th largest |v|)."""
    thresholds = []
    for delta in deltas:
        nnz = delta.nnz
        n_keep = math.ceil((1.0 - trim) * nnz)
        if nnz == 0 or n_keep >= nnz:
            thresholds.append(0.0)
            continue
        magnitudes = torch.cat([e.values.float().abs().cpu() for e in delta.params.values()])
        # the n_keep-th largest is the (nnz - n_keep + 1)-th smallest
        thresholds.append(float(torch.kthvalue(magnitudes, nnz - n_keep + 1).values))
    return thresholds


def _result_kind(deltas: Sequence[SparseDelta], kind: str | None) -> str:
    kinds = {d.kind for d in deltas}
    if kind is not None:
        if kind not in ("language", "task"):
            raise MergeError(f"kind must be 'language' or 'task', got {kind!r}")
        return kind
    if len(kinds) > 1:
        raise MergeError(
            f"cannot merge deltas of different kinds ({', '.join(f'{d.kind} {d.name!r}' for d in deltas)}); "
            "pass kind= (--kind) to choose the result's kind"
        )
    return kinds.pop()


def _merge_heads(tasks: Sequence[tuple[SparseDelta, float]]) -> dict[str, torch.Tensor]:
    first = tasks[0][0]
    layout = {n: tuple(t.shape) for n, t in first.head.items()}
    for delta, _ in tasks[1:]:
        other = {n: tuple(t.shape) for n, t in delta.head.items()}
        if other != layout:
            raise MergeError(
                f"cannot merge task heads: {first.name!r} has head {sorted(layout.items())} but "
                f"{delta.name!r} has {sorted(other.items())}"
            )
    total = sum(w for _, w in tasks)
    if total == 0:
        raise MergeError("the weights of the task deltas sum to 0: their heads cannot be averaged")
    head = {}
    for name, tensor in first.head.items():
        acc = torch.zeros(tensor.shape, dtype=torch.float32)
        for delta, w in tasks:
            acc += delta.head[name].detach().float().cpu() * w
        head[name] = (acc / total).to(tensor.dtype)
    return head


def _merged_config(
    deltas: Sequence[SparseDelta], kind: str, name: str, method: dict, weights: list[float]
) -> tuple[DeltaConfig, list[tuple[SparseDelta, float]]]:
    first = deltas[0].config
    base = BaseModelInfo(**vars(first.base_model))
    licenses = {d.config.license for d in deltas}
    fields = dict(
        kind=kind, base_model=base, num_parameters=first.num_parameters, method=method,
        license=licenses.pop() if len(licenses) == 1 else None,
        lineage={"merged_from": [
            {"kind": d.kind, "name": d.name, "created_at": d.config.created_at, "nnz": d.nnz} for d in deltas
        ]},
    )
    tasks = [(d, w) for d, w in zip(deltas, weights) if d.kind == "task"]
    if kind == "language":
        languages: list[str] = []
        for d in deltas:
            for lang in d.config.languages or ([d.config.language] if d.config.language else []):
                if lang not in languages:
                    languages.append(lang)
        fields.update(language=name, languages=languages)
        return DeltaConfig(**fields), []
    if not tasks:
        raise MergeError("a task delta can only be merged from at least one task delta")
    task_types = {d.config.task_type for d, _ in tasks}
    if len(task_types) > 1:
        raise MergeError(f"cannot merge task deltas of different task types: {sorted(map(str, task_types))}")
    labels = tasks[0][0].config.labels
    for d, _ in tasks[1:]:
        if d.config.labels != labels:
            raise MergeError(
                f"cannot merge task deltas with different labels: {tasks[0][0].name!r} has {labels} "
                f"but {d.name!r} has {d.config.labels}"
            )
    fields.update(task=name, task_type=task_types.pop(), labels=list(labels))
    return DeltaConfig(**fields), tasks


@torch.no_grad()
def merge_deltas(
    deltas: Sequence[SparseDelta],
    *,
    method: Literal["sum", "ties"] = "sum",
    weights: Sequence[float] | None = None,
    trim: float = 0.2,
    name: str,
    kind: str | None = None,
) -> SparseDelta:
    """Merge `deltas` (same base model) into one new sparse delta named `name`; see the module doc."""
    deltas = list(deltas)
    if not deltas:
        raise MergeError("nothing to merge: no deltas given")
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "ties" and not (0.0 <= float(trim) < 1.0):
        raise MergeError(f"trim must be in [0, 1) (the fraction of each delta's non-zeros dropped), got {trim}")
    _check_bases(deltas)
    names = _check_shapes(deltas)
    weights = _weights(weights, len(deltas), method)
    result_kind = _result_kind(deltas, kind)
    method_info = {"name": f"merge-{method}", "weights": weights}
    if method == "ties":
        method_info["trim"] = float(trim)
    config, tasks = _merged_config(deltas, result_kind, name, method_info, weights)
    head = _merge_heads(tasks) if tasks else {}

    dtypes = {e.values.dtype for d in deltas for e in d.params.values()}
    out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    thresholds = _trim_thresholds(deltas, float(trim)) if method == "ties" else [0.0] * len(deltas)

    params: dict[str, ParameterDelta] = {}
    for pname in names:
        parts = [(d.params[pname], w, t) for d, w, t in zip(deltas, weights, thresholds) if pname in d.params]
        shape = parts[0][0].shape
        idx_list, val_list = [], []
        for entry, w, threshold in parts:
            idx = entry.indices.long().cpu()
            val = entry.values.float().cpu()
            if method == "ties":
                keep = (val.abs() >= threshold) & (val != 0)
                idx, val = idx[keep], val[keep]
            idx_list.append(idx)
            val_list.append(val * w)
        indices = torch.cat(idx_list)
        values = torch.cat(val_list)
        if indices.numel() == 0:
            continue
        union, inverse = torch.unique(indices, sorted=True, return_inverse=True)
        totals = torch.zeros(union.numel(), dtype=torch.float32).index_add_(0, inverse, values)
        if method == "sum":
            merged = totals
        else:
            elected = torch.sign(totals)
            agree = (values != 0) & (torch.sign(values) == elected[inverse])
            sums = torch.zeros_like(totals).index_add_(0, inverse[agree], values[agree])
            counts = torch.zeros_like(totals).index_add_(0, inverse[agree], torch.ones_like(values[agree]))
            merged = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
        merged = merged.to(out_dtype)
        nonzero = merged != 0
        if not bool(nonzero.any()):
            continue
        params[pname] = ParameterDelta(
            union[nonzero].to(index_dtype_for(math.prod(shape))), merged[nonzero].contiguous(), shape
        )
    validate_tensors(params, head, f"merge into {name!r}")
    return SparseDelta(params, config, head)
