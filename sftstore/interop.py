"""Interoperability with composable-sft (cambridgeltl/composable-sft) and its `pytorch_diff.bin` files.

A composable-sft SFT is a torch pickle `{'diffs': {name: {'size', 'index_steps', 'values'}},
'abs': {name: tensor}}` keyed by FULL parameter names (`bert.encoder.layer.0...`,
`classifier.weight`, `cls.predictions.bias`). `index_steps` lists the gaps between the sorted flat
indices of the touched entries, the first gap being the first index; `values` are the differences
there. `abs` holds tensors stored in full: a task head, or the MLM head of a language SFT.

Flat indices there are COLUMN-major: composable-sft flattens COO coordinates with the multipliers
`cumprod([1] + size[:-1])` (the first dimension varies fastest) and decodes them the same way.
sftstore's are row-major, so converting reorders the indices of every parameter with two or more
dimensions (1-D biases and LayerNorms are the same either way).

Reading never unpickles arbitrary objects: `torch.load(weights_only=True)` with only the globals
that numpy integer scalars need (composable-sft's `index_steps` start with a `numpy.int64`).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_write_bytes
from .delta import VALUE_DTYPES, ParameterDelta, SparseDelta, config_for_base, index_dtype_for, validate_tensors
from .errors import BaseModelMismatchError, DeltaFormatError
from .modeling import base_parameters, head_parameters

COMPOSABLE_SFT_FILE = "pytorch_diff.bin"
_ENTRY_KEYS = ("size", "index_steps", "values")
# How torch's restricted unpickler names what it refused: a GLOBAL, a class it may not build or
# instantiate, or a function it may not call.
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL ([\w.]+)"),
    re.compile(r"but got <class '([^']+)'>"),
    re.compile(r"unrecognized function (\S+)"),
)


def _numpy_scalar_globals() -> list:
    """The globals that unpickling a `numpy.int64` needs, under the names numpy 1.x and 2.x write."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x without the `numpy._core` alias
        from numpy.core.multiarray import scalar
    return [
        (scalar, "numpy._core.multiarray.scalar"),  # pickled by numpy >= 2
        (scalar, "numpy.core.multiarray.scalar"),  # pickled by numpy 1.x
        np.dtype,  # the scalar's dtype, rebuilt as numpy.dtype('i8', False, True)
        type(np.dtype(np.int64)),  # numpy.dtypes.Int64DType: the dtype's pickled state is set on it
    ]


def _file_of(path: str | os.PathLike) -> Path:
    """`path` itself, or the `pytorch_diff.bin` inside it when it is a directory (an SFT repo)."""
    path = Path(path)
    return path / COMPOSABLE_SFT_FILE if path.is_dir() else path


def _gist(message: str) -> str:
    """The informative line of a torch.load error (its messages open and close with boilerplate)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(boilerplate)), lines[0] if lines else "no details")


def _load(path: Path) -> Any:
    """Unpickle with torch's restricted unpickler; nothing outside tensors, containers and ints is built."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = next((m.group(1) for p in _REFUSED_PATTERNS if (m := p.search(str(exc)))), None)
        if refused:
            raise DeltaFormatError(
                f"{path}: refused: the file asks for the Python global '{refused}', which a composable-sft "
                "file does not need; it was not unpickled"
            ) from None
        raise DeltaFormatError(f"{path}: not a readable torch file ({_gist(str(exc))})") from None
    except Exception as exc:  # torch.load raises many types on garbage: EOFError, RuntimeError, IndexError, ...
        raise DeltaFormatError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None


