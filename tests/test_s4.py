"""S4-Tuning: importance scores, per-language masks, masked per-language training, the output delta."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

import sftstore.train.s4 as s4
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import base_parameters, head_parameters, load_model
from sftstore.train.data import shipped_data
from sftstore.train.masks import mask_nnz
from sftstore.train.options import TrainingOptions
from sftstore.train.task import TaskData, collator_for

DENSITY = 0.05


@pytest.fixture(scope="module")
def setup(tiny_bert_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    base = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    task_delta = synthetic_delta(base, density=0.08, seed=12, kind="task", task="ner",
                                 task_type="token-classification", labels=NER_LABELS)
    languages = {"hau": TaskData.read("ner", [shipped_data("ner/hau/dev.txt")]).head(8),
                 "en": TaskData.read("ner", [shipped_data("ner/en/dev.txt")]).head(8)}
    return tokenizer, task_delta, languages


def theta0(tiny_bert_dir, task_delta):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    task_delta.apply(model)
    return model


def total_params(model) -> int:
    return sum(p.numel() for p in base_parameters(model).values())


def test_importance_is_abs_grad_times_weight(tiny_bert_dir, setup):
    tokenizer, task_delta, languages = setup
    model = theta0(tiny_bert_dir, task_delta)
    dataset = languages["hau"].dataset(tokenizer, NER_LABELS, 32)
    collator = collator_for("ner", tokenizer)
    scores = s4.taylor_importance(model, dataset, collator, batch_size=4)
    assert all(p.grad is None for p in model.parameters())
    params = base_parameters(model)
    names = list(params)
    model.eval()
    grads = [torch.zeros_like(params[n]) for n in names]
    for batch in DataLoader(dataset, batch_size=4, collate_fn=collator):  # independently: autograd.grad per batch
        loss = model(**batch).loss
        for total, g in zip(grads, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)):
            if g is not None:
                total += g
    for name, grad in zip(names, grads):
        expected = (grad * params[name].detach()).abs()
        torch.testing.assert_close(scores[name], expected, rtol=1e-5, atol=1e-9)
    assert any(bool(s.any()) for s in scores.values())


def test_language_masks_take_exactly_k_top_entries(tiny_bert_dir, setup):
    tokenizer, task_delta, languages = setup
    model = theta0(tiny_bert_dir, task_delta)
    collator = collator_for("ner", tokenizer)
    datasets = {lang: data.dataset(tokenizer, NER_LABELS, 32) for lang, data in languages.items()}
    k = round(DENSITY * total_params(model))
    masks = s4.language_masks(model, datasets, collator, DENSITY, batch_size=4)
    assert set(masks) == {"hau", "en"}
    for lang, lang_masks in masks.items():
        assert mask_nnz(lang_masks) == k
        scores = s4.taylor_importance(model, datasets[lang], collator, 4)
        selected = min(float(scores[n][m].min()) for n, m in lang_masks.items() if m.any())
        unselected = max(float(scores[n][~m].max()) for n, m in lang_masks.items() if (~m).any())
        assert selected >= unselected
    assert any(not torch.equal(masks["hau"][n], masks["en"][n]) for n in masks["hau"])
    random_masks = s4.language_masks(model, datasets, collator, DENSITY, random=True, seed=3)
    assert all(mask_nnz(m) == k for m in random_masks.values())
    assert any(not torch.equal(random_masks["hau"][n], random_masks["en"][n]) for n in random_masks["hau"])


class RecordingTrainer(s4.S4Trainer):
    """Keeps, per optimizer step, the step's languages, base gradients and weights before/after."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []
        RecordingTrainer.last = self

    def _before_step(self, optimizer):
        params = base_parameters(self.model)
        self.records.append({
            "languages": set(self._step_languages),
            "grads": {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None},
            "before": {n: p.detach().clone() for n, p in params.items()},
        })
        super()._before_step(optimizer)

    def _after_step(self):
        super()._after_step()
        self.records[-1]["after"] = {n: p.detach().clone() for n, p in base_parameters(self.model).items()}


