"""Training methods: each method's contract on a tiny BERT and a few dozen shipped sentences."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoTokenizer, DataCollatorForTokenClassification, TrainerCallback

from sftstore import SparseDelta
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import base_parameters, head_parameters, load_model
from sftstore.store import DeltaStore
from sftstore.train.data import NER_TARGET_MAP, TokenClassificationDataset, read_conll, shipped_data
from sftstore.train.lt_sft import SparseFineTuningArguments, train_sparse
from sftstore.train.options import TrainingOptions
from sftstore.train.sparse_trainer import SparseFineTuningTrainer, Support
from sftstore.train.task import TaskData, evaluate_task, train_task_delta
from sftstore_cli.main import cli


@pytest.fixture(scope="module")
def ner_data(tiny_bert_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    sentences = read_conll(shipped_data("ner/en/train.txt"), label_map=NER_TARGET_MAP)[:48]
    label2id = {label: i for i, label in enumerate(NER_LABELS)}
    dataset = TokenClassificationDataset(sentences, tokenizer, label2id, max_length=32)
    return {"train_dataset": dataset, "eval_dataset": dataset, "data_collator": DataCollatorForTokenClassification(tokenizer)}


def options(**overrides) -> TrainingOptions:
    values = dict(batch_size=8, max_length=32, max_steps=6, phase1_max_steps=4, eval_steps=3, learning_rate=1e-3,
                  progress=False, use_cpu=True)
    return TrainingOptions(**{**values, **overrides})


class HeadRecorder(TrainerCallback):
    """The head's values at the start of every training phase."""

    def __init__(self):
        self.heads = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.heads.append({n: p.detach().clone() for n, p in head_parameters(model).items()})


def json_of(result) -> dict:
    """The JSON document a --json command printed on stdout."""
    return json.loads(result.stdout)


def run(tmp_path, tiny_bert_dir, ner_data, method="lt-sft", source=None, opts=None, callbacks=(), **sft):
    def make_model():
        model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
        if source is not None:
            source.apply(model)
        return model.train()

    args = (opts or options()).training_arguments(str(tmp_path / "run"), metric="loss", greater_is_better=False)
    arguments = SparseFineTuningArguments(method=method, **{"density": 0.05, **sft})
    arguments.phase1_overrides = (opts or options()).phase1_overrides()
    torch.manual_seed(0)
    result = train_sparse(make_model, args, arguments, callbacks=list(callbacks), **ner_data)
    return result, make_model


def outside_support_is_theta0(result, theta0_model) -> None:
    theta0, trained = base_parameters(theta0_model), base_parameters(result.model)
    for name, param in trained.items():
        same = param.detach().reshape(-1) == theta0[name].detach().reshape(-1)
        if result.support is not None and name in result.support.indices:
            same[result.support.indices[name]] = True
        assert bool(same.all()), f"{name} moved outside the support"


def test_lt_sft_contract(tmp_path, tiny_bert_dir, ner_data):
    recorder = HeadRecorder()
    result, make_model = run(tmp_path, tiny_bert_dir, ner_data, opts=options(weight_decay=0.1), callbacks=[recorder])
    k = result.log["k"]
    masks = load_file(str(tmp_path / "run" / f"mask-{k}.safetensors"))
    assert sum(int(m.sum()) for m in masks.values()) == k  # exactly K selected
    assert sum(p.nnz for p in result.params.values()) == k  # and stored: entries that never moved hold 0
    for name, mask in masks.items():  # the delta's support is the mask
        stored = result.params[name].indices.long() if name in result.params else torch.zeros(0, dtype=torch.long)
        assert torch.equal(stored, mask.reshape(-1).nonzero().squeeze(1)), name
    outside_support_is_theta0(result, make_model())  # weight decay and Adam never moved a frozen entry
    assert [p["phase"] for p in result.log["phases"]] == ["phase1", "phase2"]
    assert len(recorder.heads) == 2
    for name, tensor in recorder.heads[0].items():  # phase 2 restarts the head from phase 1's initialisation
        assert torch.equal(recorder.heads[1][name], tensor)
    assert any(not torch.equal(result.head[n], t) for n, t in recorder.heads[0].items())  # and it trained


