"""`sft overlap`: how much stored deltas (or their per-language masks) share their supports (Jaccard),
signs and values."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from sftstore import SftError

from .common import JSON_OPTION, base_option, new_table, open_store, print_json, print_table, short_base

if TYPE_CHECKING:
    from sftstore import SparseDelta
    from sftstore.analysis import SupportView


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def plot_heatmap(names: list[str], matrix: list[list[float]], path: Path) -> Path:
    """Draw the Jaccard matrix as an annotated heatmap into `path` (needs matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise click.UsageError(
            "--plot needs matplotlib: pip install matplotlib (or the optional extra: pip install 'sftstore[plot]')"
        ) from None
    size = max(3.0, 0.8 * len(names) + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white",
                    fontsize=8)
    fig.colorbar(image, ax=ax, label="Jaccard of supports")
    ax.set_title("support overlap (Jaccard)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


@click.command("overlap")
@click.argument("refs", nargs=-1, required=True)
@base_option()
@click.option("--by", type=click.Choice(["layer", "module"]), default=None,
              help="Also show Jaccard per layer or per module type (embeddings, attention, ffn, ...).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save a heatmap of the pairwise Jaccard matrix to this PNG (needs matplotlib).")
@click.option("--masks", "use_masks", is_flag=True,
              help="Compare the per-language sub-network masks stored with each delta (S4-Tuning's), named "
                   "REF#LANG, instead of its support; a delta without masks is compared by its support.")
@JSON_OPTION
def overlap_command(refs, base, by, plot, use_masks, as_json) -> None:
    """Compare the supports of two or more stored deltas (or, with --masks, the per-language masks
    stored with them): Jaccard, sign agreement, value correlation."""
    from sftstore.analysis import SupportView, jaccard_matrix, overlap_matrix

    try:
        store = open_store()
        versions = list({v.ref: v for v in (store.resolve(ref, base) for ref in refs)}.values())
        bases = sorted({v.base for v in versions})
        if len(bases) > 1:
            raise click.UsageError(f"the deltas belong to different bases ({', '.join(bases)}); compare one base at a time")
        items: dict[str, SparseDelta | SupportView] = {}
        for version in versions:
            delta = store.load(version)
            if use_masks and delta.subnetworks:
                for language in delta.subnetworks:
                    name = f"{version.ref}#{language}"
                    items[name] = SupportView.from_masks(delta.subnetworks[language], name)
            else:
                items[version.ref] = delta
        if len(items) < 2:
            raise click.UsageError("give at least two different deltas (or one with several masks and --masks) to compare")
    except SftError as exc:
        raise click.ClickException(str(exc)) from None
    names = list(items)
    reports = overlap_matrix(items)
    matrix = jaccard_matrix(names, reports)
    if plot is not None:
        plot_heatmap(names, matrix, plot)

    if as_json:
        print_json({"base": bases[0], "refs": names, "jaccard": matrix,
                    "pairs": [report.to_dict() for report in reports.values()],
                    **({"plot": str(plot)} if plot is not None else {})})
        return

    number = {name: str(i) for i, name in enumerate(names, 1)}  # columns and pairs go by number: 80 columns
    table = new_table("#", "delta", "nnz", *number.values(), right=("nnz", *number.values()))
    for name, row in zip(names, matrix):
        table.add_row(number[name], name, f"{items[name].nnz:,}", *(f"{value:.3f}" for value in row))
    print_table(table, f"Jaccard of supports (base {short_base(bases[0])})")

    pairs = new_table("pair", "shared", "jaccard", "same sign", "corr", right=("shared", "jaccard", "same sign", "corr"))
    for report in reports.values():
        pairs.add_row(f"{number[report.a]}~{number[report.b]}", f"{report.intersection:,}", f"{report.jaccard:.3f}",
                      _fmt(report.sign_agreement, ".1%"), _fmt(report.correlation))
    print_table(pairs, "pairs (signs and correlation on shared entries)")

    if by is not None:
        groups_of = (lambda r: r.by_layer) if by == "layer" else (lambda r: r.by_module)
        keys: list[str] = []
        for report in reports.values():
            keys.extend(k for k in groups_of(report) if k not in keys)
        columns = [f"{number[a]}~{number[b]}" for a, b in reports]
        detail = new_table(by, *columns, right=tuple(columns))
        for key in keys:
            cells = [groups_of(r).get(key) for r in reports.values()]
            detail.add_row(key, *("-" if g is None else f"{g.jaccard:.3f}" for g in cells))
        print_table(detail, f"Jaccard per {by}")
    if plot is not None:
        click.echo(f"heatmap saved to {plot}")