def test_s4_training_contract(tmp_path, tiny_bert_dir, setup, monkeypatch):
    tokenizer, task_delta, languages = setup
    monkeypatch.setattr(s4, "S4Trainer", RecordingTrainer)
    opts = TrainingOptions(batch_size=4, max_length=32, max_steps=6, eval_steps=3, learning_rate=1e-2,
                           weight_decay=0.1, progress=False, use_cpu=True)
    delta = s4.train_s4(tiny_bert_dir, languages, None, task_delta, DENSITY, opts, tmp_path / "s4")
    masks = {lang: delta.subnetworks[lang] for lang in delta.subnetworks}
    trainer = RecordingTrainer.last
    names = list(languages)
    k = round(DENSITY * total_params(trainer.model))
    assert all(mask_nnz(m) == k for m in masks.values())

    # every step: gradients and weight changes only inside that step's language mask
    assert len(trainer.records) == 6
    seen = set()
    for record in trainer.records:
        assert len(record["languages"]) == 1
        language = names[record["languages"].pop()]
        seen.add(language)
        mask = masks[language]
        for name, grad in record["grads"].items():
            outside = grad.reshape(-1)[~mask[name].reshape(-1)] if name in mask else grad.reshape(-1)
            assert not bool(outside.any()), f"{name}: gradient outside {language}'s mask"
        moved_any = False
        for name, after in record["after"].items():
            moved = (after != record["before"][name]).reshape(-1)
            moved_any |= bool(moved.any())
            assert not bool(moved[~mask[name].reshape(-1)].any()), f"{name} moved outside {language}'s mask"
        assert moved_any
    assert seen == set(names)

    # entries outside the union of the masks are bit-identical to theta0
    start, trained = base_parameters(theta0(tiny_bert_dir, task_delta)), base_parameters(trainer.model)
    for name, param in trained.items():
        union = masks["hau"][name] | masks["en"][name]
        assert torch.equal(param.detach()[~union], start[name].detach()[~union]), name

    # the output is a task delta relative to the base: applied to a fresh base it gives the trained model
    fresh = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    delta.apply(fresh)
    for name, param in base_parameters(fresh).items():
        torch.testing.assert_close(param, trained[name].detach(), rtol=0, atol=1e-6)
    tuned_head = head_parameters(trainer.model)
    for name, param in head_parameters(fresh).items():
        torch.testing.assert_close(param, tuned_head[name].detach(), rtol=0, atol=0)
    # it contains the source task delta's support
    for name, entry in task_delta.params.items():
        assert name in delta.params
        assert bool(torch.isin(entry.indices.long(), delta.params[name].indices.long()).all())
    assert delta.kind == "task" and delta.config.task == "ner" and delta.config.labels == list(NER_LABELS)
    assert delta.config.method["name"] == "s4" and delta.config.method["languages"] == names
    assert delta.config.method["mask"] == "importance" and delta.config.method["pruning"] is False
    assert delta.config.lineage["adapted_from"]["created_at"] == task_delta.config.created_at


def test_random_masks_ablation_trains(tmp_path, tiny_bert_dir, setup):
    tokenizer, task_delta, languages = setup
    opts = TrainingOptions(batch_size=4, max_length=32, max_steps=2, eval_steps=2, learning_rate=1e-3,
                           progress=False, use_cpu=True)
    dev = TaskData.read("ner", [shipped_data("ner/en/dev.txt")]).head(4)
    delta = s4.train_s4(tiny_bert_dir, languages, dev, task_delta, DENSITY, opts, tmp_path / "s4r", mask="random")
    k = round(DENSITY * delta.num_parameters)
    assert all(delta.subnetworks.nnz(lang) == k for lang in languages)
    assert delta.config.method["mask"] == "random"
    assert "dev_f1" in delta.config.metrics


def test_fc_baseline_trains_the_classifier_only(tmp_path, tiny_bert_dir, setup):
    tokenizer, task_delta, languages = setup
    opts = TrainingOptions(batch_size=4, max_length=32, max_steps=3, eval_steps=3, learning_rate=1e-2,
                           progress=False, use_cpu=True)
    delta = s4.train_s4(tiny_bert_dir, languages, None, task_delta, DENSITY, opts, tmp_path / "fc", mask="fc")
    assert all(delta.subnetworks.nnz(lang) == 0 for lang in languages)
    assert delta.config.method["mask"] == "fc"
    assert delta.params.keys() == task_delta.params.keys()  # the base weights did not move:
    for name, entry in task_delta.params.items():  # the delta is the source delta (up to rounding)
        assert torch.equal(delta.params[name].indices.long(), entry.indices.long())
        torch.testing.assert_close(delta.params[name].values, entry.values, rtol=0, atol=1e-6)
    assert any(not torch.equal(delta.head[n], t) for n, t in task_delta.head.items())  # the classifier trained