def test_selection_takes_the_entries_that_moved_most(tmp_path, tiny_bert_dir, ner_data):
    """Phase 1 alone, then the mask: every selected entry moved at least as much as any unselected one."""
    result, make_model = run(tmp_path, tiny_bert_dir, ner_data)
    phase1 = load_model(tmp_path / "run" / "phase1" / sorted(p.name for p in (tmp_path / "run" / "phase1").glob("checkpoint-*"))[-1],
                        "token-classification", NER_LABELS)
    theta0 = base_parameters(make_model())
    masks = load_file(str(tmp_path / "run" / f"mask-{result.log['k']}.safetensors"))
    moved = {n: (p.detach() - theta0[n].detach()).abs() for n, p in base_parameters(phase1).items() if n in masks}
    smallest_selected = min(float(moved[n][masks[n]].min()) for n in masks if masks[n].any())
    largest_unselected = max(float(moved[n][~masks[n]].max()) for n in masks if (~masks[n]).any())
    assert smallest_selected >= largest_unselected


def test_bitfit_touches_only_biases(tmp_path, tiny_bert_dir, ner_data):
    result, make_model = run(tmp_path, tiny_bert_dir, ner_data, method="bitfit")
    assert result.params and all(name.endswith("bias") for name in result.params)
    biases = {n: p for n, p in base_parameters(make_model()).items() if n.endswith("bias") and p.requires_grad}
    assert {n: e.nnz for n, e in result.params.items()} == {n: p.numel() for n, p in biases.items()}  # every bias entry
    outside_support_is_theta0(result, make_model())
    assert [p["phase"] for p in result.log["phases"]] == ["phase2"]


def test_rand_sft_selects_exactly_k_random_entries(tmp_path, tiny_bert_dir, ner_data):
    result, make_model = run(tmp_path, tiny_bert_dir, ner_data, method="rand-sft")
    assert result.support.nnz == result.log["k"] == round(0.05 * sum(p.numel() for p in base_parameters(make_model()).values()))
    assert sum(p.nnz for p in result.params.values()) == result.log["k"]  # "5%" stores 5%, never-moved entries as 0
    assert any(bool((p.values == 0).any()) for p in result.params.values())  # (some never moved in 6 steps)
    outside_support_is_theta0(result, make_model())


def test_full_fine_tuning_gives_a_dense_delta(tmp_path, tiny_bert_dir, ner_data):
    result, make_model = run(tmp_path, tiny_bert_dir, ner_data, method="full")
    theta0 = base_parameters(make_model())
    total = sum(p.numel() for p in theta0.values())
    assert sum(p.nnz for p in result.params.values()) > 0.5 * total
    for name, param in base_parameters(result.model).items():
        expected = (param.detach().float() - theta0[name].float()).reshape(-1)
        entry = result.params.get(name)
        got = torch.zeros_like(expected)
        if entry is not None:
            got[entry.indices.long()] = entry.values
        assert torch.equal(got, expected), name


def test_iterative_rounds_grow_the_mask(tmp_path, tiny_bert_dir, ner_data):
    result, make_model = run(tmp_path, tiny_bert_dir, ner_data, rounds=2)
    k = result.log["k"]
    first = load_file(str(tmp_path / "run" / f"mask-{round(k / 2)}.safetensors"))
    second = load_file(str(tmp_path / "run" / f"mask-{k}.safetensors"))
    assert all(bool(second[n][first[n]].all()) for n in first)  # round 2 keeps round 1's entries
    assert sum(int(m.sum()) for m in second.values()) == k
    assert [p["phase"] for p in result.log["phases"]] == ["phase1-round1", "phase2-round1", "phase1-round2", "phase2-round2"]
    outside_support_is_theta0(result, make_model())


def test_resume_skips_finished_phases(tmp_path, tiny_bert_dir, ner_data):
    run(tmp_path, tiny_bert_dir, ner_data)
    mask_file = next((tmp_path / "run").glob("mask-*.safetensors"))
    before = mask_file.stat().st_mtime_ns
    args = options().training_arguments(str(tmp_path / "run"), metric="loss", greater_is_better=False)
    sft = SparseFineTuningArguments(density=0.05, phase1_overrides=options().phase1_overrides())
    result = train_sparse(lambda: load_model(tiny_bert_dir, "token-classification", NER_LABELS).train(), args, sft,
                          resume=True, **ner_data)
    assert mask_file.stat().st_mtime_ns == before  # the selection was read back, not redone
    assert all(phase["resumed_from"] for phase in result.log["phases"])  # both phases continued from checkpoints


