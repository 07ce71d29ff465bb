"""The `sft` command line: parse, call the library, print a table (or JSON with `--json`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.table import Table

from sftstore import SftError, __version__
from sftstore.naming import DeltaRef, kind_prefix
from sftstore.store import StoredVersion

from .common import (
    JSON_OPTION, LABELS_OPTION, TOKEN_OPTION, SftGroup, base_option, by_base, console, human_size, new_table,
    open_store, print_json, print_table, short_base,
)
from .merge import merge_command
from .overlap import overlap_command
from .serve import serve_command
from .train import eval_command, results_command, train_lang, train_task


def _versions_table(versions: list[StoredVersion]) -> Table:
    table = new_table("ref", "aliases", "nnz", "density", "size", "created", "source", right=("nnz", "density", "size"))
    for v in versions:
        table.add_row(v.ref, ",".join(v.aliases), f"{v.nnz:,}", f"{v.density:.3%}", human_size(v.size),
                      v.created_at[:10], v.source.get("type", ""))
    return table


@click.group(cls=SftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sft")
def cli() -> None:
    """Composable sparse fine-tuning: store, version and compose sparse deltas of multilingual models.

    Start with `sft demo`. The store lives in $SFTSTORE_HOME (default ~/.cache/sftstore); the base
    model comes from --base, else $SFTSTORE_BASE, else `base` in $SFTSTORE_HOME/config.toml.
    References look like lang/hau, task/ner@2 or lang/hau@best. --json prints any result whole.
    """


@cli.command("list")
@base_option()
@click.option("--kind", type=click.Choice(["language", "task"]), help="Only this kind.")
@click.option("--name", help="Only this language code or task name.")
@JSON_OPTION
def list_command(base, kind, name, as_json) -> None:
    """List stored deltas and their versions."""
    versions = open_store().list(base=base, kind=kind, name=name)
    if as_json:
        print_json([v.to_dict() for v in versions])
    elif not versions:
        click.echo("The store is empty." if not (base or kind or name) else "No delta matches.")
    else:
        for group_base, group in by_base(versions, "base").items():
            print_table(_versions_table(group), f"base {short_base(group_base)}")


@cli.command()
@click.argument("ref", metavar="REF|DIR")
@base_option()
@JSON_OPTION
def show(ref, base, as_json) -> None:
    """Show one version (manifest, provenance, non-zeros per layer), or what a composed directory holds.

    REF is a stored delta (lang/hau, task/ner@2); DIR a directory `sft compose --out` wrote.
    """
    from sftstore.summary import layer_counts, manifest_fields, mask_counts

    if _names_a_directory(ref):
        _show_composition(Path(ref), as_json)
        return
    store = open_store()
    version = store.resolve(ref, base)
    # From the manifest and the tensors' header, without torch: the store checked every file's sha256 when it
    # took it in (`sft verify` re-checks); loading a delta to apply it validates every byte again.
    manifest = manifest_fields(store.blob_path(version.config_sha256))
    layers = layer_counts(store.blob_path(version.tensors_sha256))
    subnetworks = mask_counts(store.blob_path(version.masks_sha256)) if version.masks_sha256 else {}
    remotes = store.remotes(version)
    if as_json:
        print_json({**version.to_dict(), "manifest": manifest, "remotes": remotes,
                    "layers": [{"layer": r.name, "numel": r.numel, "nnz": r.nnz, "density": r.density} for r in layers],
                    "subnetworks": subnetworks})
        return
    print_table(_versions_table([version]), f"{version.ref} (base {short_base(version.base)})")
    console.print(_details(_show_rows(version, manifest, subnetworks, remotes)))
    console.print()
    table = new_table("layer", "parameters", "nnz", "density", right=("parameters", "nnz", "density"))
    for row in layers:
        table.add_row(row.name, f"{row.numel:,}", f"{row.nnz:,}", f"{row.density:.3%}")
    print_table(table, "non-zeros per layer (touched parameters)")


def _names_a_directory(ref: str) -> bool:
    """Whether `sft show` was given a directory (one with a composition record, or a path that is no reference)."""
    from sftstore.composition import COMPOSITION_FILE

    path = Path(ref)
    if not path.is_dir():
        return False
    if (path / COMPOSITION_FILE).is_file():
        return True
    try:
        DeltaRef.parse(ref)
    except SftError:
        return True
    return False


def _compact(value) -> str:
    """A manifest value in a line or two: `k=v, k=v` for an object's plain fields (nested ones are named,
    shown in full by --json), a list of names comma-separated, anything else as JSON."""
    if isinstance(value, dict):
        plain = [f"{k}={_compact(v)}" for k, v in value.items() if not isinstance(v, (dict, list)) or _is_names(v)]
        nested = [k for k, v in value.items() if isinstance(v, (dict, list)) and not _is_names(v)]
        return ", ".join(plain) + (f"{'; ' if plain else ''}with --json: {', '.join(nested)}" if nested else "")
    if _is_names(value):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list) else str(value)


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)


def _show_rows(version: StoredVersion, manifest: dict, subnetworks: dict[str, int], remotes: list[dict]):
    """(key, value) rows of `sft show REF`; keys of at most 14 characters, so a sha256 fits 80 columns."""
    base_model = manifest.get("base_model") or {}
    rows = [("base", version.base)]
    rows += [(label, base_model[key]) for label, key in (("base revision", "revision"), ("arch digest", "arch_digest"),
                                                         ("weights digest", "weights_digest")) if base_model.get(key)]
    for label, key in (("kind", "kind"), ("language", "language"), ("languages", "languages"), ("task", "task"),
                       ("task type", "task_type"), ("labels", "labels"), ("method", "method"),
                       ("parameters", "num_parameters"), ("requested K", "requested_k"), ("values dtype", "values_dtype"),
                       ("training", "training"),
                       ("metrics", "metrics"), ("lineage", "lineage"), ("license", "license")):
        if manifest.get(key) not in (None, [], {}, ""):
            rows.append((label, _compact(manifest[key])))
    rows += [("tensors sha256", version.tensors_sha256), ("config sha256", version.config_sha256)]
    if version.masks_sha256:
        rows.append(("masks sha256", version.masks_sha256))
    rows.append(("source", _compact(version.source)))
    if subnetworks:
        rows.append(("masks", "sub-network masks " + ", ".join(f"{lang} ({nnz:,} entries)"
                                                                for lang, nnz in subnetworks.items())))
    rows += [("pushed to", f"{r['repo_id']} {r['tag']} ({r['commit'][:12]})") for r in remotes]
    return rows


def _details(rows) -> Table:
    """Key-value rows: keys never wrap, long values fold inside their column."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("key", no_wrap=True, style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def _show_composition(directory: Path, as_json: bool) -> None:
    from sftstore.composition import read_composition

    record = read_composition(directory)
    if as_json:
        print_json({"directory": str(directory.resolve()), **record})
        return
    base = record["base_model"]
    rows = [("base", base["id"])]
    rows += [(label, base[key]) for label, key in (("arch digest", "arch_digest"), ("weights digest", "weights_digest"))
             if base.get(key)]
    console.print(_details(rows))
    console.print()
    table = new_table("delta", "nnz", "scale", "tensors sha256", "created", right=("nnz", "scale"))
    for entry in record["deltas"]:
        sha = entry.get("tensors_sha256")
        table.add_row(entry.get("ref") or f"{entry['kind']}/{entry['name']}", f"{entry['nnz']:,}", f"{entry['scale']:g}",
                      f"{sha[:16]}…" if sha else "(not recorded)", str(entry.get("created_at", ""))[:10])
    print_table(table, "composed deltas, in the order applied (full sha256 with --json)")


