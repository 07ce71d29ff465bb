"""The model card: valid Hub metadata (base model, languages, pipeline tag, model-index), no local paths,
deterministic, robust to manifest values of unexpected types."""

from __future__ import annotations

import copy
import os

import pytest
from huggingface_hub import ModelCard

from sftstore.card import render_model_card
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.format import CARD_FILE, CONFIG_FILE, artifact_files
from sftstore.modeling import load_model

LOCAL_BASE = "/home/alice/private-models/xlmr-base"
ARCH, WEIGHTS = "0123456789abcdef" * 4, "fedcba9876543210" * 4


def manifest(**fields) -> dict:
    """A task delta's manifest on a local base, as `sft_config.json` holds it; `fields` override."""
    base = {
        "format_version": 1, "kind": "task", "task": "ner", "task_type": "token-classification",
        "language": None, "languages": [], "labels": ["O", "B-PER", "I-PER"],
        "base_model": {"id": LOCAL_BASE, "revision": None, "arch_digest": ARCH, "weights_digest": WEIGHTS},
        "method": {"name": "lt-sft"}, "nnz": 120, "num_parameters": 10_000, "density": 0.012,
        "values_dtype": "float32", "tensors_sha256": "0" * 64, "created_at": "2024-05-01T00:00:00+00:00",
        "training": {"data": {"train": [[{"name": "train.txt", "sha256": "1" * 64, "size": 10, "lines": 2}]],
                              "dev": [[{"name": "dev.txt", "sha256": "2" * 64, "size": 10, "lines": 2}]]}},
        "metrics": {"dev_f1": 0.49}, "lineage": {"source_languages": ["en"]}, "license": None,
    }
    return {**base, **fields}


def language_manifest(**fields) -> dict:
    """A language delta's manifest (held-out MLM loss measured on lines of `hau.txt`)."""
    language = {
        "kind": "language", "task": None, "task_type": "masked-lm", "language": "hau", "languages": ["hau"],
        "labels": [], "training": {"data": [{"name": "hau.txt", "sha256": "3" * 64, "size": 10, "lines": 2}]},
        "metrics": {"held_out_mlm_loss": 6.7}, "lineage": {},
    }
    return manifest(**{**language, **fields})


def card_dict(text: str) -> dict:
    """The card's front matter as the Hub client parses it."""
    return ModelCard(text).data.to_dict()


@pytest.fixture
def bert_task_delta(tiny_bert_dir):
    """A task delta on the tiny local BERT base."""
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    return synthetic_delta(model, density=0.05, seed=3, kind="task", task="ner",
                           task_type="token-classification", labels=NER_LABELS,
                           metrics={"dev_f1": 0.49}, lineage={"source_languages": ["en"]})


# ---- base model --------------------------------------------------------------------------------


def test_local_base_is_neither_metadata_nor_prose(bert_task_delta, tiny_bert_dir):
    files = artifact_files(bert_task_delta)
    text = files[CARD_FILE].decode()
    local = os.fspath(tiny_bert_dir)
    assert local in files[CONFIG_FILE].decode()  # the manifest records it (for the store); the card must not
    assert "base_model" not in card_dict(text)
    assert local not in text and os.path.abspath(local) not in text
    fingerprint = bert_task_delta.config.base_model
    assert f"arch `{fingerprint.arch_digest[:12]}`, weights `{fingerprint.weights_digest[:12]}`" in text
    assert "sft compose --base BASE --task ner" in text


def test_hand_written_local_path_never_appears():
    text = render_model_card(manifest())
    assert "base_model" not in card_dict(text) and LOCAL_BASE not in text and "private-models" not in text


@pytest.mark.parametrize("base", ["FacebookAI/xlm-roberta-base", "xlm-roberta-base", "bert-base-multilingual-cased"])
def test_hub_base_is_the_base_model(base):
    text = render_model_card(manifest(base_model={"id": base, "arch_digest": ARCH, "weights_digest": WEIGHTS}))
    assert card_dict(text)["base_model"] == base
    assert f"(https://huggingface.co/{base})" in text and f"sft compose --base {base} --task ner" in text
    assert "BASE" not in text


def test_hub_base_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """A directory named like the Hub id where the card is written changes nothing: same manifest, same card."""
    one = manifest(base_model={"id": "xlm-roberta-base", "arch_digest": ARCH, "weights_digest": WEIGHTS})
    before = render_model_card(one)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xlm-roberta-base").mkdir()
    assert render_model_card(one) == before and card_dict(before)["base_model"] == "xlm-roberta-base"


@pytest.mark.parametrize("base", ["./models/xlmr", "~/models/xlmr", "C:\\models\\xlmr", "a/b/c", "../xlmr", ""])
def test_path_like_bases_are_omitted(base):
    text = render_model_card(manifest(base_model={"id": base, "arch_digest": ARCH, "weights_digest": WEIGHTS}))
    assert "base_model" not in card_dict(text)
    assert "a local base model" in text and (not base or base not in text)


# ---- language, pipeline tag --------------------------------------------------------------------


def test_task_delta_language_is_its_source_language(bert_task_delta):
    assert card_dict(artifact_files(bert_task_delta)[CARD_FILE].decode())["language"] == ["en"]