def test_l1_term_is_lambda_over_n_times_the_distance(tmp_path, tiny_bert_dir, ner_data):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.3 for n, p in base_parameters(model).items()}
    support = Support(model, masks)
    args = options().training_arguments(str(tmp_path / "l1"), metric="loss", greater_is_better=False)
    plain = SparseFineTuningTrainer(model=model, args=args, **ner_data)
    pulled = SparseFineTuningTrainer(model=model, args=args, support=support, l1_lambda=0.5, l1_count=1000, **ner_data)
    with torch.no_grad():
        for name, indices in support.indices.items():
            base_parameters(model)[name].view(-1)[indices] += 0.01
    batch = ner_data["data_collator"]([ner_data["train_dataset"][i] for i in range(4)])
    distance = sum(0.01 * i.numel() for i in support.indices.values())
    extra = pulled.compute_loss(model, dict(batch)) - plain.compute_loss(model, dict(batch))
    assert float(extra.detach()) == pytest.approx(0.5 / 1000 * distance, rel=1e-3)
    pulled.remove_hooks()


def test_task_delta_excludes_the_source_language_delta(tmp_path, tiny_bert_dir):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    source = synthetic_delta(model, 0.05, 7, kind="language", language="en")
    path = shipped_data("ner/en/train.txt")
    train = TaskData("ner", read_conll(path, label_map=NER_TARGET_MAP)[:32], [str(path)])
    delta = train_task_delta(tiny_bert_dir, "ner", train, train, tmp_path / "run",
                             sft=SparseFineTuningArguments(density=0.05), options=options(),
                             source_deltas=[source], lineage={"source_languages": ["en"]})
    assert delta.config.lineage == {"source_languages": ["en"]}
    assert delta.config.labels == NER_LABELS and set(delta.head) == {"classifier.weight", "classifier.bias"}
    # composing base + source + task reproduces the trained weights: the task delta holds only what
    # training changed on top of the source delta, never the source delta itself
    composed = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    source.apply(composed)
    delta.apply(composed)
    trained = load_model(tmp_path / "run" / "phase2" / sorted(p.name for p in (tmp_path / "run" / "phase2").glob("checkpoint-*"))[-1],
                         "token-classification", NER_LABELS)
    phase2_best = json.loads((tmp_path / "run" / "sft_run.json").read_text())["phases"][-1]
    assert phase2_best["phase"] == "phase2"
    for name, param in base_parameters(composed).items():
        torch.testing.assert_close(param, base_parameters(trained)[name], rtol=0, atol=1e-6)
    metrics = evaluate_task(composed, AutoTokenizer.from_pretrained(tiny_bert_dir),
                            TaskData.read("ner", [shipped_data("ner/hau/dev.txt")]), NER_LABELS, max_length=32)
    assert set(metrics) == {"f1", "precision", "recall"} and 0.0 <= metrics["f1"] <= 1.0


def test_cli_train_lang_train_task_eval(tmp_path, tiny_bert_dir):
    base = str(tiny_bert_dir)
    common = ["--base", base, "--density", "0.05", "--max-steps", "4", "--phase1-max-steps", "2", "--eval-steps", "2",
              "--batch-size", "8", "--max-length", "32", "--no-progress", "--cpu", "--json"]
    runner = CliRunner()
    lines = tmp_path / "en.txt"
    lines.write_text("\n".join(open(shipped_data("mlm/en.txt"), encoding="utf-8").read().splitlines()[:60]))
    lang = runner.invoke(cli, ["train-lang", "--lang", "en", "--text", str(lines), *common])
    assert lang.exit_code == 0, lang.output
    assert json_of(lang)["ref"] == "lang/en@1"
    train = tmp_path / "train.txt"
    train.write_text("\n".join(open(shipped_data("ner/en/train.txt"), encoding="utf-8").read().splitlines()[:300]) + "\n")
    task = runner.invoke(cli, ["train-task", "--task", "ner", "--train", str(train), "--dev", str(train),
                               "--source-lang", "en", *common])
    assert task.exit_code == 0, task.output
    stored = DeltaStore().load("task/ner")
    assert stored.config.lineage["source_languages"] == ["en"]
    assert stored.config.training["data"]["train"][0][0]["sha256"]
    evaluation = runner.invoke(cli, ["eval", "--base", base, "--task", "ner", "--lang", "en",
                                     "--data", str(shipped_data("ner/hau/test.txt")), "--max-length", "32", "--json"])
    assert evaluation.exit_code == 0, evaluation.output
    rows = json_of(evaluation)["results"]
    assert [r["deltas"] for r in rows] == [["task/ner@1", "lang/en@1"]]
    recorded = DeltaStore().results()
    assert [r["deltas"] for r in recorded] == [["task/ner@1"], ["task/ner@1", "lang/en@1"]]
    assert [r["metrics"] for r in recorded] == [rows[0]["task_only"], rows[0]["composed"]]


