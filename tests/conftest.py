"""Shared fixtures: tiny BERT / XLM-R bases built from configs, an isolated store, synthetic deltas.

No test touches the network: the Hub is switched off before transformers is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402

from hub_server import hub_env, hub_server  # noqa: E402,F401  (fixtures: a Hub-protocol server on 127.0.0.1)
from sftstore.demo import NER_LABELS, build_tiny_base, synthetic_delta  # noqa: E402
from sftstore.modeling import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT masked-LM checkpoint with a word-piece tokenizer."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-bert"), arch="bert")


@pytest.fixture(scope="session")
def tiny_xlmr_dir(tmp_path_factory):
    """A tiny XLM-R masked-LM checkpoint (no tokenizer)."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-xlmr"), arch="xlm-roberta", seed=1)


@pytest.fixture(autouse=True)
def store_home(tmp_path, monkeypatch):
    """Every test gets its own empty store and no default base from the environment."""
    home = tmp_path / "sftstore-home"
    monkeypatch.setenv("SFTSTORE_HOME", str(home))
    monkeypatch.delenv("SFTSTORE_BASE", raising=False)
    monkeypatch.delenv("SFTSTORE_CONFIG", raising=False)
    return home


@pytest.fixture(params=["bert", "xlmr"])
def tiny_base_dir(request, tiny_bert_dir, tiny_xlmr_dir):
    """Each test using this runs on both architectures."""
    return tiny_bert_dir if request.param == "bert" else tiny_xlmr_dir


@pytest.fixture
def ner_model(tiny_base_dir):
    """A token-classification model on the tiny base, loaded as the composer loads it."""
    return load_model(tiny_base_dir, "token-classification", NER_LABELS)


@pytest.fixture
def lang_delta(ner_model):
    return synthetic_delta(ner_model, density=0.05, seed=11, kind="language", language="hau")


@pytest.fixture
def task_delta(ner_model):
    return synthetic_delta(
        ner_model, density=0.08, seed=12, kind="task", task="ner",
        task_type="token-classification", labels=NER_LABELS,
    )
