"""The training and evaluation commands' surface: K as a density (and the K stored), progress lines, the
position limit, evaluation of many languages in one command, `sft results`, help texts."""

from __future__ import annotations

import json
import re
import shutil

import click
import pytest
from click.testing import CliRunner

from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import base_parameters, load_model
from sftstore.store import DeltaStore
from sftstore.train import options as options_module
from sftstore.train.data import shipped_data
from sftstore.train.language import prepare_mlm_model
from sftstore.train.options import TrainingOptions, position_limit
from sftstore.train.progress import run_warnings
from sftstore_cli.main import cli
from sftstore_cli.train import eval_command, results_command, train_lang, train_task

TINY = ["--max-steps", "4", "--phase1-max-steps", "4", "--eval-steps", "2", "--batch-size", "8", "--max-length", "32",
        "--no-progress", "--cpu"]


def invoke(*args: str):
    """Run `sft ARGS`; the result keeps stdout and stderr apart."""
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def en_text(tmp_path):
    path = tmp_path / "en.txt"
    path.write_text("\n".join(shipped_data("mlm/en.txt").read_text(encoding="utf-8").splitlines()[:60]) + "\n")
    return path


@pytest.fixture
def ner_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(shipped_data("ner/en/train.txt").read_text(encoding="utf-8").splitlines()[:300]) + "\n")
    return path


# ---- K --------------------------------------------------------------------------------------------------------