def test_torchrun_two_processes_match_one_process(tmp_path, tiny_bert_dir):
    """Under `torchrun --nproc_per_node=2` (gloo, CPU) with the same global batch: same support, same values."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    base = tmp_path / "no-dropout"
    shutil.copytree(tiny_bert_dir, base)
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout differs per process
    (base / "config.json").write_text(json.dumps(config))
    script = str(Path(__file__).parent / "scripts" / "train_distributed.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    single = subprocess.run([sys.executable, script, str(base), str(tmp_path / "one"), "8"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             script, str(base), str(tmp_path / "two"), "8"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one = SparseDelta.from_pretrained(tmp_path / "one" / "delta")
    two = SparseDelta.from_pretrained(tmp_path / "two" / "delta")
    assert one.params.keys() == two.params.keys() and one.nnz > 0
    for name, entry in one.params.items():
        assert torch.equal(entry.indices, two.params[name].indices), name
        torch.testing.assert_close(entry.values, two.params[name].values, rtol=1e-4, atol=1e-6)
    for name, tensor in one.head.items():
        torch.testing.assert_close(tensor, two.head[name], rtol=1e-4, atol=1e-6)


def test_multi_source_batches_apply_their_own_language(tmp_path, tiny_bert_dir):
    """Each batch is one language, trained with that language's delta in place; the result holds neither."""
    from sftstore.train.multi_source import MultiSourceTrainer

    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    sources = [synthetic_delta(model, 0.05, seed, kind="language", language=code) for seed, code in ((7, "en"), (8, "swa"))]
    first = [p.detach().clone() for p in (e.values for e in sources[0].params.values())]
    seen = []
    original = MultiSourceTrainer.use_language

    def spy(self, language):
        original(self, language)
        name, entry = next(iter(self.language_deltas[language].params.items()))
        theta = base_parameters(self.model)[name].reshape(-1)[entry.indices.long()]
        seen.append((language, theta.clone()))

    english = TaskData.read("ner", [shipped_data("ner/en/train.txt")]).head(24)
    hausa = TaskData.read("ner", [shipped_data("ner/hau/dev.txt")]).head(24)
    MultiSourceTrainer.use_language = spy
    try:
        delta = train_task_delta(tiny_bert_dir, "ner", [english, hausa], [english, hausa], tmp_path / "run",
                                 sft=SparseFineTuningArguments(density=0.05), options=options(batch_size=4),
                                 source_deltas=sources)
    finally:
        MultiSourceTrainer.use_language = original
    assert {language for language, _ in seen} == {0, 1}  # both languages trained, each batch one language
    assert delta.nnz > 0 and all(torch.equal(a, b) for a, b in zip(first, (e.values for e in sources[0].params.values())))
    # after training no language delta is left in the weights: the trained model minus the task delta is theta0
    trained = load_model(tmp_path / "run" / "phase2" / sorted(p.name for p in (tmp_path / "run" / "phase2").glob("checkpoint-*"))[-1],
                         "token-classification", NER_LABELS)
    theta0 = base_parameters(load_model(tiny_bert_dir, "token-classification", NER_LABELS))
    for name, param in base_parameters(trained).items():
        expected = theta0[name].detach().clone().reshape(-1)
        if name in delta.params:
            expected[delta.params[name].indices.long()] += delta.params[name].values
        torch.testing.assert_close(param.detach().reshape(-1), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("task", "fixture"), [("pos", "en_ewt-ud-dev.head.conllu"), ("nli", "xnli-dev-en.head.tsv")])
def test_pos_and_nli_train_and_score(tmp_path, tiny_bert_dir, task, fixture):
    from pathlib import Path

    path = Path(__file__).parent / "data" / fixture
    data = TaskData.read(task, [path])
    delta = train_task_delta(tiny_bert_dir, task, data, data, tmp_path / "run",
                             sft=SparseFineTuningArguments(density=0.05), options=options())
    expected_type = "sequence-classification" if task == "nli" else "token-classification"
    assert delta.config.task_type == expected_type and delta.head and delta.nnz > 0
    if task == "nli":
        assert delta.config.labels == ["entailment", "neutral", "contradiction"]
    else:
        assert {"NOUN", "VERB", "PUNCT"} <= set(delta.config.labels)
    model = load_model(tiny_bert_dir, expected_type, delta.config.labels)
    delta.apply(model)
    metrics = evaluate_task(model, AutoTokenizer.from_pretrained(tiny_bert_dir), data, delta.config.labels, max_length=32)
    assert set(metrics) == {"accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(delta.config.metrics) == {"dev_accuracy"} and 0.0 <= delta.config.metrics["dev_accuracy"] <= 1.0
