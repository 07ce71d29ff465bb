"""`sft train-lang`, `sft train-task`, `sft eval`, `sft results`: train deltas into the store, score
compositions on many languages at once, and show the recorded scores."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sftstore.naming import DeltaRef

from .common import JSON_OPTION, base_option, new_table, open_store, print_json, print_table, short_base

if TYPE_CHECKING:
    from sftstore.delta import SparseDelta

# The paper's defaults (section 4). K as a density of the base: its XLM-R-base setting, 7.6M (language) and
# 14.2M (task) of 277M parameters, so the same share of any base.
LANGUAGE_DEFAULTS = {"density": 0.028, "epochs": 100.0, "max_steps": 100_000, "eval_steps": 1000, "l1": 0.1,
                     "batch_size": 8, "learning_rate": 5e-5}
TASK_DEFAULTS = {
    "ner": {"epochs": 10.0, "phase1_epochs": 3.0, "batch_size": 8, "learning_rate": 5e-5, "eval_steps": 250},
    "pos": {"epochs": 10.0, "phase1_epochs": 3.0, "batch_size": 8, "learning_rate": 5e-5, "eval_steps": 250},
    "nli": {"epochs": 5.0, "phase1_epochs": None, "batch_size": 32, "learning_rate": 2e-5, "eval_steps": 625},
}
TASK_DENSITY = 0.051
SPARSE_METHODS = ["lt-sft", "rand-sft", "bitfit", "full"]
PROGRESS_OPTION = click.option("--progress/--no-progress", default=None, show_default="bars on a terminal only",
                               help="Progress bars on stderr (log lines are written either way).")
# Where `--data DIR` finds a language's file, in this order (SPLIT is --split).
DATA_LAYOUTS = ("{lang}/{split}.txt", "{lang}/{split}.conllu", "{lang}/{split}.tsv",
                "{lang}.txt", "{lang}.conllu", "{lang}.tsv")


def _task_default(name: str) -> str:
    """A per-task default as --help shows it, e.g. '10.0; nli: 5.0'."""
    values = {task: defaults[name] for task, defaults in TASK_DEFAULTS.items()}
    common = values["ner"]
    return "; ".join([str(common), *(f"{task}: {value if value is not None else 'as --epochs'}"
                                      for task, value in values.items() if value != common)])


def _given(name: str) -> bool:
    """Whether the command line (or the environment) set option `name`, rather than its default."""
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def sparse_options(kind: str):
    """Options every training command shares (method, K, schedule, progress, where runs checkpoint),
    with the defaults of `kind` ('language' or 'task') in --help."""
    language = kind == "language"
    methods = SPARSE_METHODS if language else [*SPARSE_METHODS, "s4"]

    def default(key: str) -> dict:
        """A language run's default as the option's own; a task run's, which depends on --task, as text."""
        return {"default": LANGUAGE_DEFAULTS[key], "show_default": True} if language else \
            {"show_default": _task_default(key)}

    paper_k = "7.6M of 277M" if language else "14.2M of 277M; s4: the sub-network ratio p, required"
    method_help = ("lt-sft: LT-SFT (full fine-tuning, top-K, sparse fine-tuning); rand-sft: K random entries; "
                   "bitfit: every bias; full: dense fine-tuning.")
    if not language:
        method_help += " s4: S4-Tuning of a trained task delta, see --from."
    options = [
        click.option("--method", type=click.Choice(methods), default="lt-sft", show_default=True, help=method_help),
        click.option("--density", type=float, default=LANGUAGE_DEFAULTS["density"] if language else TASK_DENSITY,
                     show_default=True,
                     help=f"K as a fraction of the base model's trainable parameters (the paper's K: {paper_k})."),
        click.option("--num-params", metavar="K", show_default="--density",
                     help="K as a count (7.6M, 500k, 123456) instead of --density."),
        click.option("--rounds", type=int, default=1, show_default=True, help="Iterative LT-SFT: n rounds of K/n."),
        click.option("--l1", "l1_lambda", type=float, default=LANGUAGE_DEFAULTS["l1"] if language else 0.0,
                     show_default=True, help="L1 pull towards theta0 (lambda)."),
        click.option("--lr", "learning_rate", type=float, **default("learning_rate"),
                     help="Peak learning rate (AdamW, linear decay)."),
        click.option("--batch-size", type=int, **default("batch_size"), help="Training batch size."),
        click.option("--max-length", type=int, default=256, show_default=True,
                     help="Tokens per sequence (clamped, with a notice, to what the base's position embeddings take)."),
        click.option("--epochs", type=float, **default("epochs"), help="Epochs per phase."),
        click.option("--max-steps", type=int, **(default("max_steps") if language else {"show_default": "none"}),
                     help="Steps per phase (overrides --epochs)."),
        click.option("--phase1-epochs", type=float, show_default="as --epochs" if language else _task_default("phase1_epochs"),
                     help="LT-SFT phase 1 (full fine-tuning) epochs."),
        click.option("--phase1-max-steps", type=int, show_default="as --max-steps", help="LT-SFT phase 1 steps."),
        click.option("--eval-steps", type=int, **default("eval_steps"),
                     help="Evaluate (and checkpoint) every N steps; the best checkpoint is kept."),
        click.option("--eval-batch-size", type=int, show_default="max(--batch-size, 32)",
                     help="Batch size of the " + ("held-out" if language else "dev") + " evaluations."),
        click.option("--dev-max-samples", type=int, show_default="all",
                     help="Evaluate on the first N " + ("held-out lines" if language else "dev examples") + " only."),
        click.option("--seed", type=int, default=42, show_default=True, help="Seed of data order, masks and heads."),
        click.option("--lr-policy", type=click.Choice(["slow-fast"]), show_default="none",
                     help="Fine-tuning Slow and Fast: learning-rate multipliers by layer group and phase."),
        click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
                     show_default="$SFTSTORE_HOME/runs/KIND-NAME", help="Checkpoints of the run."),
        click.option("--resume", is_flag=True, help="Continue the run in --output-dir from its last checkpoint."),
        click.option("--cpu", "use_cpu", is_flag=True, help="Train on the CPU even when a GPU is there."),
        PROGRESS_OPTION,
        click.option("--log-every", type=click.IntRange(min=0), default=50, show_default=True,
                     help="A log line (step, loss, lr, elapsed, ETA) on stderr every N steps; 0: none."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def build_arguments(defaults: dict, cli_values: dict):
    """`SparseFineTuningArguments` (None for s4, which has its own) and `TrainingOptions` from the
    command line over `defaults`."""
    from sftstore.train.lt_sft import SparseFineTuningArguments
    from sftstore.train.options import TrainingOptions

    def pick(name):
        value = cli_values.get(name)
        return value if value is not None else defaults.get(name)

    if _given("density") and cli_values["num_params"] is not None:
        raise click.UsageError("give K either as --density or as --num-params, not both")
    num_params = cli_values["num_params"]
    density = None if num_params is not None else cli_values["density"]  # --density and --l1 always have a value
    sft = None if cli_values["method"] == "s4" else SparseFineTuningArguments(
        method=cli_values["method"], num_params=num_params, density=density,
        l1_lambda=cli_values["l1_lambda"],
        rounds=cli_values["rounds"], seed=cli_values["seed"],
    )
    options = TrainingOptions(
        learning_rate=pick("learning_rate"), batch_size=pick("batch_size"), max_length=cli_values["max_length"],
        epochs=pick("epochs"), max_steps=pick("max_steps") or -1, phase1_epochs=pick("phase1_epochs"),
        phase1_max_steps=pick("phase1_max_steps"), eval_steps=pick("eval_steps"), seed=cli_values["seed"],
        use_cpu=cli_values["use_cpu"], progress=cli_values["progress"], log_every=cli_values["log_every"],
        eval_batch_size=cli_values["eval_batch_size"], lr_policy=cli_values["lr_policy"],
    )
    return sft, options


def _output_dir(given: Path | None, store, kind: str, name: str) -> Path:
    return given if given is not None else store.root / "runs" / f"{kind}-{name}"


def _store_result(store, delta: SparseDelta | list[SparseDelta], method: str, as_json: bool) -> None:
    """Store and report the trained delta(s), once: under torchrun only the main process does. Warnings
    about a run that learnt nothing go to stderr.

    With --json: one object for one delta, a list of them for several."""
    from sftstore.train.progress import run_warnings

    if int(os.environ.get("RANK", "0")) != 0:
        return
    reports = []
    for one in delta if isinstance(delta, list) else [delta]:
        version, created = store.add(one, source={"type": "train", "method": method})
        warnings = run_warnings(one)
        requested = one.config.requested_k
        reports.append({**version.to_dict(), "created": created, "requested_k": requested,
                        "metrics": one.config.metrics, "warnings": warnings})
        if not as_json:
            asked = f"K {requested:,} requested, " if requested is not None else ""
            metrics = ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                                for name, value in one.config.metrics.items())
            click.echo(f"stored {version.ref} ({short_base(version.base)}): {asked}{version.nnz:,} non-zeros stored "
                       f"({version.density:.3%} of the base)" + (f"; {metrics}" if metrics else ""))
        for warning in warnings:
            click.echo(warning, err=True)
    if as_json:
        print_json(reports if isinstance(delta, list) else reports[0])