def test_full_baseline_masks_every_base_parameter(tmp_path, tiny_bert_dir, setup):
    tokenizer, task_delta, languages = setup
    opts = TrainingOptions(batch_size=4, max_length=32, max_steps=2, eval_steps=2, learning_rate=1e-3,
                           progress=False, use_cpu=True)
    delta = s4.train_s4(tiny_bert_dir, languages, None, task_delta, DENSITY, opts, tmp_path / "full", mask="full")
    assert all(delta.subnetworks.nnz(lang) == delta.num_parameters for lang in languages)
    assert delta.density > 0.5  # every base parameter could move, and most did


def test_unknown_mask_and_pruning_with_dev_are_refused(tmp_path, tiny_bert_dir, setup):
    tokenizer, task_delta, languages = setup
    opts = TrainingOptions(max_steps=1, progress=False, use_cpu=True)
    with pytest.raises(ValueError, match="unknown mask 'magnitude'"):
        s4.train_s4(tiny_bert_dir, languages, None, task_delta, DENSITY, opts, tmp_path / "x", mask="magnitude")
    with pytest.raises(ValueError, match="leave dev out"):
        s4.train_s4(tiny_bert_dir, languages, languages["en"], task_delta, DENSITY, opts, tmp_path / "x", pruning=True)
    with pytest.raises(ValueError, match="would prune nothing"):
        s4.train_s4(tiny_bert_dir, languages, None, task_delta, DENSITY, opts, tmp_path / "x", mask="fc", pruning=True)