@cli.command()
@click.argument("ref")
@click.argument("alias")
@base_option()
@JSON_OPTION
def tag(ref, alias, base, as_json) -> None:
    """Point ALIAS (e.g. best) at the version REF names."""
    version = open_store().tag(ref, alias, base)
    aliased = str(DeltaRef(version.kind, version.name, alias))
    if as_json:
        print_json({"alias": aliased, **version.to_dict()})
    else:
        click.echo(f"{aliased} -> {version.ref}")


@cli.command()
@click.argument("ref")
@base_option()
@click.option("--yes", "-y", is_flag=True, help="Do not ask before removing every version.")
@JSON_OPTION
def rm(ref, base, yes, as_json) -> None:
    """Remove a version (lang/hau@2), or every version of a delta (lang/hau). Blobs go at the next gc."""
    parsed = DeltaRef.parse(ref)
    if parsed.selector is None and not yes:
        if as_json:
            raise click.UsageError(f"removing every version of {parsed} with --json needs --yes (there is no prompt)")
        count = len(open_store().list(base=base, kind=parsed.kind, name=parsed.name))
        click.confirm(f"Remove all {count} version(s) of {parsed}?", abort=True)
    removed = open_store().remove(parsed, base)
    if as_json:
        print_json([version.to_dict() for version in removed])
        return
    for version in removed:
        click.echo(f"removed {version.ref} (base {short_base(version.base)})")