@pytest.mark.parametrize(("fields", "expected"), [
    ({"languages": ["de", "fr"]}, ["de", "fr"]),  # the manifest's own languages come first
    ({"lineage": {"source_languages": ["en", "sw"]}}, ["en", "sw"]),
    ({"lineage": {}}, None),
    ({"lineage": {"source_languages": "en"}}, None),  # not a list
])
def test_task_delta_languages(fields, expected):
    assert card_dict(render_model_card(manifest(**fields))).get("language") == expected


def test_language_delta_language():
    assert card_dict(render_model_card(language_manifest()))["language"] == ["hau"]
    assert card_dict(render_model_card(language_manifest(languages=[])))["language"] == ["hau"]


@pytest.mark.parametrize(("task_type", "expected"), [
    ("token-classification", "token-classification"),
    ("sequence-classification", "text-classification"),
    ("feature-extraction", None),
])
def test_pipeline_tag(task_type, expected):
    assert card_dict(render_model_card(manifest(task_type=task_type))).get("pipeline_tag") == expected


def test_language_delta_pipeline_tag():
    assert card_dict(render_model_card(language_manifest()))["pipeline_tag"] == "fill-mask"


# ---- model-index -------------------------------------------------------------------------------


def test_task_metric_in_model_index(bert_task_delta):
    data = ModelCard(artifact_files(bert_task_delta)[CARD_FILE].decode()).data
    assert data.model_name == "task/ner"
    [result] = data.eval_results
    assert (result.task_type, result.metric_type, result.metric_name, result.metric_value) == (
        "token-classification", "f1", "dev F1", 0.49)
    assert (result.dataset_type, result.dataset_name) == ("dev-set", "dev set")  # synthetic: no training data


def test_metrics_name_their_data():
    [dev] = ModelCard(render_model_card(manifest(metrics={"dev_accuracy": 0.8}))).data.eval_results
    assert (dev.dataset_type, dev.dataset_name, dev.metric_type, dev.metric_name, dev.metric_value) == (
        "dev-set", "dev set (dev.txt)", "accuracy", "dev accuracy", 0.8)
    data = ModelCard(render_model_card(language_manifest())).data
    [held_out] = data.eval_results
    assert data.model_name == "lang/hau"
    assert (held_out.task_type, held_out.dataset_type, held_out.dataset_name) == (
        "fill-mask", "held-out-text", "held-out text (hau.txt)")
    assert (held_out.metric_type, held_out.metric_name, held_out.metric_value) == ("mlm_loss", "held-out MLM loss", 6.7)


@pytest.mark.parametrize("name", ["/home/alice/data/dev.txt", "../dev.txt", "C:\\data\\dev.txt", "~/dev.txt"])
def test_dataset_name_never_holds_a_path(name):
    training = {"data": {"dev": [[{"name": name}]]}}
    text = render_model_card(manifest(training=training))
    assert ModelCard(text).data.eval_results[0].dataset_name == "dev set"
    assert name not in text


def test_only_finite_numbers_are_results():
    metrics = {"dev_f1": 0.5, "dev_loss": float("nan"), "dev_x": float("inf"), "dev_ok": True, "dev_note": "good",
               "dev_none": None, "dev_list": [1], "dev_count": 12, "steps": 3}
    results = ModelCard(render_model_card(manifest(metrics=metrics))).data.eval_results
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in results] == [
        ("f1", 0.5, "dev-set"), ("count", 12, "dev-set"), ("steps", 3, "evaluation-set")]
    assert "| metrics: dev_note | good |" in render_model_card(manifest(metrics=metrics))  # the prose keeps them all


def test_no_metrics_no_model_index():
    assert "model-index" not in card_dict(render_model_card(manifest(metrics={})))


# ---- robustness, determinism -------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"metrics": [0.5, 0.6]},
    {"metrics": "dev_f1=0.5"},
    {"metrics": None},
    {"lineage": "from lang/en"},
    {"lineage": ["en"]},
    {"training": "lots of text"},
    {"training": {"data": "dev.txt"}},
    {"training": {"data": {"dev": [[{"name": 5}], "x", None]}}},
    {"languages": "en"},
    {"labels": "O B-PER"},
    {"task_type": ["token-classification"]},
    {"license": 5},
    {"method": "lt-sft"},
    {"base_model": "xlm-roberta-base"},
    {"metrics": {1: 0.5, "dev_f1": 10**400}},
    {"nnz": "many", "density": None},
    {"task": None, "values_dtype": ["float32"]},
])
def test_unexpected_types_do_not_crash(fields):
    text = render_model_card(manifest(**fields))
    data = card_dict(text)
    assert data["library_name"] == "sftstore" and "sparse-fine-tuning" in data["tags"]
    assert isinstance(data["license"], str) and "base_model" not in data


def test_unexpected_types_are_ignored():
    data = card_dict(render_model_card(manifest(metrics=[0.5], lineage="en", languages="en")))
    assert "model-index" not in data and "language" not in data


def test_card_is_deterministic(bert_task_delta):
    assert artifact_files(bert_task_delta)[CARD_FILE] == artifact_files(copy.deepcopy(bert_task_delta))[CARD_FILE]
    one = manifest()
    assert render_model_card(one) == render_model_card(copy.deepcopy(one))
    assert one == manifest()  # rendering does not change the manifest
