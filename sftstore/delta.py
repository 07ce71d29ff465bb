"""The SparseDelta: sparse differences from a base model's weights, plus dense task-head tensors."""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import FORMAT_VERSION, BaseModelInfo, DeltaConfig
from .errors import BaseModelMismatchError, DeltaFormatError
from .modeling import base_parameters, fingerprint, head_parameters
from .settings import base_key
from .sparse_update import Job, Touched, add_in_place, restore
from .subnetworks import SubnetworkMasks
from .summary import ParameterSummary, by_layer

INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUMPY_FLOATS = (torch.float32, torch.float16)


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 flat indices, int64 only for a parameter of 2**31 elements or more."""
    return torch.int32 if numel < 2**31 else torch.int64


def _all_finite(values: torch.Tensor) -> bool:
    # A finite sum proves every term finite (NaN and Inf propagate); only an overflowing sum of
    # finite values needs the elementwise check. One reduction instead of a boolean copy. On the CPU,
    # numpy's (single-threaded, never contending with a load's sha256 thread) where it knows the dtype.
    if values.device.type == "cpu" and values.dtype in _NUMPY_FLOATS:
        array = values.detach().numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            return bool(np.isfinite(array.sum(dtype=np.float32))) or bool(np.isfinite(array).all())
    return bool(torch.isfinite(values.sum(dtype=torch.float32))) or bool(torch.isfinite(values).all())


def _strictly_increasing(indices: torch.Tensor) -> bool:
    if indices.device.type == "cpu":  # numpy, for the reason `_all_finite` gives
        array = indices.numpy()
        return bool(np.all(array[1:] > array[:-1]))
    return bool((indices[1:] > indices[:-1]).all())


@dataclass(frozen=True)
class ParameterDelta:
    """The non-zero differences of one parameter: flat row-major `indices` (sorted, unique) and `values`."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> "ParameterDelta":
        return ParameterDelta(self.indices.to(device), self.values.to(device), self.shape)

    def to_dense(self) -> torch.Tensor:
        """The full difference tensor (float32), for inspection and tests."""
        dense = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        dense[self.indices.long()] = self.values.float()
        return dense.view(self.shape)

    def validate(self, name: str, where: str, *, indices_proven: bool = False) -> None:
        """Raise `DeltaFormatError` naming `where` and the tensor if the entry is malformed.

        `indices_proven`: the indices were decoded from a code already proven to give strictly increasing
        indices in range (format version 2's gaps), so that O(nnz) pass is skipped.
        """
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise DeltaFormatError(f"{where}: shape of '{name}' is {list(self.shape)}; expected non-negative ints")
        idx, val = self.indices, self.values
        if idx.dtype not in INDEX_DTYPES:
            raise DeltaFormatError(f"{where}: tensor '{name}::indices' has dtype {idx.dtype}; expected int32 or int64")
        if val.dtype not in VALUE_DTYPES:
            raise DeltaFormatError(
                f"{where}: tensor '{name}::values' has dtype {val.dtype}; expected float32, bfloat16 or float16"
            )
        if idx.dim() != 1 or val.dim() != 1:
            raise DeltaFormatError(f"{where}: tensors '{name}::indices' and '{name}::values' must be 1-D")
        if idx.numel() != val.numel():
            raise DeltaFormatError(
                f"{where}: '{name}::indices' has {idx.numel()} entries but '{name}::values' has {val.numel()}"
            )
        if idx.numel() == 0:
            return
        if not _all_finite(val):
            raise DeltaFormatError(f"{where}: tensor '{name}::values' holds NaN or Inf")
        if indices_proven:
            return
        if idx.numel() > 1 and not _strictly_increasing(idx):
            raise DeltaFormatError(f"{where}: tensor '{name}::indices' is not strictly increasing (unsorted or duplicated)")
        if int(idx[0]) < 0 or int(idx[-1]) >= self.numel:
            raise DeltaFormatError(
                f"{where}: tensor '{name}::indices' holds {int(idx[0]) if int(idx[0]) < 0 else int(idx[-1])}, "
                f"outside [0, {self.numel}) for shape {list(self.shape)}"
            )