@click.command("train-lang")
@base_option(required=True)
@click.option("--lang", "language", required=True, help="Language code, e.g. hau.")
@click.option("--text", "texts", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Raw text, one sentence per line (repeatable).")
@click.option("--held-out", type=float, default=0.05, show_default=True, help="Fraction of lines held out to pick the checkpoint.")
@sparse_options("language")
@JSON_OPTION
def train_lang(base, language, texts, held_out, as_json, output_dir, resume, dev_max_samples, **values) -> None:
    """Train a language delta by masked language modelling and store it as lang/LANG."""
    from sftstore.train.language import train_language_delta

    store = open_store()
    sft, options = build_arguments(LANGUAGE_DEFAULTS, values)
    with contextlib.redirect_stdout(sys.stderr):  # anything the libraries print; stdout is for the result
        delta = train_language_delta(base, language, texts, _output_dir(output_dir, store, "lang", language), sft=sft,
                                     options=options, held_out_fraction=held_out, held_out_max_lines=dev_max_samples,
                                     resume=resume)
    _store_result(store, delta, sft.method, as_json)


@click.command("train-task")
@base_option(required=True)
@click.option("--task", required=True, type=click.Choice(["ner", "pos", "nli"]),
              help="ner: CoNLL files; pos: CoNLL-U (UPOS); nli: premise/hypothesis/label TSV.")
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
@click.option("--source-lang", show_default="none",
              help="The source language: its delta (lang/CODE in the store) is applied during training. "
              "Several (en,swa): multi-source, with one --train and one --dev per language, in the same order.")
@click.option("--name", show_default="the task", help="Store the delta as task/NAME.")
@sparse_options("task")
@JSON_OPTION
def train_task(base, task, train_files, dev_files, source_lang, name, adapt, langs, train_dir, shots, mask_kind, pruning,
               as_json, output_dir, resume, dev_max_samples, **values) -> None:
    """Train a task delta on labelled source-language data and store it as task/TASK.

    With --method s4, adapt a trained task delta (--from) to several target languages at once from
    a few examples each (--langs, --train-dir, --shots).
    """
    from sftstore.train.task import TaskData, train_task_delta

    store = open_store()
    sft, options = build_arguments({"max_steps": None, **TASK_DEFAULTS[task]}, values)
    if pruning and values["method"] != "s4":
        raise click.UsageError("--pruning is an S4-Tuning ablation: use it with --method s4")
    if values["method"] == "s4":
        _train_s4(store, base, task, adapt, langs, train_dir, shots, mask_kind, pruning, dev_files, dev_max_samples,
                  name, values["density"] if _given("density") else None, options, output_dir, as_json)
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
        train = [TaskData.read(task, [f]) for f in train_files]
        dev = [TaskData.read(task, [f]).head(dev_max_samples) for f in dev_files]
    else:
        train, dev = TaskData.read(task, train_files), TaskData.read(task, dev_files).head(dev_max_samples)
    with contextlib.redirect_stdout(sys.stderr):  # anything the libraries print; stdout is for the result
        delta = train_task_delta(
            base, task, train, dev,
            _output_dir(output_dir, store, "task", name or task), sft=sft, options=options,
            source_deltas=sources, lineage=lineage, name=name, resume=resume,
        )
    _store_result(store, delta, sft.method, as_json)


def _train_s4(store, base, task, adapt, langs, train_dir, shots, mask_kind, pruning, dev_files, dev_max_samples, name,
              density, options, output_dir, as_json) -> None:
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
    dev = TaskData.read(task, list(dev_files)).head(dev_max_samples) if dev_files else None
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


# ---- evaluation ---------------------------------------------------------------------------------


def _language_file(directory: Path, language: str, split: str) -> Path:
    """DIR's file for `language`: the first of `DATA_LAYOUTS` that exists."""
    candidates = [directory / layout.format(lang=language, split=split) for layout in DATA_LAYOUTS]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise click.UsageError(f"--data {directory}: no file for language {language!r}; looked for "
                               + ", ".join(str(p.relative_to(directory)) for p in candidates))
    return found


def evaluation_plan(specs: tuple[str, ...], languages: list[str], split: str) -> list[tuple[str | None, Path]]:
    """(language or None for task only, data file) pairs from --data and --lang: one FILE for every
    language, a DIR with one file per language, or LANG=FILE pairs."""
    pairs = [spec.split("=", 1) for spec in specs if "=" in spec and not Path(spec).exists()]
    if pairs:
        if len(pairs) != len(specs):
            raise click.UsageError("--data: give LANG=FILE for every file, or one FILE or DIR")
        files = {}
        for language, path in pairs:
            if not language or language in files:
                raise click.UsageError(f"--data {language}={path}: " + ("no language before '='" if not language
                                                                        else f"{language} is given twice"))
            files[language] = Path(path)
        missing = [lang for lang in languages if lang not in files]
        if missing:
            raise click.UsageError(f"--lang {','.join(missing)} has no --data LANG=FILE")
        plan = [(lang, files[lang]) for lang in languages or files]
    elif len(specs) != 1:
        raise click.UsageError("--data: give one FILE or DIR, or LANG=FILE for each language")
    elif Path(specs[0]).is_dir():
        if not languages:
            raise click.UsageError(f"--data {specs[0]} is a directory: say which languages to evaluate with --lang")
        plan = [(lang, _language_file(Path(specs[0]), lang, split)) for lang in languages]
    else:
        plan = [(lang, Path(specs[0])) for lang in languages] or [(None, Path(specs[0]))]
    for _, path in plan:
        if not path.is_file():
            raise click.UsageError(f"--data {path}: no such file")
    return plan


def _short_path(path: str) -> str:
    """The last two parts of a data path (hau/test.txt), as tables show it."""
    parts = Path(path).parts
    return str(Path(*parts[-2:])) if len(parts) > 1 else path


@click.command("eval")
@base_option(required=True)
@click.option("--task", required=True, help="Task delta: NAME[@VERSION|@ALIAS], e.g. ner or ner@2.")
@click.option("--lang", "languages", show_default="none: task only",
              help="Language deltas, comma-separated (hau,swa,yor): each language's data is scored task-only and "
                   "with its language delta composed.")
@click.option("--data", "data_specs", required=True, multiple=True, metavar="FILE|DIR|LANG=FILE",
              help="Labelled test data: one FILE for every --lang; a DIR with a file per language "
                   "(DIR/LANG/SPLIT.txt as in MasakhaNER, else DIR/LANG.txt or .tsv); or LANG=FILE, repeated.")
@click.option("--split", default="test", show_default=True, help="With --data DIR: read DIR/LANG/SPLIT.txt.")
@click.option("--kind", "task_kind", type=click.Choice(["ner", "pos", "nli"]), show_default="the task delta's name",
              help="How to read and score --data.")
@click.option("--max-samples", type=click.IntRange(min=1), show_default="all",
              help="Score the first N examples of each file.")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Prediction batch size.")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="Where to compose and predict.")
@click.option("--max-length", type=int, default=256, show_default=True,
              help="Tokens per sentence (clamped to what the base's position embeddings take).")
@PROGRESS_OPTION
@JSON_OPTION
def eval_command(base, task, languages, data_specs, split, task_kind, max_samples, eval_batch_size, device, max_length,
                 progress, as_json) -> None:
    """Score task-only and task + each language on each language's data, in one table (with the average
    gain), and record every result in the store (`sft results` shows them).

    The base is loaded once, task-only runs once per file, and languages are hot-swapped.
    """
    from sftstore.compose import compose
    from sftstore.train.data import sha256_of_files
    from sftstore.train.evaluate import TASK_METRICS
    from sftstore.train.options import fit_max_length
    from sftstore.train.progress import bars_wanted, echo
    from sftstore.train.task import TaskData, evaluate_task

    store = open_store()
    task_version = store.resolve(DeltaRef.parse(task, "task"), base)
    kind = task_kind or task_version.name
    if kind not in ("ner", "pos", "nli"):
        raise click.UsageError(f"say how to score --data with --kind (the task delta is named {task_version.name!r})")
    plan = evaluation_plan(data_specs, [code for code in (languages or "").split(",") if code], split)
    # every delta and file is resolved and read before the first (long) evaluation
    versions = {code: store.resolve(DeltaRef.parse(code, "language"), base) for code, _ in plan if code}
    files = {path: TaskData.read(kind, [path]) for _, path in plan}
    subsets = {path: data.head(max_samples) for path, data in files.items()}
    names = {path: str(path) if len(subsets[path].examples) == len(data.examples)  # [:N]: the first N examples
             else f"{path}[:{len(subsets[path].examples)}]" for path, data in files.items()}
    digests = {path: sha256_of_files(path) for path in files}
    task_delta = store.load(task_version)
    composed = compose(base, [task_delta], device=device)
    bars, kind_metric = bars_wanted(progress), TASK_METRICS[kind]
    max_length = fit_max_length(composed.model.config, max_length)  # one notice, not one per evaluation

    def score(path: Path, refs: list) -> dict:
        label = " + ".join(v.ref for v in refs)
        started = time.perf_counter()
        metrics = evaluate_task(composed.model, composed.tokenizer, subsets[path], task_delta.config.labels, max_length,
                                batch_size=eval_batch_size, bars=bars, desc=f"{_short_path(str(path))}: {label}")
        store.record_result(refs, names[path], digests[path], metrics)
        echo(f"{_short_path(names[path])}: {label} {kind_metric} {metrics[kind_metric]:.4f} "
             f"({len(subsets[path].examples)} examples, {time.perf_counter() - started:.0f} s)")
        return metrics

    with contextlib.redirect_stdout(sys.stderr):
        task_only = {path: score(path, [task_version]) for path in files}  # once per file
        rows = []
        for code, path in plan:
            row = {"language": code, "data": names[path], "data_sha256": digests[path],
                   "examples": len(subsets[path].examples), "task_only": task_only[path], "deltas": [task_version.ref],
                   "composed": None, "gain": None}
            if code is not None:
                composed.swap(language=store.load(versions[code]))
                row["composed"] = score(path, [task_version, versions[code]])
                row["deltas"].append(versions[code].ref)
                row["gain"] = row["composed"][kind_metric] - task_only[path][kind_metric]
            rows.append(row)
    scored = [row for row in rows if row["composed"] is not None]
    average = {"task_only": sum(r["task_only"][kind_metric] for r in rows) / len(rows),
               "composed": sum(r["composed"][kind_metric] for r in scored) / len(scored) if scored else None}
    average["gain"] = average["composed"] - average["task_only"] if scored else None
    if as_json:
        print_json({"task": task_version.ref, "metric": kind_metric, "results": rows, "average": average})
        return
    _print_evaluation(task_version.ref, kind_metric, rows, average)


def _print_evaluation(task_ref: str, metric: str, rows: list[dict], average: dict) -> None:
    """One row per language (or file, task only): the data, its size, task only, task + language, the gain;
    then the average."""
    with_languages = rows[0]["language"] is not None
    columns = ["lang", "data", "n", "task only", "+ lang", "gain"] if with_languages else ["data", "n", "task only"]
    table = new_table(*columns, right=("n", "task only", "+ lang", "gain"))

    def cells(values: dict) -> list[str]:
        scores = [f"{values['task_only']:.4f}"]
        if with_languages:
            scores += [f"{values['composed']:.4f}", f"{values['gain']:+.4f}"]
        return scores

    for row in rows:
        values = {"task_only": row["task_only"][metric], "composed": (row["composed"] or {}).get(metric),
                  "gain": row["gain"]}
        table.add_row(*([row["language"]] if with_languages else []), _short_path(row["data"]), str(row["examples"]),
                      *cells(values))
    if len(rows) > 1:
        table.add_row(*(["average", ""] if with_languages else ["average"]), str(sum(r["examples"] for r in rows)),
                      *cells(average))
    print_table(table, f"{task_ref}: {metric}" + (", task only vs task + language" if with_languages else ""))


@click.command("results")
@base_option()
@click.option("--task", show_default="any", help="Only results with this task delta (NAME, e.g. ner).")
@click.option("--lang", "languages", show_default="any",
              help="Only results composed with one of these language deltas (comma-separated).")
@JSON_OPTION
def results_command(base, task, languages, as_json) -> None:
    """Show the evaluation results recorded in the store (by `sft eval`), oldest first."""
    codes = {code for code in (languages or "").split(",") if code}
    rows = []
    for result in open_store().results(base):
        refs = [DeltaRef.parse(ref) for ref in result["deltas"]]
        if task and not any(r.kind == "task" and r.name == task for r in refs):
            continue
        if codes and not any(r.kind == "language" and r.name in codes for r in refs):
            continue
        rows.append(result)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("No recorded result matches." if (task or codes or base) else "No result is recorded yet: run sft eval.")
        return
    table = new_table("recorded", "composition", "data", "metric", "score", right=("score",))
    for row in rows:  # the score each task is ranked by; --json has every metric
        metric = next((name for name in ("f1", "accuracy") if name in row["metrics"]), next(iter(row["metrics"]), ""))
        value = row["metrics"].get(metric)
        table.add_row(row["recorded_at"][:10], " + ".join(row["deltas"]), _short_path(row["data"]), metric,
                      f"{value:.4f}" if isinstance(value, (int, float)) else str(value))
    print_table(table, "recorded results" + (f" ({short_base(base)})" if base else ""))
