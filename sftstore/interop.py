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
that numpy integer scalars need (composable-sft's `index_steps` start with a `numpy.int64`, or
another integer type), and those through stand-ins that build integer scalars and nothing else.

Reading is bounded by the file's size: a file over `MAX_FILE_BYTES` is refused unread, torch's zip
records must be stored uncompressed, and nothing is decoded beyond what the bytes can encode (each
`index_steps` item takes at least one byte, so lists shared between or nested in entries are
refused before numpy expands them; a tensor may not be larger than its storage). torch.load itself
still builds what its default allowlist allows (e.g. `bytearray(n)`) before any of this is checked.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import reprlib
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_write_bytes
from .delta import VALUE_DTYPES, ParameterDelta, SparseDelta, config_for_base, index_dtype_for, validate_tensors
from .errors import BaseModelMismatchError, DeltaFormatError
from .modeling import base_parameters, head_parameters, loading_base

COMPOSABLE_SFT_FILE = "pytorch_diff.bin"
MAX_FILE_BYTES = 16 * 2**30  # far above any composable-sft file; unpickling may take ~20x the file's size in memory
_MAX_ENTRIES = 1_000_000  # diffs and abs names together; no model has that many parameters
_MAX_DIMS = 64
_MAX_NUMEL = 2**62  # keeps int64 index arithmetic exact (see `_steps`)
_ENTRY_KEYS = ("size", "index_steps", "values")
# How torch's restricted unpickler names what it refused: a GLOBAL, a class it may not build or
# instantiate, or a function it may not call.
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL ([\w.]+)"),
    re.compile(r"but got <class '([^']+)'>"),
    re.compile(r"unrecognized function (\S+)"),
)
_INT_SCALAR_TYPES = frozenset(
    {np.int8, np.int16, np.int32, np.int64, np.longlong, np.uint8, np.uint16, np.uint32, np.uint64, np.ulonglong}
)
_STEP_TYPES = _INT_SCALAR_TYPES | {int}  # not bool
_INT_DTYPE_CODES = frozenset(np.dtype(t).str[1:] for t in _INT_SCALAR_TYPES)  # 'i1' ... 'u8', as dtypes pickle
_INT_DTYPE_CLASSES = frozenset(type(np.dtype(t)) for t in _INT_SCALAR_TYPES)  # numpy.dtypes.Int32DType, ...

try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1.x without the `numpy._core` alias
    from numpy.core.multiarray import scalar as _numpy_scalar


class _RefusedNumpy(Exception):
    """What the numpy stand-ins raise inside the unpickler for anything but an integer scalar."""