class PruningRecorder(RecordingTrainer):
    """Checks, at every forward, that the base entries outside the batch's language mask are zero."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards = []
        self.model.register_forward_pre_hook(self._check_pruned)

    def _check_pruned(self, module, args):
        params = base_parameters(self.model)
        masks = self.prune_with[self.current_language]
        outside_zero = all(not bool(params[n].detach()[~m].any()) for n, m in masks.items())
        inside_kept = any(bool(params[n].detach()[m].any()) for n, m in masks.items())
        self.forwards.append((self.current_language, outside_zero and inside_kept))


def test_pruning_forwards_through_the_language_subnetwork_and_pruned_delta_is_that_network(
        tmp_path, tiny_bert_dir, setup, monkeypatch):
    tokenizer, task_delta, languages = setup
    monkeypatch.setattr(s4, "S4Trainer", PruningRecorder)
    opts = TrainingOptions(batch_size=4, max_length=32, max_steps=4, learning_rate=1e-2, weight_decay=0.1,
                           progress=False, use_cpu=True)
    density = 0.5
    delta = s4.train_s4(tiny_bert_dir, languages, None, task_delta, density, opts, tmp_path / "pruned", pruning=True)
    trainer = PruningRecorder.last
    assert delta.config.method["pruning"] is True
    assert len(trainer.forwards) == 4 and {lang for lang, _ in trainer.forwards} == {0, 1}
    assert all(ok for _, ok in trainer.forwards)
    masks = {lang: delta.subnetworks[lang] for lang in languages}
    start, trained = base_parameters(theta0(tiny_bert_dir, task_delta)), base_parameters(trainer.model)
    assert len(trainer.records) == 4
    for record in trainer.records:  # the optimizer sees unpruned weights; updates stay inside the step's mask
        mask = masks[list(languages)[record["languages"].pop()]]
        moved_any = False
        for name, after in record["after"].items():
            before = record["before"][name]
            assert not bool(((before == 0) & (start[name].detach() != 0)).any()), f"{name} still pruned at the step"
            moved = after != before
            moved_any |= bool(moved.any())
            assert not bool(moved[~mask[name]].any()), name
        assert moved_any
    for name, param in trained.items():  # the pruned entries were restored after every batch
        union = masks["hau"][name] | masks["en"][name]
        assert torch.equal(param.detach()[~union], start[name].detach()[~union]), name
        assert not bool(((param.detach() == 0) & (start[name].detach() != 0)).any()), name

    base = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    hau = s4.pruned_delta(delta, base, "hau")
    assert hau.config.task == "ner-hau" and list(hau.subnetworks) == ["hau"]
    assert hau.config.method["network_of"] == "hau" and hau.config.lineage["pruned_from"]["name"] == "ner"
    network = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    hau.apply(network)
    for name, param in base_parameters(network).items():
        expected = torch.where(masks["hau"][name], trained[name].detach(), torch.zeros(()))
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-6)
    tuned_head = head_parameters(trainer.model)
    for name, param in head_parameters(network).items():
        assert torch.equal(param, tuned_head[name].detach())
    with pytest.raises(ValueError, match="no sub-network mask for 'yor'"):
        s4.pruned_delta(delta, base, "yor")
    delta.config.method["pruning"] = False
    with pytest.raises(ValueError, match="not trained with pruning"):
        s4.pruned_delta(delta, base, "hau")


def test_cli_train_task_s4(tmp_path, tiny_bert_dir):
    import shutil

    from click.testing import CliRunner

    from sftstore.store import DeltaStore
    from sftstore_cli.main import cli

    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    DeltaStore().add(synthetic_delta(model, 0.05, 3, kind="task", task="ner", task_type="token-classification",
                                     labels=NER_LABELS))
    train_dir = tmp_path / "fewshot"
    for lang, source in (("hau", "ner/hau/dev.txt"), ("en", "ner/en/dev.txt")):
        (train_dir / lang).mkdir(parents=True)
        shutil.copy(shipped_data(source), train_dir / lang / "train.txt")
    result = CliRunner().invoke(cli, [
        "train-task", "--base", str(tiny_bert_dir), "--task", "ner", "--method", "s4", "--from", "task/ner",
        "--langs", "hau,en", "--train-dir", str(train_dir), "--shots", "8", "--density", "0.05", "--name", "ner-s4",
        "--max-steps", "4", "--batch-size", "4", "--max-length", "32", "--no-progress", "--cpu", "--json"])
    assert result.exit_code == 0, result.output
    stored = DeltaStore().load("task/ner-s4")
    assert stored.config.method["name"] == "s4" and stored.config.lineage["source_ref"] == "task/ner@1"
    assert list(stored.subnetworks) == ["hau", "en"]  # the masks are stored with the delta
    overlap = CliRunner().invoke(cli, ["overlap", "task/ner-s4", "--masks", "--json"])
    assert overlap.exit_code == 0, overlap.output
    assert json.loads(overlap.stdout)["refs"] == ["task/ner-s4@1#hau", "task/ner-s4@1#en"]

    result = CliRunner().invoke(cli, [
        "train-task", "--base", str(tiny_bert_dir), "--task", "ner", "--method", "s4", "--from", "task/ner",
        "--langs", "hau,en", "--train-dir", str(train_dir), "--shots", "8", "--density", "0.5", "--name", "ner-p",
        "--pruning", "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--no-progress", "--cpu", "--json"])
    assert result.exit_code == 0, result.output
    stored = json.loads(result.stdout)
    assert [v["ref"] for v in stored] == ["task/ner-p-hau@1", "task/ner-p-en@1"]
    assert list(DeltaStore().load("task/ner-p-en").subnetworks) == ["en"]

    common = ["train-task", "--base", str(tiny_bert_dir), "--task", "ner", "--from", "task/ner", "--langs", "hau",
              "--train-dir", str(train_dir), "--shots", "4", "--max-steps", "1", "--batch-size", "4", "--max-length",
              "32", "--no-progress", "--cpu"]
    fc = CliRunner().invoke(cli, [*common, "--method", "s4", "--mask", "fc", "--name", "ner-fc"])  # no --density
    assert fc.exit_code == 0, fc.output
    assert DeltaStore().load("task/ner-fc").config.method["density"] is None
    needs_density = CliRunner().invoke(cli, [*common, "--method", "s4"])
    assert needs_density.exit_code != 0 and "--mask importance needs --density" in needs_density.output
    not_s4 = CliRunner().invoke(cli, [*common, "--pruning", "--train", str(train_dir / "en" / "train.txt")])
    assert not_s4.exit_code != 0 and "--pruning is an S4-Tuning ablation" in not_s4.output