def _reverse_dim_order(indices: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Flat indices in which `dims[0]` varies fastest -> flat indices in which it varies slowest.

    With `dims = shape` this turns column-major indices into row-major ones; with the shape
    reversed, row-major into column-major.
    """
    coordinates, rest = [], indices
    for size in dims:
        coordinates.append(rest % size)
        rest = rest // size
    flat = torch.zeros_like(indices)
    for coordinate, size in zip(coordinates, dims):
        flat = flat * size + coordinate
    return flat


def _steps(raw: Any, numel: int, where: str) -> np.ndarray:
    """Check `index_steps` and return the absolute (column-major) flat indices they encode."""
    if not isinstance(raw, (list, tuple)):
        raise DeltaFormatError(f"{where}: 'index_steps' is a {type(raw).__name__}; expected a list of integers")
    try:  # Python ints and numpy integer scalars make an integer array; anything else does not
        steps = np.asarray(raw) if raw else np.zeros(0, dtype=np.int64)
    except ValueError:  # nested lists of different lengths
        steps = np.zeros((0, 0))
    if steps.ndim != 1 or steps.dtype.kind not in "iu":
        raise DeltaFormatError(f"{where}: 'index_steps' is not a flat list of integers")
    steps = steps.astype(np.int64)
    if steps.size and steps[0] < 0:
        raise DeltaFormatError(f"{where}: 'index_steps'[0] (the first index) is {steps[0]}; expected >= 0")
    bad = np.flatnonzero(steps[1:] <= 0)
    if bad.size:
        position, gap = int(bad[0]) + 1, int(steps[bad[0] + 1])
        problem = "a duplicate index" if gap == 0 else "unsorted indices"
        raise DeltaFormatError(
            f"{where}: 'index_steps'[{position}] is {gap}: {problem}; gaps after the first must be > 0"
        )
    out_of_range = f"{where}: 'index_steps' reach past the end of a parameter of {numel} elements"
    if steps.size and (steps.size > numel or steps.max() >= numel):  # checked first: the sum cannot overflow
        raise DeltaFormatError(out_of_range)
    indices = np.cumsum(steps)
    if indices.size and indices[-1] >= numel:
        raise DeltaFormatError(f"{out_of_range} (index {int(indices[-1])})")
    return indices


def _finite_float(tensor: Any, what: str) -> torch.Tensor:
    """`tensor` if it is a dense floating-point tensor with finite values; else `DeltaFormatError` naming `what`."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or not tensor.is_floating_point():
        found = f"{tensor.dtype} ({tensor.layout})" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise DeltaFormatError(f"{what} is {found}; expected a dense floating-point tensor")
    if not bool(torch.isfinite(tensor).all()):
        raise DeltaFormatError(f"{what} holds NaN or Inf")
    return tensor


def _decode_diff(entry: Any, where: str) -> dict[str, Any]:
    """One `diffs` entry, checked, as `size` and row-major sorted int64 `indices` with their `values`."""
    if not isinstance(entry, dict):
        raise DeltaFormatError(f"{where}: is a {type(entry).__name__}; expected a dict with {', '.join(_ENTRY_KEYS)}")
    missing = [key for key in _ENTRY_KEYS if key not in entry]
    if missing:
        raise DeltaFormatError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    size = entry["size"]
    if not isinstance(size, (tuple, list)) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in size):
        raise DeltaFormatError(f"{where}: 'size' is {size!r}; expected a torch.Size")
    shape = tuple(int(d) for d in size)
    indices = _steps(entry["index_steps"], math.prod(shape), where)
    values = _finite_float(entry["values"], f"{where}: 'values'")
    if values.dim() != 1 or values.numel() != indices.size:
        raise DeltaFormatError(
            f"{where}: 'values' has shape {list(values.shape)}; 'index_steps' has {indices.size} entries"
        )
    row_major, order = torch.sort(_reverse_dim_order(torch.from_numpy(indices), shape))
    return {"size": torch.Size(shape), "indices": row_major, "values": values[order]}