def _integer_dtype(code: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """`numpy.dtype` as a pickle calls it (`dtype('i4', False, True)`), for integer codes only.

    Always a fresh copy: the pickle then sets its state (byte order) on it.
    """
    if not (isinstance(code, str) and code in _INT_DTYPE_CODES):
        raise _RefusedNumpy(f"numpy.dtype({reprlib.repr(code)})")
    return np.dtype(code, False, True)


def _integer_scalar(dtype: Any, data: Any = None) -> np.integer:
    """numpy's `multiarray.scalar` as a pickle calls it, for a plain integer dtype and its bytes only."""
    plain = type(dtype) in _INT_DTYPE_CLASSES and dtype.names is None and dtype.subdtype is None
    if not (plain and isinstance(data, bytes) and len(data) == dtype.itemsize):
        raise _RefusedNumpy(f"a numpy scalar of {type(dtype).__name__} that is not a plain integer")
    return _numpy_scalar(dtype, data)


def _numpy_globals() -> list:
    """The globals that unpickling numpy integer scalars needs, under the names numpy 1.x and 2.x write.

    `scalar` and `numpy.dtype` are the checking stand-ins above, so no other numpy object (a float,
    or a void scalar of any size) is built; the dtype classes are there for their pickled state.
    """
    return [
        (_integer_scalar, "numpy._core.multiarray.scalar"),  # pickled by numpy >= 2
        (_integer_scalar, "numpy.core.multiarray.scalar"),  # pickled by numpy 1.x
        (_integer_dtype, "numpy.dtype"),
        *_INT_DTYPE_CLASSES,
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


def _compressed_records(path: Path) -> list[str]:
    """The records of a zip file that are not stored uncompressed."""
    with zipfile.ZipFile(path) as archive:
        return [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]


def _file_bytes(path: Path) -> int:
    """The file's size, once checked to be at most `MAX_FILE_BYTES` and, in torch's zip format, to hold only
    uncompressed records (torch writes no others; a deflated one could expand a thousandfold)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DeltaFormatError(f"{path}: {size} bytes; files over {MAX_FILE_BYTES} bytes are refused unread")
        with path.open("rb") as file:
            is_zip = file.read(4) == b"PK\x03\x04"  # torch.load's own test
        compressed = _compressed_records(path) if is_zip else []
    except (OSError, zipfile.BadZipFile) as exc:
        raise DeltaFormatError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None
    if compressed:
        raise DeltaFormatError(f"{path}: compressed zip records {compressed[:3]}; torch writes them uncompressed")
    return size


def _load(path: Path) -> Any:
    """Unpickle with torch's restricted unpickler; nothing outside tensors, containers and ints is built."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except _RefusedNumpy as exc:
        raise DeltaFormatError(
            f"{path}: refused: the file asks for {exc}; a composable-sft file holds integer scalars only"
        ) from None
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


def _shape(size: Any, where: str) -> tuple[int, ...]:
    """`size` as a shape: at most `_MAX_DIMS` non-negative ints, `_MAX_NUMEL` elements in all."""
    if not isinstance(size, (tuple, list)) or len(size) > _MAX_DIMS or any(type(d) is not int or d < 0 for d in size):
        raise DeltaFormatError(f"{where}: 'size' is {reprlib.repr(size)}; expected a torch.Size")
    if math.prod(size) > _MAX_NUMEL:
        raise DeltaFormatError(f"{where}: 'size' {list(size)} has more than {_MAX_NUMEL} elements")
    return tuple(size)


def _steps(raw: Any, numel: int, where: str) -> np.ndarray:
    """Check `index_steps` and return the absolute (column-major) flat indices they encode.

    Its length and item types are checked before numpy converts it: nothing longer than the parameter,
    and no nested list (one inner list repeated N times costs the pickle N references, numpy N x its length).
    """
    if not isinstance(raw, (list, tuple)):
        raise DeltaFormatError(f"{where}: 'index_steps' is a {type(raw).__name__}; expected a list of integers")
    out_of_range = f"{where}: 'index_steps' reach past the end of a parameter of {numel} elements"
    if len(raw) > numel:
        raise DeltaFormatError(f"{out_of_range} ({len(raw)} steps)")
    other = set(map(type, raw)) - _STEP_TYPES
    if other:
        held = ", ".join(sorted(t.__name__ for t in other))
        raise DeltaFormatError(f"{where}: 'index_steps' is not a flat list of integers (it holds {held})")
    try:
        steps = np.fromiter(raw, dtype=np.int64, count=len(raw))
    except OverflowError:
        raise DeltaFormatError(f"{out_of_range} (a step over 64 bits)") from None
    if steps.size and steps[0] < 0:
        raise DeltaFormatError(f"{where}: 'index_steps'[0] (the first index) is {steps[0]}; expected >= 0")
    bad = np.flatnonzero(steps[1:] <= 0)
    if bad.size:
        position, gap = int(bad[0]) + 1, int(steps[bad[0] + 1])
        problem = "a duplicate index" if gap == 0 else "unsorted indices"
        raise DeltaFormatError(
            f"{where}: 'index_steps'[{position}] is {gap}: {problem}; gaps after the first must be > 0"
        )
    if steps.size and steps.max() >= numel:
        raise DeltaFormatError(out_of_range)
    # Steps below numel <= 2**62 sum exactly up to the first index past the end (later sums may wrap).
    indices = np.cumsum(steps)
    past = np.flatnonzero(indices >= numel)
    if past.size:
        raise DeltaFormatError(f"{out_of_range} (index {int(indices[past[0]])})")
    return indices


def _float_tensor(tensor: Any, what: str) -> torch.Tensor:
    """`tensor` if it is a dense floating-point CPU tensor no larger than its storage; else `DeltaFormatError`.

    The storage bound refuses expanded views (stride 0), which a few bytes of pickle make any size.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or not tensor.is_floating_point():
        found = f"{tensor.dtype} ({tensor.layout})" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise DeltaFormatError(f"{what} is {found}; expected a dense floating-point tensor")
    if tensor.device.type != "cpu":  # map_location="cpu" leaves only data-less (meta) tensors elsewhere
        raise DeltaFormatError(f"{what} is on device '{tensor.device.type}'; expected one with its data in the file")
    stored = tensor.untyped_storage().nbytes()
    if tensor.numel() * tensor.element_size() > stored:
        raise DeltaFormatError(
            f"{what} has {tensor.numel()} elements over a storage of {stored} bytes (an expanded view); "
            "expected a tensor stored in full"
        )
    return tensor


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse a tensor holding NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise DeltaFormatError(f"{what} holds NaN or Inf")


def _decode_diff(entry: Any, where: str) -> dict[str, Any]:
    """One `diffs` entry, checked, as `size` and row-major sorted int64 `indices` with their `values`."""
    if not isinstance(entry, dict):
        raise DeltaFormatError(f"{where}: is a {type(entry).__name__}; expected a dict with {', '.join(_ENTRY_KEYS)}")
    missing = [key for key in _ENTRY_KEYS if key not in entry]
    if missing:
        raise DeltaFormatError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    shape = _shape(entry["size"], where)
    indices = _steps(entry["index_steps"], math.prod(shape), where)
    values = _float_tensor(entry["values"], f"{where}: 'values'")
    if values.dim() != 1 or values.numel() != indices.size:
        raise DeltaFormatError(
            f"{where}: 'values' has shape {list(values.shape)}; 'index_steps' has {indices.size} entries"
        )
    _check_finite(values, f"{where}: 'values'")
    row_major, order = torch.sort(_reverse_dim_order(torch.from_numpy(indices), shape))
    return {"size": torch.Size(shape), "indices": row_major, "values": values[order]}


def _check_step_total(diffs: dict, file_bytes: int, path: Path) -> None:
    """Refuse `index_steps` lists longer in all than the file has bytes, before decoding any.

    Each item takes at least one byte of pickle, so a longer total means lists shared between entries:
    a few bytes that would decode to gigabytes.
    """
    total = 0
    for name, entry in diffs.items():
        steps = entry.get("index_steps") if isinstance(entry, dict) else None
        total += len(steps) if isinstance(steps, (list, tuple)) else 0
        if total > file_bytes:
            raise DeltaFormatError(
                f"{path}: diffs entry '{name}': 'index_steps' bring the file's total to {total} steps, more than "
                f"its {file_bytes} bytes can encode (a list shared between entries)"
            )


def read_composable_sft(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Read and check a composable-sft `pytorch_diff.bin` (or the directory holding it).

    Returns `(diffs, abs)` keyed by the file's full parameter names: each diff as `{'size':
    torch.Size, 'indices': int64 flat ROW-major indices (sorted, unique), 'values': tensor}` (the
    file's column-major indices converted), `abs` as the dense tensors. Raises `DeltaFormatError`
    naming the file and entry for anything malformed, for a file that asks for any Python global
    besides numpy integer scalars (which is refused without being unpickled), and for one that
    would decode to more than its bytes can hold (see the module docstring); such a file is
    refused before it is expanded, so reading costs memory in proportion to the file's size.
    """
    path = _file_of(path)
    file_bytes = _file_bytes(path)
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
    if len(data["diffs"]) + len(abs_tensors) > _MAX_ENTRIES:
        raise DeltaFormatError(f"{path}: more than {_MAX_ENTRIES} diffs and abs entries; no model has that many")
    for name in [*data["diffs"], *abs_tensors]:
        if not isinstance(name, str):
            raise DeltaFormatError(f"{path}: entry name {reprlib.repr(name)} is not a string")
    _check_step_total(data["diffs"], file_bytes, path)
    diffs = {name: _decode_diff(entry, f"{path}: diffs entry '{name}'") for name, entry in data["diffs"].items()}
    for name, tensor in abs_tensors.items():
        what = f"{path}: abs entry '{name}'"
        _check_finite(_float_tensor(tensor, what), what)
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

    with loading_base(base) as hub_kwargs:
        config = AutoConfig.from_pretrained(os.fspath(base), **hub_kwargs)
    try:
        return AutoModel._model_mapping[type(config)].base_model_prefix
    except KeyError:
        raise BaseModelMismatchError(f"{base}: transformers has no model class for {type(config).__name__}") from None
