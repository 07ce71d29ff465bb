"""The `sft` command line: parse, call the library, print a table (or JSON with `--json`)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
from rich.table import Table

from sftstore import __version__
from sftstore.naming import DeltaRef
from sftstore.store import StoredVersion

from .common import (
    JSON_OPTION, LABELS_OPTION, TOKEN_OPTION, SftGroup, base_option, console, human_size, open_store, print_json,
)
from .merge import merge_command
from .overlap import overlap_command
from .train import eval_command, train_lang, train_task


def _versions_table(versions: list[StoredVersion], title: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("ref", no_wrap=True)
    table.add_column("aliases")
    table.add_column("base", overflow="fold")
    for column in ("nnz", "density", "size"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("source")
    for v in versions:
        table.add_row(
            v.ref, ",".join(v.aliases), v.base, f"{v.nnz:,}", f"{v.density:.3%}", human_size(v.size),
            v.created_at[:16].replace("T", " "), v.source.get("type", ""),
        )
    return table


@click.group(cls=SftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sft")
def cli() -> None:
    """Composable sparse fine-tuning: store, version and compose sparse deltas of multilingual models.

    The store lives in $SFTSTORE_HOME (default ~/.cache/sftstore). References look like
    lang/hau, task/ner@2 or lang/hau@best.
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
        console.print(_versions_table(versions))


@cli.command()
@click.argument("ref")
@base_option()
@JSON_OPTION
def show(ref, base, as_json) -> None:
    """Show one version: manifest, provenance and non-zeros per layer."""
    store = open_store()
    version = store.resolve(ref, base)
    manifest = store.manifest(version)
    delta = store.load(version)
    layers = delta.layer_summary()
    subnetworks = {language: delta.subnetworks.nnz(language) for language in delta.subnetworks or []}
    if as_json:
        print_json({**version.to_dict(), "manifest": manifest, "remotes": store.remotes(version),
                    "layers": [{"layer": r.name, "numel": r.numel, "nnz": r.nnz, "density": r.density} for r in layers],
                    "subnetworks": subnetworks})
        return
    console.print(_versions_table([version], title=f"{version.ref} ({version.base})"))
    details = Table(show_header=False)
    for key in ("kind", "language", "task", "task_type", "labels", "method", "num_parameters", "values_dtype",
                "training", "metrics", "lineage", "tensors_sha256"):
        if manifest.get(key) not in (None, [], {}):
            details.add_row(key, json.dumps(manifest[key]) if isinstance(manifest[key], (dict, list)) else str(manifest[key]))
    details.add_row("base_model", json.dumps(manifest["base_model"]))
    details.add_row("manifest_sha256", version.config_sha256)
    details.add_row("source", json.dumps(version.source))
    if subnetworks:
        details.add_row("sub-network masks", ", ".join(f"{lang} ({nnz:,} entries)" for lang, nnz in subnetworks.items()))
    for remote in store.remotes(version):
        details.add_row("pushed to", f"{remote['repo_id']} {remote['tag']} ({remote['commit'][:12]})")
    console.print(details)
    table = Table(title="non-zeros per layer (touched parameters)")
    for column in ("layer", "parameters", "nnz", "density"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in layers:
        table.add_row(row.name, f"{row.numel:,}", f"{row.nnz:,}", f"{row.density:.3%}")
    console.print(table)


@cli.command()
@click.argument("ref")
@click.argument("alias")
@base_option()
def tag(ref, alias, base) -> None:
    """Point ALIAS (e.g. best) at the version REF names."""
    version = open_store().tag(ref, alias, base)
    click.echo(f"{DeltaRef(version.kind, version.name, alias)} -> {version.ref}")


@cli.command()
@click.argument("ref")
@base_option()
@click.option("--yes", "-y", is_flag=True, help="Do not ask before removing every version.")
def rm(ref, base, yes) -> None:
    """Remove a version (lang/hau@2), or every version of a delta (lang/hau). Blobs go at the next gc."""
    parsed = DeltaRef.parse(ref)
    if parsed.selector is None and not yes:
        count = len(open_store().list(base=base, kind=parsed.kind, name=parsed.name))
        click.confirm(f"Remove all {count} version(s) of {parsed}?", abort=True)
    for version in open_store().remove(parsed, base):
        click.echo(f"removed {version.ref} ({version.base})")


@cli.command()
@JSON_OPTION
def verify(as_json) -> None:
    """Re-hash every stored file; exit with status 1 if anything is missing or damaged."""
    damage = open_store().verify(progress=not as_json)
    if as_json:
        print_json([d.__dict__ for d in damage])
    elif damage:
        table = Table(title="damaged")
        for column in ("ref", "base", "file", "problem"):
            table.add_column(column)
        for d in damage:
            table.add_row(d.ref, d.base, d.file, d.problem)
        console.print(table)
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
              help="sftstore: the stored artifact, byte for byte; composable-sft: a pytorch_diff.bin its SFT class loads.")
