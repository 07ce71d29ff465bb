"""`sft train-lang`, `sft train-task`, `sft eval`: train deltas into the store, and score compositions."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from sftstore.naming import DeltaRef

from .common import JSON_OPTION, base_option, console, open_store, print_json

if TYPE_CHECKING:
    from sftstore.delta import SparseDelta

# The paper's defaults (section 4): K, schedule and batch per kind of run.
LANGUAGE_DEFAULTS = {"num_params": "7.6M", "epochs": 100.0, "max_steps": 100_000, "eval_steps": 1000, "l1": 0.1,
                     "batch_size": 8, "learning_rate": 5e-5}
TASK_DEFAULTS = {
    "ner": {"epochs": 10.0, "phase1_epochs": 3.0, "batch_size": 8, "learning_rate": 5e-5, "eval_steps": 250},
    "pos": {"epochs": 10.0, "phase1_epochs": 3.0, "batch_size": 8, "learning_rate": 5e-5, "eval_steps": 250},
    "nli": {"epochs": 5.0, "phase1_epochs": None, "batch_size": 32, "learning_rate": 2e-5, "eval_steps": 625},
}


def sparse_options(command):
    """Options every training command shares (method, K, schedule, where runs checkpoint)."""
    options = [
        click.option("--method", type=click.Choice(["lt-sft", "rand-sft", "bitfit", "full", "s4"]), default="lt-sft",
                     show_default=True, help="s4 (train-task only): S4-Tuning of a trained task delta, see --from."),
        click.option("--num-params", help="K as a count (7.6M, 500k). Default: the paper's for this kind of run."),
        click.option("--density", type=float, help="K as a fraction of the base model's parameters, instead of --num-params."),
        click.option("--rounds", type=int, default=1, show_default=True, help="Iterative LT-SFT: rounds of K/n."),
        click.option("--l1", "l1_lambda", type=float, help="L1 pull towards theta0 (lambda). Default: 0.1 for languages, 0 for tasks."),
        click.option("--lr", "learning_rate", type=float),
        click.option("--batch-size", type=int),
        click.option("--max-length", type=int, default=256, show_default=True),
        click.option("--epochs", type=float),
        click.option("--max-steps", type=int, help="Steps per phase (overrides --epochs)."),
        click.option("--phase1-epochs", type=float),
        click.option("--phase1-max-steps", type=int),
        click.option("--eval-steps", type=int, help="Evaluate (and checkpoint) every N steps; the best checkpoint is kept."),
        click.option("--seed", type=int, default=42, show_default=True),
        click.option("--lr-policy", type=click.Choice(["slow-fast"]),
                     help="Fine-tuning Slow and Fast: learning-rate multipliers by layer group and phase."),
        click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Checkpoints of the run (default: $SFTSTORE_HOME/runs/KIND-NAME)."),
        click.option("--resume", is_flag=True, help="Continue the run in --output-dir from its last checkpoint."),
        click.option("--cpu", "use_cpu", is_flag=True, help="Train on the CPU even when a GPU is there."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_arguments(defaults: dict, cli_values: dict):
    """`SparseFineTuningArguments` (None for s4, which has its own) and `TrainingOptions` from the
    command line over `defaults`."""
    from sftstore.train.lt_sft import SparseFineTuningArguments
    from sftstore.train.options import TrainingOptions

    def pick(name):
        value = cli_values.get(name)
        return value if value is not None else defaults.get(name)

    num_params = None if cli_values["density"] is not None else pick("num_params")
    sft = None if cli_values["method"] == "s4" else SparseFineTuningArguments(
        method=cli_values["method"], num_params=num_params, density=cli_values["density"],
        l1_lambda=pick("l1") if cli_values["l1_lambda"] is None else cli_values["l1_lambda"],
        rounds=cli_values["rounds"], seed=cli_values["seed"],
    )
    options = TrainingOptions(
        learning_rate=pick("learning_rate"), batch_size=pick("batch_size"), max_length=cli_values["max_length"],
        epochs=pick("epochs"), max_steps=pick("max_steps") or -1, phase1_epochs=pick("phase1_epochs"),
        phase1_max_steps=pick("phase1_max_steps"), eval_steps=pick("eval_steps"), seed=cli_values["seed"],
        use_cpu=cli_values["use_cpu"], progress=not cli_values["no_progress"], lr_policy=cli_values["lr_policy"],
    )
    return sft, options


def _output_dir(given: Path | None, store, kind: str, name: str) -> Path:
    return given if given is not None else store.root / "runs" / f"{kind}-{name}"


def _store_result(store, delta: SparseDelta | list[SparseDelta], method: str, as_json: bool) -> None:
    """Store and report the trained delta(s), once: under torchrun only the main process does.

    With --json: one object for one delta, a list of them for several."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    reports = []
    for one in delta if isinstance(delta, list) else [delta]:
        version, created = store.add(one, source={"type": "train", "method": method})
        reports.append({**version.to_dict(), "created": created, "metrics": one.config.metrics})
        if not as_json:
            click.echo(f"stored {version.ref} ({version.base}): {version.nnz:,} non-zeros ({version.density:.3%}); "
                       f"{one.config.metrics}")
    if as_json:
        print_json(reports if isinstance(delta, list) else reports[0])