def test_language_k_defaults_to_the_papers_density_and_is_stored_whole(tiny_bert_dir, en_text):
    result = invoke("train-lang", "--base", str(tiny_bert_dir), "--lang", "en", "--text", str(en_text), *TINY, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    trainable = sum(p.numel() for p in base_parameters(prepare_mlm_model(tiny_bert_dir)).values() if p.requires_grad)
    assert report["requested_k"] == round(0.028 * trainable)  # 7.6M of XLM-R base's 277M, on this base
    assert report["nnz"] == report["requested_k"]  # entries that never moved are stored as 0, not dropped
    manifest = DeltaStore().manifest(DeltaStore().resolve("lang/en"))
    assert manifest["requested_k"] == manifest["nnz"] == report["requested_k"]
    assert manifest["method"]["density"] == 0.028 and manifest["method"]["num_params"] is None
    shown = invoke("show", "lang/en", "--base", str(tiny_bert_dir))
    assert shown.exit_code == 0 and f"{report['requested_k']:,}" in shown.stdout and "requested K" in shown.stdout


def test_task_k_as_an_absolute_count(tiny_bert_dir, ner_file):
    result = invoke("train-task", "--base", str(tiny_bert_dir), "--task", "ner", "--train", str(ner_file),
                    "--dev", str(ner_file), "--method", "rand-sft", "--num-params", "1.5k", *TINY)
    assert result.exit_code == 0, result.output
    assert "K 1,500 requested, 1,500 non-zeros stored" in result.stdout
    delta = DeltaStore().load("task/ner")
    assert delta.config.requested_k == delta.nnz == 1500 and delta.config.method["density"] is None


def test_density_and_num_params_are_exclusive(tiny_bert_dir, en_text):
    result = invoke("train-lang", "--base", str(tiny_bert_dir), "--lang", "en", "--text", str(en_text),
                    "--density", "0.05", "--num-params", "100", *TINY)
    assert result.exit_code == 2 and "either as --density or as --num-params, not both" in result.output
    assert DeltaStore().list() == []


def test_old_manifests_without_requested_k_stay_valid(ner_model, tmp_path):
    delta = synthetic_delta(ner_model, 0.05, 3, kind="language", language="hau")
    directory = delta.save_pretrained(tmp_path / "artifact")
    manifest = json.loads((directory / "sft_config.json").read_text())
    del manifest["requested_k"]
    (directory / "sft_config.json").write_text(json.dumps(manifest))
    version, _ = DeltaStore().add(type(delta).from_pretrained(directory))
    assert DeltaStore().load(version).config.requested_k is None


# ---- what a run prints ----------------------------------------------------------------------------------------


def test_training_prints_log_lines_and_no_raw_trainer_dicts(tiny_bert_dir, ner_file):
    result = invoke("train-task", "--base", str(tiny_bert_dir), "--task", "ner", "--train", str(ner_file),
                    "--dev", str(ner_file), "--density", "0.05", *TINY, "--log-every", "2")
    assert result.exit_code == 0, result.output
    for phase in ("phase1", "phase2"):
        for step in (2, 4):
            assert re.search(rf"^task/ner {phase} step {step}/4 loss \d+\.\d{{4}} lr \S+ elapsed 0:\d\d:\d\d "
                             r"ETA 0:\d\d:\d\d$", result.stderr, re.M), result.stderr
            assert re.search(rf"^task/ner {phase} step {step}/4 dev f1 \d\.\d{{4}} \(best \d\.\d{{4}}\)$",
                             result.stderr, re.M)
        assert re.search(rf"^task/ner {phase} done: 4 steps in 0:\d\d:\d\d, last loss \d", result.stderr, re.M)
    assert "{'" not in result.output and "'loss'" not in result.output  # no raw Trainer dicts anywhere
    assert "it/s" not in result.stderr  # no bar in a pipe unless asked
    assert result.stdout.startswith("stored task/ner@1")


def test_bars_when_asked_show_the_loss_and_log_every_zero_means_no_lines(tiny_bert_dir, ner_file):
    args = [arg for arg in TINY if arg != "--no-progress"]
    result = invoke("train-task", "--base", str(tiny_bert_dir), "--task", "ner", "--train", str(ner_file),
                    "--dev", str(ner_file), "--density", "0.05", *args, "--progress", "--log-every", "0")
    assert result.exit_code == 0, result.output
    assert re.search(r"task/ner phase2: .*4/4.*loss=\d+\.\d{4}", result.stderr)  # the bar, with the loss
    assert "task/ner phase2 evaluating" in result.stderr  # the dev evaluation's own bar
    assert " step 2/4 " not in result.stderr and "{'" not in result.output


def test_a_run_that_learnt_nothing_is_warned_about(ner_model):
    delta = synthetic_delta(ner_model, 0.05, 3, kind="task", task="ner", task_type="token-classification",
                            labels=NER_LABELS)
    assert run_warnings(delta) == []
    delta.config.metrics = {"dev_f1": 0.0}
    for entry in delta.params.values():
        entry.values.zero_()
    warnings = run_warnings(delta)
    assert len(warnings) == 2
    assert "changes no base parameter" in warnings[0] and "best dev f1 of task delta 'ner' is 0" in warnings[1]


def test_max_length_beyond_the_position_embeddings_is_clamped(tiny_bert_dir, tiny_xlmr_dir, en_text):
    assert position_limit(load_model(tiny_bert_dir).config) == 128
    assert position_limit(load_model(tiny_xlmr_dir).config) == 126  # RoBERTa positions start after the padding id
    assert TrainingOptions(max_length=512).fitted_to(tiny_bert_dir).max_length == 128
    assert TrainingOptions(max_length=64).fitted_to(tiny_bert_dir).max_length == 64
    args = [arg for arg in TINY if arg not in ("--max-length", "32")]
    result = invoke("train-lang", "--base", str(tiny_bert_dir), "--lang", "en", "--text", str(en_text), *args,
                    "--max-length", "256", "--json")
    assert result.exit_code == 0, result.output  # was: "expanded size 256 vs 128"
    assert "note: max length 256 is more than the 128 positions the base model takes; using 128" in result.stderr
    assert DeltaStore().load("lang/en").config.training["options"]["max_length"] == 128


def test_dev_max_samples_and_eval_batch_size(tiny_bert_dir, ner_file):
    result = invoke("train-task", "--base", str(tiny_bert_dir), "--task", "ner", "--train", str(ner_file),
                    "--dev", str(ner_file), "--density", "0.05", *TINY, "--dev-max-samples", "3",
                    "--eval-batch-size", "2")
    assert result.exit_code == 0, result.output
    training = DeltaStore().load("task/ner").config.training
    assert training["examples"]["dev"] == [3] and training["options"]["eval_batch_size"] == 2
    assert TrainingOptions(eval_batch_size=2).training_arguments("x", "f1", True).per_device_eval_batch_size == 2
    assert TrainingOptions(batch_size=8).training_arguments("x", "f1", True).per_device_eval_batch_size == 32


# ---- evaluation at scale --------------------------------------------------------------------------------------


@pytest.fixture
def stored(tiny_bert_dir):
    """task/ner and lang/{hau,swa,yor} (synthetic) in the store, on the tiny BERT."""
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    store = DeltaStore()
    store.add(synthetic_delta(model, 0.08, 12, kind="task", task="ner", task_type="token-classification",
                              labels=NER_LABELS))
    for seed, code in enumerate(("hau", "swa", "yor")):
        store.add(synthetic_delta(model, 0.05, 20 + seed, kind="language", language=code))
    return str(tiny_bert_dir)


@pytest.fixture
def test_dir(tmp_path):
    """Both layouts `--data DIR` reads: DIR/LANG/test.txt (MasakhaNER) and DIR/LANG.txt."""
    root = tmp_path / "ner-test"
    for code in ("hau", "swa"):
        (root / code).mkdir(parents=True)
        shutil.copy(shipped_data(f"ner/{code}/test.txt"), root / code / "test.txt")
    shutil.copy(shipped_data("ner/yor/test.txt"), root / "yor.txt")
    return root


@pytest.fixture
def counted(monkeypatch):
    """How often eval loads a base and scores a file."""
    import sftstore.compose
    import sftstore.train.task

    calls = {"compose": 0, "evaluate": 0}

    def count(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(sftstore.compose, "compose", count("compose", sftstore.compose.compose))
    monkeypatch.setattr(sftstore.train.task, "evaluate_task", count("evaluate", sftstore.train.task.evaluate_task))
    return calls


def test_five_language_style_evaluation_is_one_command(stored, test_dir, counted):
    result = invoke("eval", "--base", stored, "--task", "ner", "--lang", "hau,swa,yor", "--data", str(test_dir),
                    "--max-samples", "5", "--max-length", "32", "--eval-batch-size", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert counted == {"compose": 1, "evaluate": 6}  # one base; task only once per file, then each language
    rows = report["results"]
    assert [r["language"] for r in rows] == ["hau", "swa", "yor"]
    assert [r["data"] for r in rows] == [f"{test_dir / 'hau' / 'test.txt'}[:5]", f"{test_dir / 'swa' / 'test.txt'}[:5]",
                                         f"{test_dir / 'yor.txt'}[:5]"]
    assert all(r["examples"] == 5 and r["deltas"] == ["task/ner@1", f"lang/{r['language']}@1"] for r in rows)
    for row in rows:
        assert row["gain"] == pytest.approx(row["composed"]["f1"] - row["task_only"]["f1"])
    assert report["average"]["gain"] == pytest.approx(sum(r["gain"] for r in rows) / 3)
    recorded = DeltaStore().results()
    assert len(recorded) == 6
    assert [r["deltas"] for r in recorded[3:]] == [r["deltas"] for r in rows]
    assert [r["metrics"] for r in recorded[:3]] == [r["task_only"] for r in rows]
    assert [r["metrics"] for r in recorded[3:]] == [r["composed"] for r in rows]

    table = invoke("eval", "--base", stored, "--task", "ner", "--lang", "hau,swa,yor", "--data", str(test_dir),
                   "--max-samples", "5", "--max-length", "32")
    lines = table.stdout.splitlines()
    assert table.exit_code == 0 and max(map(len, lines)) <= 80
    assert [line.split()[0] for line in lines[-4:]] == ["hau", "swa", "yor", "average"]
    assert lines[-1].split()[-1] == f"{report['average']['gain']:+.4f}"


def test_lang_equals_file_pairs_and_one_file_for_every_language(stored, test_dir, counted):
    pairs = invoke("eval", "--base", stored, "--task", "ner", "--data", f"hau={test_dir / 'hau' / 'test.txt'}",
                   "--data", f"yor={test_dir / 'yor.txt'}", "--max-samples", "4", "--max-length", "32", "--json")
    assert pairs.exit_code == 0, pairs.output
    assert [r["language"] for r in json.loads(pairs.stdout)["results"]] == ["hau", "yor"]
    one_file = invoke("eval", "--base", stored, "--task", "ner", "--lang", "hau,swa", "--data",
                      str(test_dir / "hau" / "test.txt"), "--max-samples", "4", "--max-length", "32", "--json")
    assert one_file.exit_code == 0, one_file.output
    rows = json.loads(one_file.stdout)["results"]
    assert rows[0]["task_only"] == rows[1]["task_only"] == json.loads(pairs.stdout)["results"][0]["task_only"]
    assert counted == {"compose": 2, "evaluate": 4 + 3}  # the shared file's task-only pass ran once


@pytest.mark.parametrize(("data", "lang", "message"), [
    (["{dir}"], "hau,fon", "no file for language 'fon'; looked for fon/test.txt"),
    (["{dir}"], None, "is a directory: say which languages to evaluate with --lang"),
    (["hau={dir}/hau/test.txt", "{dir}/yor.txt"], None, "give LANG=FILE for every file"),
    (["hau={dir}/hau/test.txt"], "hau,swa", "--lang swa has no --data LANG=FILE"),
    (["hau={dir}/nothing.txt"], None, "nothing.txt: no such file"),
])
def test_bad_evaluation_data_is_one_clear_line(stored, test_dir, data, lang, message):
    args = [arg for spec in data for arg in ("--data", spec.format(dir=test_dir))]
    result = invoke("eval", "--base", stored, "--task", "ner", *args, *(["--lang", lang] if lang else []))
    assert result.exit_code == 2 and message in result.output
    assert DeltaStore().results() == []


def test_results_shows_recorded_scores_filtered(stored, test_dir, monkeypatch):
    for languages in ("hau,swa", "yor"):
        assert invoke("eval", "--base", stored, "--task", "ner", "--lang", languages, "--data", str(test_dir),
                      "--max-samples", "3", "--max-length", "32").exit_code == 0
    everything = json.loads(invoke("results", "--json").stdout)
    assert len(everything) == 6 and everything == DeltaStore().results()
    swa = json.loads(invoke("results", "--task", "ner", "--lang", "swa,yor", "--json").stdout)
    assert [r["deltas"] for r in swa] == [["task/ner@1", "lang/swa@1"], ["task/ner@1", "lang/yor@1"]]
    assert json.loads(invoke("results", "--task", "pos", "--json").stdout) == []
    monkeypatch.setenv("SFTSTORE_BASE", "some-other-base")  # honoured, like --base
    assert json.loads(invoke("results", "--json").stdout) == []
    monkeypatch.setenv("SFTSTORE_BASE", stored)
    table = invoke("results", "--lang", "hau")
    assert table.exit_code == 0 and max(map(len, table.stdout.splitlines())) <= 80
    assert "task/ner@1 + lang/hau@1" in table.stdout and "hau/test.txt[:3]" in table.stdout
    assert f"{swa[0]['metrics']['f1']:.4f}" in invoke("results", "--lang", "swa").stdout


# ---- help ------------------------------------------------------------------------------------------------------


INPUTS = {"train_files", "dev_files", "adapt", "langs", "train_dir"}  # what to train on: nothing to default to


@pytest.mark.parametrize("command", [train_lang, train_task, eval_command, results_command])
def test_every_option_has_help_and_shows_its_default(command):
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        assert param.help, f"{command.name} {param.opts[0]} has no help text"
        on_off = param.is_flag and not param.secondary_opts
        if not (on_off or param.required or param.name in INPUTS or "Default:" in param.help):
            assert param.show_default, f"{command.name} {param.opts[0]} does not show its default"


def test_train_lang_offers_only_the_methods_it_can_run():
    text = CliRunner().invoke(cli, ["train-lang", "--help"], terminal_width=200).output
    assert "[lt-sft|rand-sft|bitfit|full]" in text and "s4" not in text
    text = CliRunner().invoke(cli, ["train-task", "--help"], terminal_width=200).output
    assert "[lt-sft|rand-sft|bitfit|full|s4]" in text
    assert "[default: 0.051]" in text and "[default: (10.0; nli: 5.0)]" in text


def test_base_comes_from_the_environment(tiny_bert_dir, en_text, monkeypatch):
    monkeypatch.setenv("SFTSTORE_BASE", str(tiny_bert_dir))
    result = invoke("train-lang", "--lang", "en", "--text", str(en_text), *TINY)
    assert result.exit_code == 0, result.output
    assert DeltaStore().resolve("lang/en").base == str(tiny_bert_dir)


def test_fit_max_length_leaves_unknown_limits_alone():
    class Config:
        model_type = "bert"

    assert options_module.fit_max_length(Config(), 4096) == 4096
