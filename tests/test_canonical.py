"""Canonical composition: a composed model's weights depend only on the set of (delta, scale) applied.

Random sequences of add / remove / swap among two tasks and two languages whose supports overlap heavily
(so the order of floating-point additions matters) must leave weights bit-identical (`torch.equal`) to a
fresh compose of the same set, the base bit-identical outside the deltas' support, and every revert exact.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from sftstore.compose import ComposedModel, canonical_key, compose
from sftstore.delta import SparseDelta
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import base_parameters, load_model

TASK_FIELDS = {"kind": "task", "task_type": "token-classification", "labels": NER_LABELS}


@pytest.fixture(scope="module")
def base(tiny_bert_dir):
    """One tiny token-classification model: every composition starts from a deep copy of it."""
    return load_model(tiny_bert_dir, "token-classification", NER_LABELS)


@pytest.fixture(scope="module")
def deltas(base) -> dict[str, SparseDelta]:
    """Two tasks and two languages, each touching 40% of every parameter: their supports overlap widely."""
    return {
        "ner": synthetic_delta(base, density=0.4, seed=1, task="ner", **TASK_FIELDS),
        "pos": synthetic_delta(base, density=0.4, seed=2, task="pos", **TASK_FIELDS),
        "hau": synthetic_delta(base, density=0.4, seed=3, kind="language", language="hau"),
        "swa": synthetic_delta(base, density=0.4, seed=4, kind="language", language="swa"),
    }


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def fresh(base, applied: list[SparseDelta]) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    compose(model, applied, device="cpu")
    return weights(model)


def assert_equal_weights(model, expected: dict[str, torch.Tensor]) -> None:
    actual = weights(model)
    different = [name for name, tensor in expected.items() if not torch.equal(actual[name], tensor)]
    assert not different, f"not bit-identical: {different}"


def test_the_order_of_application_matters_without_canonical_composition(base, deltas):
    """The premise: applying the same two overlapping deltas in the two orders rounds differently."""
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    for delta in (deltas["hau"], deltas["swa"]):
        delta.apply(one)
    for delta in (deltas["swa"], deltas["hau"]):
        delta.apply(two)
    assert any(not torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters()))


def test_compose_gives_the_same_weights_whatever_the_order_given(base, deltas):
    first = copy.deepcopy(base)
    compose(first, [deltas["swa"], deltas["ner"], deltas["hau"]], device="cpu")
    second = copy.deepcopy(base)
    composed = compose(second, [deltas["hau"], deltas["swa"], deltas["ner"]], device="cpu")
    assert_equal_weights(first, weights(second))
    assert composed.deltas == [deltas["ner"], deltas["hau"], deltas["swa"]]


def _step(composed: ComposedModel, deltas: dict[str, SparseDelta], rng: random.Random) -> None:
    """One random change: swap a task, a language or both, add a language, or remove any delta."""
    applied = composed.deltas
    tasks = [deltas["ner"], deltas["pos"]]
    languages = [deltas["hau"], deltas["swa"]]
    move = rng.choice(["swap-task", "swap-language", "swap-both", "add", "remove"])
    if move == "swap-task":
        composed.swap(task=rng.choice(tasks))
    elif move == "swap-language":
        composed.swap(language=rng.choice(languages))
    elif move == "swap-both":
        composed.swap(task=rng.choice(tasks), language=rng.choice(languages))
    elif move == "add":
        candidates = [d for d in languages if d not in applied]
        candidates += [d for d in tasks if not any(a.kind == "task" for a in applied)]
        if candidates:
            composed.add(rng.choice(candidates))
    elif applied:
        composed.remove(rng.choice(applied))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_histories_give_the_weights_of_a_fresh_compose(base, deltas, seed):
    model = copy.deepcopy(base)
    original = weights(model)
    composed = ComposedModel(model, "tiny", deltas["ner"].config.base_model.fingerprint)
    rng = random.Random(seed)
    references: dict[frozenset[int], dict[str, torch.Tensor]] = {}
    for _ in range(40):
        _step(composed, deltas, rng)
        applied = composed.deltas
        key = frozenset(id(delta) for delta in applied)
        if key not in references:
            references[key] = fresh(base, applied)
        assert_equal_weights(model, references[key])
        assert_base_outside_support(model, original, applied)
    assert len(references) >= 6, "the history visited too few distinct sets to mean much"
    composed.reset()
    assert_equal_weights(model, original)


def assert_base_outside_support(model, original: dict[str, torch.Tensor], applied: list[SparseDelta]) -> None:
    """Every base weight no applied delta touches is the base's, bit for bit."""
    for name, param in base_parameters(model).items():
        touched = torch.zeros(param.numel(), dtype=torch.bool)
        for delta in applied:
            if name in delta.params:
                touched[delta.params[name].indices.long()] = True
        full = f"{model.base_model_prefix}.{name}"
        assert torch.equal(param.detach().reshape(-1)[~touched], original[full].reshape(-1)[~touched]), name


def test_scales_are_part_of_the_set(base, deltas):
    model = copy.deepcopy(base)
    composed = compose(model, [deltas["ner"]], device="cpu")
    composed.add(deltas["swa"], scale=0.5)
    composed.add(deltas["hau"], scale=2.0)
    reference = copy.deepcopy(base)
    compose(reference, [deltas["hau"], deltas["ner"], deltas["swa"]], scales=[2.0, 1.0, 0.5], device="cpu")
    assert_equal_weights(model, weights(reference))
    assert canonical_key(deltas["hau"], 1.0) != canonical_key(deltas["hau"], 2.0)


def test_a_swap_failing_midway_leaves_the_previous_composition(base, deltas, monkeypatch):
    model = copy.deepcopy(base)
    composed = compose(model, [deltas["ner"], deltas["hau"]], device="cpu")
    before = weights(model)
    apply = SparseDelta.apply

    def failing(self, target, scale=1.0):
        if self.name == "swa":
            raise RuntimeError("device lost")
        return apply(self, target, scale)

    monkeypatch.setattr(SparseDelta, "apply", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        composed.swap(task=deltas["pos"], language=deltas["swa"])  # pos applies, then swa fails
    assert composed.deltas == [deltas["ner"], deltas["hau"]]
    assert_equal_weights(model, before)
    assert model.config.id2label == dict(enumerate(NER_LABELS))
    monkeypatch.setattr(SparseDelta, "apply", apply)
    composed.swap(task=deltas["pos"], language=deltas["swa"])
    assert_equal_weights(model, fresh(base, [deltas["pos"], deltas["swa"]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_compositions_are_canonical_too(base, deltas, dtype):
    model = copy.deepcopy(base)
    original = weights(copy.deepcopy(base).to(dtype))
    composed = compose(model, [deltas["swa"]], device="cpu", dtype=dtype)
    composed.swap(task=deltas["ner"])
    composed.add(deltas["hau"])
    composed.remove(deltas["swa"])
    composed.add(deltas["swa"])
    reference = copy.deepcopy(base)
    compose(reference, [deltas["hau"], deltas["swa"], deltas["ner"]], device="cpu", dtype=dtype)
    assert_equal_weights(model, weights(reference))
    composed.reset()
    assert_equal_weights(model, original)