def export(ref, directory, base, fmt) -> None:
    """Write a stored version out as an artifact directory."""
    store = open_store()
    if fmt == "sftstore":
        out = store.export(ref, directory, base)
    else:
        from sftstore.interop import base_model_prefix_for, to_composable_sft

        version = store.resolve(ref, base)
        out = to_composable_sft(store.load(version), directory, base_model_prefix_for(version.base))
    click.echo(f"exported {ref} to {out}")


@cli.command()
@base_option(required=True)
@click.option("--task", help="Task delta: NAME[@VERSION|@ALIAS], e.g. ner or ner@2.")
@click.option("--lang", help="Language delta: CODE[@VERSION|@ALIAS], e.g. hau.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Save a transformers model directory here.")
@click.option("--device", default=None, help="Device to compose on (default: cuda when available, else cpu).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="Weights dtype (default: as stored).")
@click.option("--force", is_flag=True, help="Compose even if the base model's fingerprint differs from the deltas'.")
@click.option("--text", help="Run the composed model's pipeline on this text and print the result.")
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
        result["out"] = str(composed.save(out))
    if text is not None:
        result["prediction"] = _predict(composed, text)
    if as_json:
        print_json(result)
        return
    click.echo(f"composed {' + '.join(result['deltas'])} onto {base} on {result['device']} "
               f"({result['nnz']:,} non-zeros; deltas loaded in {result['seconds']['load_deltas']} s, "
               f"base loaded and composed in {result['seconds']['load_base_and_compose']} s)")
    if out is not None:
        click.echo(f"saved to {out}: load it with transformers' from_pretrained or pipeline()")
    if text is not None:
        click.echo(json.dumps(result["prediction"], ensure_ascii=False, default=str))


def _predict(composed, text: str):
    from transformers import pipeline

    task_types = {d.config.task_type for d in composed.deltas if d.kind == "task"}
    pipeline_task = {"token-classification": "token-classification", "sequence-classification": "text-classification"}
    task = next((pipeline_task[t] for t in task_types if t in pipeline_task), None)
    if task is None or composed.tokenizer is None:
        raise click.UsageError("--text needs a token- or sequence-classification task delta and a base with a tokenizer")
    runner = pipeline(task, model=composed.model, tokenizer=composed.tokenizer, device=composed.device)
    return runner(text)


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
@click.option("--base", envvar="SFTSTORE_BASE", default=None,
              help="Only deltas for this base model (Hub id, legacy or current). Default: $SFTSTORE_BASE.")
@click.option("--lang", help="Language code, e.g. hau (ISO 639-1 and 639-3 both match: ha, hau).")
@click.option("--task", help="Task name or alias, e.g. ner.")
@JSON_OPTION
def search(base, lang, task, as_json) -> None:
    """List published deltas from the registry (what compose can pull)."""
    from sftstore.registry import load_registry

    entries = load_registry().search(base=base, lang=lang, task=task)
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    if not entries:
        click.echo("No published delta matches.")
        return
    table = Table()
    for column in ("base", "kind", "name", "aliases", "repo", "revision", "format", "verified", "composes"):
        table.add_column(column, no_wrap=column in ("name", "repo"))
    for e in entries:
        composes = f"no: {e.unsupported.partition(':')[0]}" if e.unsupported else "yes"
        table.add_row(e.base_model, e.kind, e.name, ",".join(e.aliases), e.repo_id, e.revision, e.format,
                      "yes" if e.verified else "no", composes)
    console.print(table)
    for e in entries:
        if e.unsupported:
            click.echo(f"{e.name} ({e.base_model}): {e.unsupported}")


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's store, runs and composed model here (default: a temp directory).")
@click.option("--quick", is_flag=True, help="A few steps on a tiny random model: checks the mechanics in seconds.")
def demo(workdir, quick) -> None:
    """Offline demo: train lang/en, lang/hau and task/ner on shipped data; score Hausa NER F1."""
    from sftstore.demo import run_demo

    if workdir is not None:
        run_demo(workdir, click.echo, quick=quick)
        return
    with tempfile.TemporaryDirectory(prefix="sft-demo-") as tmp:
        run_demo(tmp, click.echo, quick=quick)


cli.add_command(train_lang)
cli.add_command(train_task)
cli.add_command(eval_command)
cli.add_command(overlap_command)
cli.add_command(merge_command)

if __name__ == "__main__":
    cli()
