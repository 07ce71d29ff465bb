"""How much two sparse deltas (or two boolean masks) overlap: Jaccard of supports, sign agreement, correlation.

The S4-Tuning paper (sections 4.4-4.5) compares language sub-networks by the overlap of their masks;
`support_overlap` does the same for stored deltas (and, through `SupportView.from_masks`, for masks),
overall, per layer and per module type. Everything works on sorted flat indices with torch set
operations; nothing loops in Python over individual entries.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from .delta import SparseDelta
from .summary import ParameterSummary, by_layer, layer_of

MODULE_TYPES = ("embeddings", "attention", "ffn", "layernorm", "pooler", "other")


def module_type(name: str) -> str:
    """Classify a base-relative parameter name into one of `MODULE_TYPES`.

    Layer norms come first (`embeddings.LayerNorm` and `attention.output.LayerNorm` are `layernorm`),
    then `pooler`, `embeddings`, `attention` (query/key/value and `attention.output.dense`), `ffn`
    (`intermediate.*` and `output.dense` outside attention); anything else is `other`.
    """
    parts = name.split(".")
    lowered = [p.lower() for p in parts]
    if any(p in ("layernorm", "layer_norm", "ln") or p.startswith(("ln_", "layernorm")) for p in lowered):
        return "layernorm"
    if "pooler" in lowered:
        return "pooler"
    if "embeddings" in lowered or "embed_tokens" in lowered or "embed_positions" in lowered:
        return "embeddings"
    if any(p in ("attention", "self_attn", "attn") for p in lowered) or any(
        p in ("query", "key", "value") for p in lowered
    ):
        return "attention"
    if "intermediate" in lowered or "output" in lowered or any(p in ("fc1", "fc2", "mlp", "ffn") for p in lowered):
        return "ffn"
    return "other"


@dataclass(frozen=True)
class ParamSupport:
    """The support of one parameter: sorted unique flat int64 `indices`, their `values` (None for masks)."""

    indices: torch.Tensor
    values: torch.Tensor | None
    numel: int


@dataclass
class SupportView:
    """A named set of supports, `{parameter name: ParamSupport}`, built from a delta or from masks."""

    name: str
    params: dict[str, ParamSupport]

    @classmethod
    def from_delta(cls, delta: SparseDelta, name: str | None = None) -> "SupportView":
        """The delta's non-zero entries (its `params`; the dense head is left out)."""
        params = {
            pname: ParamSupport(entry.indices.long().cpu(), entry.values.float().cpu(), entry.numel)
            for pname, entry in delta.params.items()
        }
        return cls(name or delta.name, params)

    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor], name: str) -> "SupportView":
        """The True entries of boolean masks `{parameter name: bool tensor}` (e.g. S4's per-language masks).

        Every parameter a mask covers counts as touched for `density`, even when its mask is all False.
        """
        params = {}
        for pname, mask in masks.items():
            if mask.dtype != torch.bool:
                raise ValueError(f"mask for '{pname}' has dtype {mask.dtype}; expected torch.bool")
            flat = mask.detach().reshape(-1).cpu()
            params[pname] = ParamSupport(flat.nonzero().squeeze(1), None, flat.numel())
        return cls(name, params)

    @property
    def nnz(self) -> int:
        return sum(p.indices.numel() for p in self.params.values())

    def density_by_layer(self) -> dict[str, float]:
        """nnz / numel per layer, where numel sums only the parameters this view touches.

        A `SparseDelta` only records the shapes of the parameters it changes, so a layer's density
        is relative to those touched parameters, not to all of the layer's parameters in the base.
        """
        layers = by_layer(ParameterSummary(pname, (), p.numel, p.indices.numel()) for pname, p in self.params.items())
        return {row.name: row.density for row in sorted(layers, key=lambda row: row.name)}


@dataclass(frozen=True)
class GroupOverlap:
    """Support sizes and Jaccard within one group (a layer or a module type)."""

    nnz_a: int
    nnz_b: int
    intersection: int
    union: int

    @property
    def jaccard(self) -> float:
        return self.intersection / self.union if self.union else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "jaccard": self.jaccard}


@dataclass(frozen=True)
class OverlapReport:
    """How supports `a` and `b` overlap.

    `jaccard` is |A ∩ B| / |A ∪ B| over (parameter, index) pairs (1.0 when both are empty);
    `sign_agreement` is the fraction of shared entries whose values have the same sign and
    `correlation` the Pearson correlation of the values on shared entries; both are None when a side
    has no values (masks), and `correlation` also when there are fewer than 2 shared entries or a
    side's shared values have zero variance. `by_layer`/`by_module` hold groups either side touches
    (non-empty union); `density_a`/`density_b` are per-layer densities over touched parameters.
    """

    a: str
    b: str
    nnz_a: int
    nnz_b: int
    intersection: int
    union: int
    sign_agreement: float | None
    correlation: float | None
    by_layer: dict[str, GroupOverlap] = field(default_factory=dict)
    by_module: dict[str, GroupOverlap] = field(default_factory=dict)
    density_a: dict[str, float] = field(default_factory=dict)
    density_b: dict[str, float] = field(default_factory=dict)

    @property
    def jaccard(self) -> float:
        return self.intersection / self.union if self.union else 1.0

    def to_dict(self) -> dict:
        return {
            "a": self.a, "b": self.b, "nnz_a": self.nnz_a, "nnz_b": self.nnz_b,
            "intersection": self.intersection, "union": self.union, "jaccard": self.jaccard,
            "sign_agreement": self.sign_agreement, "correlation": self.correlation,
            "by_layer": {k: v.to_dict() for k, v in self.by_layer.items()},
            "by_module": {k: v.to_dict() for k, v in self.by_module.items()},
            "density_a": self.density_a, "density_b": self.density_b,
        }