@cli.command()
@JSON_OPTION
def verify(as_json) -> None:
    """Re-hash every stored file; exit with status 1 if anything is missing or damaged."""
    damage = open_store().verify(progress=not as_json)
    if as_json:
        print_json([d.__dict__ for d in damage])
    elif damage:
        for group_base, group in by_base(damage, "base").items():
            table = new_table("ref", "file", "problem")
            table.columns[-1].no_wrap = False  # a problem is a sentence: it may wrap
            for d in group:
                table.add_row(d.ref, d.file, d.problem)
            print_table(table, f"damaged (base {short_base(group_base)})")
    else:
        click.echo("All stored versions verified.")
    if damage:
        raise SystemExit(1)


@cli.command()
@JSON_OPTION
def gc(as_json) -> None:
    """Delete blobs that no version references and abandoned temp files."""
    report = open_store().gc()
    if as_json:
        print_json(report.__dict__)
    else:
        click.echo(f"removed {report.removed_blobs} blob(s), {human_size(report.freed_bytes)}; "
                   f"{report.removed_temp_files} stale temp file(s)")


@cli.command("import")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@base_option()
@click.option("--lang", help="composable-sft only: the language code of a language SFT.")
@click.option("--task", help="composable-sft only: the task name of a task SFT.")
@click.option("--task-type", type=click.Choice(["token-classification", "sequence-classification"]),
              help="composable-sft only: the task's head type.")
@click.option("--labels", help="composable-sft only: the task's labels, comma-separated, in head order.")
@JSON_OPTION
def import_command(directory, base, lang, task, task_type, labels, as_json) -> None:
    """Validate an artifact directory and add it to the store as the next version.

    A composable-sft directory (pytorch_diff.bin) is converted: name the base model and --lang,
    or --task with --task-type and --labels.
    """
    from sftstore.interop import COMPOSABLE_SFT_FILE

    store = open_store()
    if (directory / COMPOSABLE_SFT_FILE).is_file() and not (directory / "sft_delta.safetensors").is_file():
        version, created = _import_composable_sft(store, directory, base, lang, task, task_type, labels)
    else:
        version, created = store.import_directory(directory)
    if as_json:
        print_json({**version.to_dict(), "created": created})
    else:
        click.echo(f"{'added' if created else 'already stored as'} {version.ref} ({version.base}): "
                   f"{version.nnz:,} non-zeros, {version.density:.3%}")


def _import_composable_sft(store, directory, base, lang, task, task_type, labels):
    from sftstore.interop import from_composable_sft
    from sftstore.modeling import load_model

    if base is None or bool(lang) == bool(task) or (task and not (task_type and labels)):
        raise click.UsageError(
            "a composable-sft directory needs --base and either --lang CODE, or --task NAME --task-type T --labels A,B,..."
        )
    label_list = labels.split(",") if task else []
    model = load_model(base, task_type if task else None, label_list)
    delta = from_composable_sft(directory, model, kind="task" if task else "language", name=task or lang,
                                task_type=task_type if task else None, labels=label_list)
    return store.add(delta, source={"type": "import", "format": "composable-sft", "path": str(directory.resolve())})


@cli.command()
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@base_option()
@click.option("--format", "fmt", type=click.Choice(["sftstore", "composable-sft"]), default="sftstore",
              show_default=True,
              help="sftstore: the stored artifact, byte for byte; composable-sft: a pytorch_diff.bin its SFT class loads.")
@click.option("--format-version", type=click.Choice(["1", "2"]), default=None, show_default="as stored",
              help="sftstore artifact format version to write: 2 (one-byte index gaps, the default for new "
                   "artifacts) or 1 (int32 indices, for readers that predate version 2); converted when it "
                   "differs from the stored one.")