def validate_tensors(
    params: Mapping[str, ParameterDelta], head: Mapping[str, torch.Tensor], where: str, *, indices_proven: bool = False
) -> None:
    """Check every sparse entry and head tensor; raise `DeltaFormatError` at the first fault."""
    for name, entry in params.items():
        entry.validate(name, where, indices_proven=indices_proven)
    for name, tensor in head.items():
        if tensor.dtype not in VALUE_DTYPES:
            raise DeltaFormatError(f"{where}: head tensor 'head::{name}' has dtype {tensor.dtype}; expected a float dtype")
        if tensor.numel() and not _all_finite(tensor):
            raise DeltaFormatError(f"{where}: head tensor 'head::{name}' holds NaN or Inf")


def config_for_base(
    base: nn.Module, *, base_id: str | None = None, base_revision: str | None = None, **config_fields
) -> DeltaConfig:
    """A manifest for a delta against `base`: its id, fingerprint and parameter count filled in."""
    digests = fingerprint(base)
    return DeltaConfig(
        base_model=BaseModelInfo(
            id=base_id or base_key(getattr(base, "name_or_path", "") or "unknown"),
            arch_digest=digests.arch_digest,
            weights_digest=digests.weights_digest,
            revision=base_revision,
        ),
        num_parameters=sum(p.numel() for p in base_parameters(base).values()),
        **config_fields,
    )