@click.command("train-lang")
@base_option(required=True)
@click.option("--lang", "language", required=True, help="Language code, e.g. hau.")
@click.option("--text", "texts", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Raw text, one sentence per line (repeatable).")
@click.option("--held-out", type=float, default=0.05, show_default=True, help="Fraction of lines held out to pick the checkpoint.")
@sparse_options
@JSON_OPTION
def train_lang(base, language, texts, held_out, as_json, output_dir, resume, **values) -> None:
    """Train a language delta by masked language modelling and store it as lang/LANG."""
    from sftstore.train.language import train_language_delta

    if values["method"] == "s4":
        raise click.UsageError("--method s4 adapts a task delta: use sft train-task")

    store = open_store()
    sft, options = build_arguments(LANGUAGE_DEFAULTS, values)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's logs; stdout is for the result
        delta = train_language_delta(base, language, texts, _output_dir(output_dir, store, "lang", language), sft=sft,
                                     options=options, held_out_fraction=held_out, resume=resume)
    _store_result(store, delta, sft.method, as_json)


@click.command("train-task")
@base_option(required=True)
@click.option("--task", required=True, type=click.Choice(["ner", "pos", "nli"]))
@click.option("--train", "train_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Training data (repeatable).")
@click.option("--dev", "dev_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Dev data: picks the checkpoint.")
@click.option("--from", "adapt", help="s4: the source-trained task delta to adapt, e.g. task/ner.")
@click.option("--langs", help="s4: target languages, comma-separated (hau,swa,yor).")
@click.option("--train-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="s4: a folder with LANG/train.txt for each target language.")
@click.option("--shots", type=int, default=16, show_default=True, help="s4: examples per language.")
@click.option("--mask", "mask_kind", type=click.Choice(["importance", "random", "full", "fc", "fc-pooler"]),
              default="importance", show_default=True,
              help="s4: Taylor-importance masks; the random-mask ablation; or the baselines that train every "
                   "parameter (full), the classifier only (fc) or the classifier and the pooler (fc-pooler).")
@click.option("--pruning", is_flag=True,
              help="s4: the Pruning ablation, forward through each language's sub-network only; stores one "
                   "delta per language, task/NAME-LANG.")
@click.option("--source-lang", help="The source language: its delta (lang/CODE in the store) is applied during training. "
              "Several (en,swa): multi-source, with one --train and one --dev per language, in the same order.")
@click.option("--name", help="Store the delta as task/NAME (default: the task).")
@sparse_options
@JSON_OPTION
def train_task(base, task, train_files, dev_files, source_lang, name, adapt, langs, train_dir, shots, mask_kind, pruning,
               as_json, output_dir, resume, **values) -> None:
    """Train a task delta on labelled source-language data and store it as task/TASK.

    With --method s4, adapt a trained task delta (--from) to several target languages at once from
    a few examples each (--langs, --train-dir, --shots).
    """
    from sftstore.train.task import TaskData, train_task_delta

    store = open_store()
    sft, options = build_arguments({"num_params": "14.2M", "l1": 0.0, "max_steps": None, **TASK_DEFAULTS[task]}, values)
    if pruning and values["method"] != "s4":
        raise click.UsageError("--pruning is an S4-Tuning ablation: use it with --method s4")
    if values["method"] == "s4":
        _train_s4(store, base, task, adapt, langs, train_dir, shots, mask_kind, pruning, dev_files, name,
                  values["density"], options, output_dir, as_json)
        return
    if not train_files or not dev_files:
        raise click.UsageError("train-task needs --train and --dev")
    versions = [store.resolve(DeltaRef.parse(code, "language"), base) for code in (source_lang or "").split(",") if code]
    sources = [store.load(version) for version in versions]
    lineage = {"source_languages": [v.name for v in versions],
               "source_deltas": [{"ref": v.ref, "tensors_sha256": v.tensors_sha256} for v in versions]} if versions else {}
    if len(versions) > 1:
        if not len(train_files) == len(dev_files) == len(versions):
            raise click.UsageError("multi-source training takes one --train and one --dev per --source-lang language")
        train, dev = [TaskData.read(task, [f]) for f in train_files], [TaskData.read(task, [f]) for f in dev_files]
    else:
        train, dev = TaskData.read(task, train_files), TaskData.read(task, dev_files)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's logs; stdout is for the result
        delta = train_task_delta(
            base, task, train, dev,
            _output_dir(output_dir, store, "task", name or task), sft=sft, options=options,
            source_deltas=sources, lineage=lineage, name=name, resume=resume,
        )
    _store_result(store, delta, sft.method, as_json)


def _train_s4(store, base, task, adapt, langs, train_dir, shots, mask_kind, pruning, dev_files, name, density,
              options, output_dir, as_json) -> None:
    from sftstore.modeling import load_model
    from sftstore.train.s4 import pruned_delta, train_s4
    from sftstore.train.task import TaskData

    if not (adapt and langs and train_dir):
        raise click.UsageError("--method s4 needs --from TASK_DELTA, --langs and --train-dir")
    if mask_kind in ("importance", "random") and not density:
        raise click.UsageError(f"--mask {mask_kind} needs --density (the sub-network ratio p)")
    if pruning and dev_files:
        raise click.UsageError("--pruning trains one network per language: a --dev set cannot pick the checkpoint")
    source = store.resolve(DeltaRef.parse(adapt, "task"), base)
    task_delta = store.load(source)
    languages = {lang: TaskData.read(task, [train_dir / lang / "train.txt"]).head(shots) for lang in langs.split(",")}
    dev = TaskData.read(task, list(dev_files)) if dev_files else None
    run_dir = _output_dir(output_dir, store, "task", f"{name or task}-s4")
    with contextlib.redirect_stdout(sys.stderr):
        delta = train_s4(base, languages, dev, task_delta, density, options, run_dir, mask=mask_kind, pruning=pruning,
                         name=name)
    delta.config.lineage["source_ref"] = source.ref
    if not pruning:
        _store_result(store, delta, "s4", as_json)
        return
    base_model = load_model(base, task_delta.config.task_type, task_delta.config.labels)
    _store_result(store, [pruned_delta(delta, base_model, lang) for lang in languages], "s4", as_json)


@click.command("eval")
@base_option(required=True)
@click.option("--task", required=True, help="Task delta: NAME[@VERSION|@ALIAS].")
@click.option("--lang", "languages", help="Language deltas to compose, comma-separated (none: task only).")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Labelled test data.")
@click.option("--kind", "task_kind", type=click.Choice(["ner", "pos", "nli"]),
              help="How to read and score --data (default: the task delta's name if it is ner/pos/nli).")
@click.option("--device", default=None)
@click.option("--max-length", type=int, default=256, show_default=True)
@JSON_OPTION
def eval_command(base, task, languages, data, task_kind, device, max_length, as_json) -> None:
    """Compose task (+ each language), predict --data, score it, and record the result in the store."""
    from sftstore.compose import compose
    from sftstore.train.data import sha256_of_files
    from sftstore.train.task import TaskData, evaluate_task

    store = open_store()
    task_version = store.resolve(DeltaRef.parse(task, "task"), base)
    task_delta = store.load(task_version)
    kind = task_kind or task_version.name
    if kind not in ("ner", "pos", "nli"):
        raise click.UsageError(f"say how to score --data with --kind (the task delta is named {task_version.name!r})")
    examples = TaskData.read(kind, [data])
    digest = sha256_of_files(data)
    composed = compose(base, [task_delta], device=device)
    rows = []
    for language in [None, *(languages.split(",") if languages else [])]:
        versions = [task_version]
        if language:
            version = store.resolve(DeltaRef.parse(language, "language"), base)
            composed.swap(language=store.load(version))
            versions.append(version)
        metrics = evaluate_task(composed.model, composed.tokenizer, examples, task_delta.config.labels, max_length)
        store.record_result(versions, str(data), digest, metrics)
        rows.append({"deltas": [v.ref for v in versions], **metrics})
    if as_json:
        print_json({"data": str(data), "data_sha256": digest, "results": rows})
        return
    table = Table(title=f"{data.name} (sha256 {digest[:12]})")
    table.add_column("composition")
    metric_names = [k for k in rows[0] if k != "deltas"]
    for metric in metric_names:
        table.add_column(metric, justify="right")
    for row in rows:
        table.add_row(" + ".join(row["deltas"]), *(f"{row[m]:.4f}" for m in metric_names))
    console.print(table)