@JSON_OPTION
def export(ref, directory, base, fmt, format_version, as_json) -> None:
    """Write a stored version out as an artifact directory."""
    store = open_store()
    version = store.resolve(ref, base)
    if format_version is not None and fmt != "sftstore":
        raise click.UsageError("--format-version applies to --format sftstore only")
    if fmt == "sftstore":
        out = store.export(version, directory, format_version=int(format_version) if format_version else None)
    else:
        from sftstore.interop import base_model_prefix_for, to_composable_sft

        out = to_composable_sft(store.load(version), directory, base_model_prefix_for(version.base))
    if as_json:
        print_json({**version.to_dict(), "format": fmt, "directory": str(Path(out).resolve()),
                    "files": sorted(p.name for p in Path(out).iterdir() if p.is_file())})
    else:
        click.echo(f"exported {version.ref} to {out}")


@cli.command()
@base_option(required=True)
@click.option("--task", help="Task delta: NAME[@VERSION|@ALIAS], e.g. ner or ner@2.")
@click.option("--lang", help="Language delta: CODE[@VERSION|@ALIAS], e.g. hau.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Save a transformers model directory here.")
@click.option("--device", default=None, help="Device to compose on (default: cuda when available, else cpu).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="Weights dtype (default: as stored).")
@click.option("--force", is_flag=True, help="Compose even if the base model's fingerprint differs from the deltas'.")
@click.option("--text", help="Predict on this text: entities with scores and character spans, or the label and scores.")
@click.option("--no-pull", is_flag=True, help="Do not pull deltas missing from the store through the registry.")
@LABELS_OPTION
@JSON_OPTION
def compose(base, task, lang, out, device, dtype, force, text, no_pull, labels, as_json) -> None:
    """Compose a task and/or language delta onto the base model for zero-shot inference.

    Deltas missing from the store are pulled from the Hub when the registry names them.
    """
    from sftstore.compose import compose as compose_deltas
    from sftstore.hub import resolve_or_pull

    if not task and not lang:
        raise click.UsageError("name at least one of --task and --lang")
    store = open_store()
    refs = [DeltaRef.parse(value, kind) for value, kind in ((task, "task"), (lang, "language")) if value]
    started = time.perf_counter()
    versions = [resolve_or_pull(store, ref, base, pull=not no_pull, labels=labels if ref.kind == "task" else None)
                for ref in refs]
    deltas = [store.load(version) for version in versions]
    loaded = time.perf_counter()
    composed = compose_deltas(base, deltas, device=device, dtype=dtype, force=force)
    composed_at = time.perf_counter()
    result = {
        "base": base,
        "deltas": [v.ref for v in versions],
        "nnz": sum(d.nnz for d in deltas),
        "device": str(composed.device),
        "seconds": {"load_deltas": round(loaded - started, 3), "load_base_and_compose": round(composed_at - loaded, 3)},
    }
    if out is not None:
        from sftstore.composition import provenance_of

        result["out"] = str(composed.save(out, provenance_of(versions)))
    if text is not None:
        prediction = _predict(composed, text)
        result["prediction"] = prediction.to_dict()
    if as_json:
        print_json(result)
        return
    click.echo(f"composed {' + '.join(result['deltas'])} onto {base} on {result['device']} "
               f"({result['nnz']:,} non-zeros; deltas loaded in {result['seconds']['load_deltas']} s, "
               f"base loaded and composed in {result['seconds']['load_base_and_compose']} s)")
    if out is not None:
        click.echo(f"saved to {out}: load it with transformers' from_pretrained or pipeline()")
    if text is not None:
        from .predictions import print_prediction

        print_prediction(prediction)


def _predict(composed, text: str):
    from sftstore.predict import predict, task_type_of

    if composed.tokenizer is None:
        raise click.UsageError("--text needs a base model with a tokenizer")
    return predict(composed.model, composed.tokenizer, [text], task_type_of(composed.deltas))[0]


@cli.command()
@click.argument("ref")
@click.option("--repo", required=True, metavar="ORG/NAME", help="Hub repository (created if needed).")
@base_option()
@click.option("--private", is_flag=True, help="Create the repository private.")
@TOKEN_OPTION
@JSON_OPTION
def push(ref, repo, base, private, token, as_json) -> None:
    """Push a stored version to the Hub: one commit, tagged v<N>; pushing it again does nothing."""
    from sftstore.hub import push_to_hub

    result = push_to_hub(open_store(), ref, repo, base=base, private=private, token=token)
    if as_json:
        print_json(result.__dict__)
    elif result.created:
        click.echo(f"pushed {ref} to {repo}: commit {result.commit[:12]}, tag {result.tag}")
    else:
        click.echo(f"{repo} already has {ref} as tag {result.tag} (commit {result.commit[:12]}); nothing pushed")


@cli.command()
@click.argument("repo", metavar="ORG/NAME[@REVISION]")
@base_option()
@click.option("--offline", is_flag=True, help="Use only the local Hub cache (as HF_HUB_OFFLINE=1 does).")
@LABELS_OPTION
@TOKEN_OPTION
@JSON_OPTION
def pull(repo, base, offline, labels, token, as_json) -> None:
    """Pull a delta from the Hub (a tag, branch or commit) into the store, validating it fully."""
    from sftstore.hub import pull_from_hub

    repo_id, _, revision = repo.partition("@")
    result = pull_from_hub(open_store(), repo_id, revision or None, base=base, labels=labels, offline=offline or None,
                           token=token)
    if as_json:
        print_json({**result.version.to_dict(), "created": result.created, "commit": result.commit})
    else:
        state = "added" if result.created else "already stored as"
        click.echo(f"{state} {result.version.ref} ({result.version.base}) from {repo_id} at {result.commit[:12]}")


@cli.command()
@base_option()
@click.option("--any-base", is_flag=True, help="Search every base model, ignoring $SFTSTORE_BASE and the config file.")
@click.option("--lang", help="Language code, e.g. hau (ISO 639-1 and 639-3 both match: ha, hau).")
@click.option("--task", help="Task name or alias, e.g. ner.")
@JSON_OPTION
def search(base, any_base, lang, task, as_json) -> None:
    """List published deltas from the registry (what compose can pull), for the base model in use."""
    from sftstore.registry import load_registry

    base = None if any_base else base
    entries = load_registry().search(base=base, lang=lang, task=task)
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    if not entries:
        where = f" for base {short_base(base)} (--any-base searches every base)" if base else ""
        click.echo(f"No published delta matches{where}.")
        return
    for group_base, group in by_base(entries, "base_model").items():
        verified = sum(e.verified for e in group)
        formats = ", ".join(sorted({e.format for e in group}))
        table = new_table("delta", "repo", "composes")
        for e in group:
            name = f"{kind_prefix(e.kind)}/{e.name}"
            repo = e.repo_id if e.revision == "main" else f"{e.repo_id}@{e.revision}"
            table.add_row(f"{name} ({','.join(e.aliases)})" if e.aliases else name, repo, "no" if e.unsupported else "yes")
        print_table(table, f"base {short_base(group_base)} ({formats}; {verified} of {len(group)} verified)")
    reasons: dict[str, list[str]] = {}
    for e in entries:
        if e.unsupported:
            reasons.setdefault(e.unsupported, []).append(e.name)
    for reason, names in reasons.items():
        console.print(f"{', '.join(dict.fromkeys(names))}: {reason}")


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Put the demo's store (DIR/store) and composed model here. Default: the store in $SFTSTORE_HOME, "
                   "the composed model in $SFTSTORE_HOME/demo.")
@click.option("--quick", is_flag=True, help="A few steps on a tiny random model: checks the mechanics in seconds.")
@JSON_OPTION
def demo(workdir, quick, as_json) -> None:
    """Offline demo: train lang/en, lang/hau and task/ner on shipped data; score Hausa NER F1; keep the results.

    Ends by printing the commands that use what it made (a second run adds nothing: same bytes, same versions).
    """
    from sftstore.demo import run_demo

    result = run_demo(workdir, lambda line: click.echo(line, err=as_json), quick=quick)
    if as_json:
        print_json(result)


cli.add_command(train_lang)
cli.add_command(train_task)
cli.add_command(eval_command)
cli.add_command(results_command)
cli.add_command(overlap_command)
cli.add_command(merge_command)
cli.add_command(serve_command)

if __name__ == "__main__":
    cli()