def read_composable_sft(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Read and check a composable-sft `pytorch_diff.bin` (or the directory holding it).

    Returns `(diffs, abs)` keyed by the file's full parameter names: each diff as `{'size':
    torch.Size, 'indices': int64 flat ROW-major indices (sorted, unique), 'values': tensor}` (the
    file's column-major indices converted), `abs` as the dense tensors. Raises `DeltaFormatError`
    naming the file and entry for anything malformed, and for a file that asks for any Python
    global besides numpy integer scalars (which is refused without being unpickled).
    """
    path = _file_of(path)
    data = _load(path)
    if not isinstance(data, dict) or not isinstance(data.get("diffs"), dict):
        raise DeltaFormatError(f"{path}: no 'diffs' dict; not a composable-sft file of the diffs/abs layout")
    unknown = sorted(set(data) - {"diffs", "abs", "block_sparses"}, key=str)
    if unknown:
        raise DeltaFormatError(f"{path}: unexpected top-level entries {unknown}; expected 'diffs' and 'abs'")
    if data.get("block_sparses"):  # the latest composable-sft always writes the key, empty unless used
        raise DeltaFormatError(f"{path}: holds 'block_sparses' (block-sparse layers), which sftstore cannot represent")
    abs_tensors = data.get("abs", {})
    if not isinstance(abs_tensors, dict):
        raise DeltaFormatError(f"{path}: 'abs' is a {type(abs_tensors).__name__}; expected a dict of tensors")
    for name in [*data["diffs"], *abs_tensors]:
        if not isinstance(name, str):
            raise DeltaFormatError(f"{path}: entry name {name!r} is not a string")
    diffs = {name: _decode_diff(entry, f"{path}: diffs entry '{name}'") for name, entry in data["diffs"].items()}
    for name, tensor in abs_tensors.items():
        _finite_float(tensor, f"{path}: abs entry '{name}'")
    return diffs, abs_tensors


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    """float32, unless the tensor is already in another dtype a delta may hold (bfloat16, float16)."""
    return tensor if tensor.dtype in VALUE_DTYPES else tensor.float()


def _params_from_diffs(
    diffs: dict[str, dict], base_model: nn.Module, kind: str, source: Path
) -> dict[str, ParameterDelta]:
    """The delta's parameters from the diffs under the base model's prefix (entries with no change skipped)."""
    prefix = base_model.base_model_prefix + "."
    base_params, head = base_parameters(base_model), head_parameters(base_model)
    params = {}
    for full, entry in diffs.items():
        if not full.startswith(prefix):
            if kind == "language":  # the MLM head: not part of a language delta
                continue
            if full in head:
                raise DeltaFormatError(
                    f"{source}: diffs entry '{full}' is a sparse difference on a head parameter; it is relative "
                    "to the head's initialisation at training time, which the file does not hold "
                    "(composable-sft stores heads in 'abs' unless they were made maskable)"
                )
            raise BaseModelMismatchError(
                f"{source}: diffs entry '{full}' names no parameter of {type(base_model).__name__}"
            )
        relative = full[len(prefix) :]
        if relative not in base_params:
            raise BaseModelMismatchError(
                f"{source}: parameter '{relative}' ('{full}') does not exist in the base model"
            )
        shape = tuple(base_params[relative].shape)
        if tuple(entry["size"]) != shape:
            raise BaseModelMismatchError(
                f"{source}: parameter '{relative}' has shape {list(entry['size'])} in the file "
                f"but {list(shape)} in the base model"
            )
        if entry["indices"].numel():
            params[relative] = ParameterDelta(
                entry["indices"].to(index_dtype_for(math.prod(shape))), _storable(entry["values"]), shape
            )
    return params


def _head_from_abs(
    abs_tensors: dict[str, torch.Tensor], base_model: nn.Module, kind: str, source: Path
) -> dict[str, torch.Tensor]:
    """The head tensors of a task delta: the file's `abs`, which must cover the model's head exactly."""
    prefix = base_model.base_model_prefix + "."
    for name in abs_tensors:
        if name.startswith(prefix):
            raise DeltaFormatError(
                f"{source}: abs entry '{name}' stores a base-model parameter in full; "
                "sftstore deltas hold base parameters only as sparse differences"
            )
    if kind == "language":
        return {}
    head = head_parameters(base_model)
    for name, tensor in abs_tensors.items():
        if name not in head:
            raise BaseModelMismatchError(
                f"{source}: abs entry '{name}' names no head parameter of {type(base_model).__name__}"
            )
        if tuple(tensor.shape) != tuple(head[name].shape):
            raise BaseModelMismatchError(
                f"{source}: head parameter '{name}' has shape {list(tensor.shape)} in the file "
                f"but {list(head[name].shape)} in the base model (check the labels)"
            )
    missing = sorted(set(head) - set(abs_tensors))
    if missing:
        raise BaseModelMismatchError(
            f"{source}: no abs tensors for head parameter(s) {missing}; composing would leave them random"
        )
    return {name: _storable(tensor) for name, tensor in abs_tensors.items()}


def from_composable_sft(
    path: str | os.PathLike,
    base_model: nn.Module,
    *,
    kind: str,
    name: str,
    base_id: str | None = None,
    task_type: str | None = None,
    labels: Sequence[str] = (),
    **config_fields: Any,
) -> SparseDelta:
    """Convert a composable-sft SFT (`pytorch_diff.bin` or its directory) into a `SparseDelta`.

    `base_model` is the model the SFT was trained from, with the head of `task_type` (e.g. from
    `sftstore.modeling.load_model(base, task_type, labels)`); its fingerprint goes into the manifest
    and `base_model.base_model_prefix + "."` is stripped from the file's names. Diffs under that
    prefix become the delta's parameters (shapes checked: `BaseModelMismatchError`). For
    `kind="task"`, the `abs` tensors must cover exactly the model's head and become the delta's
    head; a diff on a head parameter is refused (`DeltaFormatError`): it is relative to the head's
    random initialisation at training time, which the file does not hold. For `kind="language"`
    every entry outside the base model (the MLM head) is dropped and listed in
    `lineage["dropped"]`. `name` is the language or task name; `config_fields` are further
    `DeltaConfig` fields (a given `method` or `lineage` is merged into the one recorded here).
    """
    source = _file_of(path)
    diffs, abs_tensors = read_composable_sft(source)
    prefix = base_model.base_model_prefix + "."
    if diffs and not any(full.startswith(prefix) for full in diffs):
        raise BaseModelMismatchError(
            f"{source}: none of its {len(diffs)} diffs is under '{prefix}' (the prefix of "
            f"{type(base_model).__name__}); was it made for another architecture?"
        )
    outside = sorted(full for full in [*diffs, *abs_tensors] if not full.startswith(prefix))
    config = config_for_base(
        base_model,
        base_id=base_id,
        kind=kind,
        task_type=task_type,
        labels=list(labels),
        method={"name": "composable-sft-import", **config_fields.pop("method", {})},
        lineage={
            "converted_from": "composable-sft",
            "dropped": outside if kind == "language" else [],
            **config_fields.pop("lineage", {}),
        },
        **{"language" if kind == "language" else "task": name},
        **config_fields,
    )
    params = _params_from_diffs(diffs, base_model, kind, source)
    head = _head_from_abs(abs_tensors, base_model, kind, source)
    validate_tensors(params, head, str(source))
    return SparseDelta(params, config, head)


def to_composable_sft(delta: SparseDelta, path: str | os.PathLike, base_model_prefix: str) -> Path:
    """Write `delta` as `path/pytorch_diff.bin` (atomically) for composable-sft; return the file.

    Names become full names (`base_model_prefix + "." + name`); indices are re-encoded in
    composable-sft's column-major order as `index_steps`, a list of plain ints (so the file loads
    with `torch.load(weights_only=True)` and no extra globals). Head tensors go into `abs`. A
    language delta has no MLM head: apply it in composable-sft with `with_abs=False`, or keep the
    base model's MLM head.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    diffs = {}
    for name, entry in sorted(delta.params.items()):
        column_major, order = torch.sort(_reverse_dim_order(entry.indices.cpu().long(), entry.shape[::-1]))
        diffs[f"{base_model_prefix}.{name}"] = {
            "size": torch.Size(entry.shape),
            "index_steps": torch.diff(column_major, prepend=column_major.new_zeros(1)).tolist(),
            "values": entry.values.cpu()[order],
        }
    abs_tensors = {name: tensor.detach().cpu().clone() for name, tensor in sorted(delta.head.items())}
    buffer = io.BytesIO()
    torch.save({"diffs": diffs, "abs": abs_tensors}, buffer)
    target = directory / COMPOSABLE_SFT_FILE
    atomic_write_bytes(target, buffer.getbuffer())
    return target


def base_model_prefix_for(base: str | os.PathLike) -> str:
    """The `base_model_prefix` (`bert`, `roberta`, ...) of a base's architecture, read from its config only."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(os.fspath(base))
    try:
        return AutoModel._model_mapping[type(config)].base_model_prefix
    except KeyError:
        raise BaseModelMismatchError(f"{base}: transformers has no model class for {type(config).__name__}") from None
