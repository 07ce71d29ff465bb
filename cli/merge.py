"""`sft merge REF REF ... --into NAME`: merge stored deltas into a new stored delta, with its lineage."""

from __future__ import annotations

import click

from sftstore.naming import DeltaRef

from .common import JSON_OPTION, base_option, open_store, print_json


def _parse_weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, e.g. 0.5,0.5; got {value!r}") from None


@click.command("merge")
@click.argument("refs", nargs=-1, required=True, metavar="REF REF...")
@click.option("--into", "into", required=True, metavar="NAME", help="Name of the merged delta (stored as lang/NAME or task/NAME).")
@click.option("--method", type=click.Choice(["sum", "ties"]), default="sum", show_default=True,
              help="sum: weighted sum (default weights 1/n: the average); ties: TIES-Merging (trim, elect sign, disjoint mean).")
@click.option("--weights", callback=_parse_weights, metavar="W,W,...",
              help="One weight per REF, e.g. 0.5,0.5. Default: 1/n each for sum, 1 each for ties.")
@click.option("--trim", type=float, default=0.2, show_default=True,
              help="ties: fraction of each delta's non-zeros dropped (smallest magnitudes).")
@click.option("--kind", type=click.Choice(["language", "task"]), default=None,
              help="Kind of the result when the inputs' kinds differ.")
@base_option()
@JSON_OPTION
def merge_command(refs, into, method, weights, trim, kind, base, as_json) -> None:
    """Merge stored deltas (e.g. lang/hau lang/yor) into one new sparse delta, recording its lineage."""
    from sftstore.merge import MergeError, merge_deltas

    if len(refs) < 2:
        raise click.UsageError("merge needs at least two references")
    store = open_store()
    versions = [store.resolve(DeltaRef.parse(ref), base) for ref in refs]
    deltas = [store.load(version) for version in versions]
    try:
        merged = merge_deltas(deltas, method=method, weights=weights, trim=trim, name=into, kind=kind)
    except MergeError as exc:
        raise click.ClickException(str(exc)) from None
    for entry, version in zip(merged.config.lineage["merged_from"], versions):
        entry.update(ref=version.ref, base=version.base, tensors_sha256=version.tensors_sha256)
    source = {"type": "merge", "method": merged.config.method["name"], "inputs": [v.ref for v in versions]}
    stored, created = store.add(merged, source=source)
    if as_json:
        print_json({**stored.to_dict(), "created": created, "method": merged.config.method,
                    "lineage": merged.config.lineage})
        return
    state = "stored" if created else "already stored as"
    click.echo(f"{state} {stored.ref} ({stored.base}): merged {len(versions)} deltas with {method}, "
               f"{stored.nnz:,} non-zeros, density {stored.density:.3%}")