def _as_view(x: SparseDelta | SupportView, name: str | None = None) -> SupportView:
    if isinstance(x, SupportView):
        return x if name is None or name == x.name else SupportView(name, x.params)
    return SupportView.from_delta(x, name)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    if x.numel() < 2:
        return None
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    if denom == 0.0 or not math.isfinite(denom):
        return None
    return max(-1.0, min(1.0, float((x * y).sum()) / denom))


def _add(groups: dict[str, list[int]], key: str, nnz_a: int, nnz_b: int, inter: int) -> None:
    row = groups.setdefault(key, [0, 0, 0])
    row[0] += nnz_a
    row[1] += nnz_b
    row[2] += inter


def _finish(groups: dict[str, list[int]], order=None) -> dict[str, GroupOverlap]:
    keys = sorted(groups, key=order) if order else sorted(groups)
    out = {}
    for key in keys:
        na, nb, inter = groups[key]
        if na + nb - inter > 0:
            out[key] = GroupOverlap(na, nb, inter, na + nb - inter)
    return out


def _layer_order(layer: str):
    # embeddings, encoder.layer.0, encoder.layer.1, ..., encoder.layer.10, pooler: numeric, not lexical
    head, _, tail = layer.rpartition(".")
    return (head, int(tail), "") if tail.isdigit() else (layer, -1, layer)


def support_overlap(
    a: SparseDelta | SupportView, b: SparseDelta | SupportView, *, name_a: str | None = None, name_b: str | None = None
) -> OverlapReport:
    """Compare the supports (and, for deltas, the values) of `a` and `b`; see `OverlapReport`."""
    va, vb = _as_view(a, name_a), _as_view(b, name_b)
    by_layer: dict[str, list[int]] = {}
    by_module: dict[str, list[int]] = {}
    shared_a: list[torch.Tensor] = []
    shared_b: list[torch.Tensor] = []
    has_values = True
    for pname in sorted(va.params.keys() | vb.params.keys()):
        pa, pb = va.params.get(pname), vb.params.get(pname)
        if pa is not None and pb is not None and pa.numel != pb.numel:
            raise ValueError(f"'{pname}' has {pa.numel} elements in {va.name} but {pb.numel} in {vb.name}")
        nnz_a = pa.indices.numel() if pa is not None else 0
        nnz_b = pb.indices.numel() if pb is not None else 0
        inter = 0
        if nnz_a and nnz_b:
            in_b = torch.isin(pa.indices, pb.indices, assume_unique=True)
            inter = int(in_b.sum())
            if pa.values is None or pb.values is None:
                has_values = False
            elif inter:
                common = pa.indices[in_b]
                shared_a.append(pa.values[in_b])
                shared_b.append(pb.values[torch.searchsorted(pb.indices, common)])
        elif (pa is not None and pa.values is None) or (pb is not None and pb.values is None):
            has_values = False
        _add(by_layer, layer_of(pname), nnz_a, nnz_b, inter)
        _add(by_module, module_type(pname), nnz_a, nnz_b, inter)

    totals = [sum(row[i] for row in by_layer.values()) for i in range(3)]
    sign_agreement = correlation = None
    if has_values and shared_a:
        xa, xb = torch.cat(shared_a), torch.cat(shared_b)
        sign_agreement = float((torch.sign(xa) == torch.sign(xb)).double().mean())
        correlation = _pearson(xa, xb)
    return OverlapReport(
        a=va.name, b=vb.name, nnz_a=totals[0], nnz_b=totals[1], intersection=totals[2],
        union=totals[0] + totals[1] - totals[2], sign_agreement=sign_agreement, correlation=correlation,
        by_layer=_finish(by_layer, _layer_order),
        by_module=_finish(by_module, lambda m: MODULE_TYPES.index(m)),
        density_a=va.density_by_layer(), density_b=vb.density_by_layer(),
    )


def overlap_matrix(deltas: Mapping[str, SparseDelta | SupportView]) -> dict[tuple[str, str], OverlapReport]:
    """`support_overlap` of every unordered pair `(name_a, name_b)`, in the mapping's order (a before b)."""
    views = {name: _as_view(d, name) for name, d in deltas.items()}
    return {(na, nb): support_overlap(views[na], views[nb]) for na, nb in itertools.combinations(views, 2)}


def mask_overlap_matrix(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[tuple[str, str], OverlapReport]:
    """`overlap_matrix` of per-language boolean masks `{language: {parameter: bool tensor}}`."""
    return overlap_matrix({name: SupportView.from_masks(m, name) for name, m in masks.items()})


def jaccard_matrix(names: list[str], reports: Mapping[tuple[str, str], OverlapReport]) -> list[list[float]]:
    """The symmetric matrix of overall Jaccard values (1.0 on the diagonal) for `names`."""
    matrix = [[1.0] * len(names) for _ in names]
    for i, j in itertools.combinations(range(len(names)), 2):
        report = reports.get((names[i], names[j])) or reports[(names[j], names[i])]
        matrix[i][j] = matrix[j][i] = report.jaccard
    return matrix