def _check_masks(masks: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise BaseModelMismatchError(
            f"masks name parameters the base model does not have: {unknown[:5]} "
            "(names are relative to model.base_model, e.g. 'encoder.layer.0.output.dense.weight')"
        )
    for name, mask in masks.items():
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(params[name].shape):
            raise BaseModelMismatchError(
                f"mask for '{name}' is {mask.dtype} {list(mask.shape)}; expected torch.bool {list(params[name].shape)}"
            )


class SparseDelta:
    """Sparse differences from a base model's parameters, the task head (if any) and a manifest.

    `params` maps base-model parameter names (as in `model.base_model.named_parameters()`) to
    `ParameterDelta`s; `head` maps full parameter names of a task model (`classifier.weight`) to
    dense tensors. `subnetworks` (optional) holds per-language masks saved with the delta for
    analysis (S4-Tuning's); applying the delta never reads them. Build one with `from_models` or
    `from_tensors`, read one with `from_pretrained`.
    """

    def __init__(
        self,
        params: Mapping[str, ParameterDelta],
        config: DeltaConfig,
        head: Mapping[str, torch.Tensor] | None = None,
        subnetworks: SubnetworkMasks | None = None,
    ) -> None:
        self.params = dict(params)
        self.head = dict(head or {})
        self.config = config
        self.subnetworks = subnetworks

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        shapes: Mapping[str, tuple[int, ...]],
        config: DeltaConfig,
        head: Mapping[str, torch.Tensor] | None = None,
    ) -> "SparseDelta":
        """Build from `{name: (indices, values)}` and `{name: shape}`, validating everything."""
        missing = set(tensors) ^ set(shapes)
        if missing:
            raise DeltaFormatError(f"tensors and shapes name different parameters: {sorted(missing)}")
        params = {
            name: ParameterDelta(idx, val, tuple(int(d) for d in shapes[name])) for name, (idx, val) in tensors.items()
        }
        validate_tensors(params, head or {}, "from_tensors")
        return cls(params, config, head)

    @classmethod
    @torch.no_grad()
    def from_models(
        cls,
        base: nn.Module,
        tuned: nn.Module,
        *,
        masks: Mapping[str, torch.Tensor] | None = None,
        base_id: str | None = None,
        base_revision: str | None = None,
        values_dtype: torch.dtype = torch.float32,
        **config_fields,
    ) -> "SparseDelta":
        """The delta `tuned - base` over the base model's parameters (within `masks` if given).

        Only changed entries are kept. Task deltas (`kind="task"`) carry `tuned`'s head densely.
        `config_fields` are `DeltaConfig` fields (`kind`, `language`, `task`, `task_type`, `labels`,
        `method`, ...); the base model's fingerprint and parameter count are filled in here.
        """
        base_params, tuned_params = base_parameters(base), base_parameters(tuned)
        if base_params.keys() != tuned_params.keys():
            diff = sorted(base_params.keys() ^ tuned_params.keys())
            raise BaseModelMismatchError(f"base and tuned models have different parameters: {diff[:5]}")
        if masks is not None:
            _check_masks(masks, base_params)
        params = {}
        for name, base_param in base_params.items():
            flat_diff = (tuned_params[name].detach().reshape(-1) - base_param.detach().reshape(-1)).float()
            keep = flat_diff != 0
            if masks is not None:
                keep &= masks[name].reshape(-1).to(keep.device) if name in masks else torch.zeros_like(keep)
            indices = keep.nonzero().squeeze(1)
            if indices.numel():
                params[name] = ParameterDelta(
                    indices.to(index_dtype_for(base_param.numel())).cpu(),
                    flat_diff[indices].to(values_dtype).cpu(),
                    tuple(base_param.shape),
                )
        head = {}
        if config_fields.get("kind") == "task":
            head = {name: p.detach().cpu().clone() for name, p in head_parameters(tuned).items()}
            labels = getattr(tuned.config, "id2label", None)
            if "labels" not in config_fields and labels and config_fields.get("task_type") != "masked-lm":
                config_fields["labels"] = [labels[i] for i in range(len(labels))]
        config = config_for_base(base, base_id=base_id, base_revision=base_revision, **config_fields)
        delta = cls(params, config, head)
        validate_tensors(delta.params, delta.head, "from_models")
        return delta

    # ---- inspection ---------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def nnz(self) -> int:
        return sum(entry.nnz for entry in self.params.values())

    @property
    def num_parameters(self) -> int:
        """Parameters of the base model (the denominator of `density`)."""
        return self.config.num_parameters

    @property
    def density(self) -> float:
        return self.nnz / self.num_parameters

    @property
    def values_dtype(self) -> torch.dtype:
        dtypes = {entry.values.dtype for entry in self.params.values()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def summary(self) -> list[ParameterSummary]:
        """One row per touched parameter: shape, size, non-zeros."""
        return [ParameterSummary(n, e.shape, e.numel, e.nnz) for n, e in sorted(self.params.items())]

    def layer_summary(self) -> list[ParameterSummary]:
        """Non-zeros per layer (`embeddings`, `encoder.layer.N`, ...), over the touched parameters."""
        return by_layer(self.summary())

    def __repr__(self) -> str:
        return (
            f"SparseDelta(kind={self.kind!r}, name={self.name!r}, base={self.config.base_model.id!r}, "
            f"nnz={self.nnz}, density={self.density:.4%}, head={sorted(self.head)})"
        )

    def to(self, device: torch.device | str) -> "SparseDelta":
        """A copy whose tensors live on `device` (apply then does no host-to-device copies)."""
        params = {name: entry.to(device) for name, entry in self.params.items()}
        head = {name: t.to(device) for name, t in self.head.items()}
        return SparseDelta(params, self.config, head, self.subnetworks)

    # ---- applying -----------------------------------------------------------------------------

    def check_fits(self, model: nn.Module) -> None:
        """Raise `BaseModelMismatchError` unless every entry names a parameter of `model` with the same shape
        and every head tensor names a parameter of the task head (never a base parameter or one tied to it)."""
        self._fit(model)

    def _fit(self, model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
        """`check_fits`, returning what it found: the base parameters and each head tensor's target."""
        params = base_parameters(model)
        self._check_sparse(model, params)
        return params, self._head_targets(model, params)

    def _check_sparse(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
        """Every sparse entry names a base parameter (`params`, of `model`) with the entry's shape."""
        for name, entry in self.params.items():
            if name not in params:
                raise BaseModelMismatchError(
                    f"delta {self.name!r}: parameter '{name}' does not exist in the base model "
                    f"({type(getattr(model, 'base_model', model)).__name__})"
                )
            if tuple(params[name].shape) != entry.shape:
                raise BaseModelMismatchError(
                    f"delta {self.name!r}: parameter '{name}' has shape {list(entry.shape)} in the delta "
                    f"but {list(params[name].shape)} in the base model"
                )

    def _head_targets(self, model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, str]:
        """Each head tensor's name to the canonical name of the head parameter it sets, checked.

        Tied parameters answer to several names; a name is refused when its parameter shares memory with
        a base parameter (`params`: it would change the base outside the sparse part, and revert would not
        be exact).
        """
        if not self.head:
            return {}
        aliases = _parameter_aliases(model)
        base_spans = {name: _memory_span(p) for name, p in params.items()}
        targets: dict[str, str] = {}
        for name, tensor in self.head.items():
            if name not in aliases:
                raise BaseModelMismatchError(
                    f"delta {self.name!r}: head tensor 'head::{name}' has no parameter in {type(model).__name__}"
                )
            canonical, param = aliases[name]
            shared = _overlapping(_memory_span(param), base_spans)
            if shared is not None:
                raise BaseModelMismatchError(
                    f"delta {self.name!r}: head tensor 'head::{name}' names the base-model parameter '{shared}'; "
                    "a head may only set task-head parameters (base weights change only through sparse entries)"
                )
            if tuple(param.shape) != tuple(tensor.shape):
                raise BaseModelMismatchError(
                    f"delta {self.name!r}: head tensor 'head::{name}' has shape {list(tensor.shape)} "
                    f"but the model's is {list(param.shape)}"
                )
            twin = next((other for other, target in targets.items() if target == canonical), None)
            if twin is not None:
                raise BaseModelMismatchError(
                    f"delta {self.name!r}: head tensors 'head::{twin}' and 'head::{name}' name the same "
                    "(tied) parameter"
                )
            targets[name] = canonical
        return targets

    @torch.no_grad()
    def apply(self, model: nn.Module, scale: float = 1.0) -> "AppliedDelta":
        """Add `scale * delta` to `model`'s weights in place and set its head; return the revert handle.

        Nothing is changed unless every entry fits. The original values at the touched indices are
        gathered first, so `AppliedDelta.revert()` restores bit-identical weights. Half-precision
        weights are updated in float32 and rounded once. Deltas that overlap must be reverted in
        the reverse order of applying (revert refuses otherwise; the composer does this for you).
        """
        params, head_targets = self._fit(model)
        jobs = []
        for name, entry in self.params.items():
            flat = params[name].data.view(-1)
            jobs.append(Job(name, flat, entry.indices.to(flat.device, non_blocking=True),
                            entry.values.to(flat.device, non_blocking=True)))
        originals = add_in_place(jobs, scale)
        head_originals = {}
        for name, tensor in self.head.items():
            target = model.get_parameter(name).data
            head_originals[name] = target.clone()
            target.copy_(tensor)
        indices = {name: entry.indices for name, entry in self.params.items()}
        footprint = _Footprint(self.name, indices, frozenset(head_targets.values()))
        return AppliedDelta(self, model, originals, head_originals, footprint)

    @contextlib.contextmanager
    def applied(self, model: nn.Module, scale: float = 1.0) -> Iterator[nn.Module]:
        """`with delta.applied(model): ...` runs the block with the delta in place, then reverts it."""
        handle = self.apply(model, scale)
        try:
            yield model
        finally:
            handle.revert()

    # ---- files --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, format_version: int | None = None) -> Path:
        """Write the artifact (`sft_delta.safetensors`, `sft_config.json`, `README.md`, and
        `sft_masks.safetensors` when the delta has `subnetworks`) to `directory`, in `format_version`
        (default: the newest, 2; 1 for readers that predate it)."""
        from .format import save_delta

        return save_delta(self, directory, FORMAT_VERSION if format_version is None else format_version)

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, revision: str | None = None, device: torch.device | str = "cpu", **hub_kwargs
    ) -> "SparseDelta":
        """Read and fully validate an artifact: a local directory, or a Hub repository id (`org/name`)."""
        from .format import load_delta
        from .transfer import load_from_hub, looks_like_repo_id

        if looks_like_repo_id(path_or_repo_id):
            return load_from_hub(os.fspath(path_or_repo_id), revision, **hub_kwargs).to(device)
        return load_delta(path_or_repo_id, device=device)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None, tag: str | None = None):
        """Upload this delta's artifact to a Hub repository as one commit (tagged `tag` if given)."""
        from .transfer import push_delta

        return push_delta(self, repo_id, private=private, token=token, tag=tag)


def _parameter_aliases(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Every name of every parameter (a tied one under each of its names) to its canonical name and the parameter."""
    canonical: dict[int, str] = {}  # the first name of each parameter, as `named_parameters()` gives it
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = (canonical.setdefault(id(p), name), p)
    return aliases


def _memory_span(tensor: torch.Tensor) -> tuple[torch.device, int, int]:
    """The device and byte range a tensor's elements occupy."""
    start = tensor.data_ptr()
    return tensor.device, start, start + tensor.numel() * tensor.element_size()


def _overlapping(span: tuple[torch.device, int, int], spans: Mapping[str, tuple[torch.device, int, int]]) -> str | None:
    """The name of the first of `spans` that shares memory with `span`, or None."""
    device, start, end = span
    return next((name for name, (d, s, e) in spans.items() if d == device and s < end and start < e), None)


@dataclass(frozen=True, eq=False)
class _Footprint:
    """What one application touched: flat indices per base parameter and the canonical names of head parameters.

    Kept per model while the delta is applied (also when its handle is dropped: it is then applied for good).
    """

    name: str
    indices: dict[str, torch.Tensor]
    head: frozenset[str]

    def overlaps(self, other: _Footprint) -> bool:
        """Whether both set a head parameter or touch an entry in common."""
        if self.head & other.head:
            return True
        return any(
            bool(torch.isin(indices, other.indices[name].to(indices.device, indices.dtype)).any())
            for name, indices in self.indices.items()
            if name in other.indices
        )


_APPLIED: weakref.WeakKeyDictionary[nn.Module, list[_Footprint]] = weakref.WeakKeyDictionary()


def _applied_on(model: nn.Module) -> list[_Footprint]:
    """The footprints of the deltas applied to `model` and not reverted, oldest first."""
    return _APPLIED.setdefault(model, [])


class AppliedDelta:
    """The record of one `SparseDelta.apply`: the original values it overwrote, to revert exactly."""

    def __init__(
        self,
        delta: SparseDelta,
        model: nn.Module,
        originals: list[Touched],
        head_originals: dict[str, torch.Tensor],
        footprint: _Footprint,
    ) -> None:
        self.delta = delta
        self.model = model
        self._originals = originals
        self._head_originals = head_originals
        self._footprint = footprint
        _applied_on(model).append(footprint)
        self.active = True

    def check_revertible(self, together: Collection[AppliedDelta] = ()) -> None:
        """Raise `RuntimeError` if reverting now would not be exact: a delta applied later to the same model, still
        applied and not among `together` (reverted first, in reverse order), touches an entry or head parameter
        in common."""
        if not self.active:
            raise RuntimeError(f"delta {self.delta.name!r} was already reverted")
        applied = _applied_on(self.model)
        excused = {id(handle._footprint) for handle in together}
        for later in applied[applied.index(self._footprint) + 1 :]:
            if id(later) not in excused and self._footprint.overlaps(later):
                raise RuntimeError(
                    f"cannot revert delta {self.delta.name!r}: delta {later.name!r}, applied after it and still "
                    "applied, changes some of the same weights; revert that one first (ComposedModel.remove does this)"
                )

    @torch.no_grad()
    def revert(self) -> None:
        """Write the gathered original values back: the weights are bit-identical to before `apply`.

        Refused (nothing changed) while a later-applied delta that overlaps this one is still applied.
        """
        self.check_revertible()
        params = base_parameters(self.model)
        restore(self._originals, {name: params[name].data.view(-1) for name in self.delta.params})
        for name, before in self._head_originals.items():
            self.model.get_parameter(name).data.copy_(before)
        _applied_on(self.model).remove(self._footprint)
        self.active = False
