"""Exact revert: heads never touch base weights, out-of-order reverts are refused, reset restores every bit."""

from __future__ import annotations

import gc

import pytest
import torch

from sftstore import BaseModelMismatchError, SparseDelta
from sftstore.compose import compose
from sftstore.delta import ParameterDelta
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import head_parameters, load_model


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter under every name (tied ones included), base and head."""
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}


def assert_unchanged(model, expected: dict[str, torch.Tensor]) -> None:
    current = dict(model.named_parameters(remove_duplicate=False))
    assert current.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(current[name], tensor), f"{name} differs"


def with_head(delta: SparseDelta, head: dict[str, torch.Tensor]) -> SparseDelta:
    """The same sparse entries and manifest with another head."""
    return SparseDelta(delta.params, delta.config, head)


def split(delta: SparseDelta) -> tuple[SparseDelta, SparseDelta]:
    """Two deltas over the same parameters with disjoint entries (even and odd positions of each entry)."""
    halves = []
    for start in (0, 1):
        params = {
            name: ParameterDelta(e.indices[start::2], e.values[start::2], e.shape) for name, e in delta.params.items()
        }
        halves.append(SparseDelta(params, delta.config))
    return halves[0], halves[1]


def shares_entries(a: SparseDelta, b: SparseDelta) -> bool:
    shared = [name for name in a.params if name in b.params]
    return any(bool(torch.isin(a.params[name].indices, b.params[name].indices).any()) for name in shared)


# ---- reset is exact for every delta that loads ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reset_restores_every_parameter_bit_for_bit(tmp_path, tiny_base_dir, ner_model, lang_delta, task_delta, dtype):
    task_delta.save_pretrained(tmp_path / "task")
    loaded_task = SparseDelta.from_pretrained(tmp_path / "task")  # a delta as read from disk
    dense = synthetic_delta(ner_model, density=0.3, seed=21, kind="language", language="en")
    half_values = synthetic_delta(ner_model, density=0.1, seed=22, kind="language", language="sw",
                                  values_dtype=torch.bfloat16)
    assert shares_entries(lang_delta, dense) and shares_entries(task_delta, dense)
    model = load_model(tiny_base_dir, "token-classification", NER_LABELS)
    expected = {name: t.to(dtype) for name, t in snapshot(model).items()}
    composed = compose(model, [lang_delta, task_delta], device="cpu", dtype=dtype)
    composed.swap(task=loaded_task)  # the bottom delta: the ones above are reverted and re-applied
    composed.add(dense, scale=0.5)
    composed.add(half_values)
    composed.add(split(lang_delta)[0], scale=-1.0)
    composed.remove(dense)  # a middle delta
    assert len(composed.deltas) == 4
    assert not torch.equal(model.get_parameter("classifier.weight"), expected["classifier.weight"])
    composed.reset()
    assert composed.deltas == []
    assert_unchanged(model, expected)


# ---- a head may only set head parameters -------------------------------------------------------------------------


def test_a_head_naming_a_base_parameter_is_refused_before_anything_changes(ner_model, lang_delta, task_delta):
    query = f"{ner_model.base_model_prefix}.encoder.layer.0.attention.self.query.weight"
    bad = with_head(task_delta, {**task_delta.head, query: torch.zeros(ner_model.get_parameter(query).shape)})
    before = snapshot(ner_model)
    with pytest.raises(BaseModelMismatchError, match=f"head::{query}' names the base-model parameter"):
        bad.apply(ner_model)
    with pytest.raises(BaseModelMismatchError, match="base-model parameter"):
        bad.check_fits(ner_model)
    with pytest.raises(BaseModelMismatchError, match="base-model parameter"):
        compose(ner_model, [bad], device="cpu")
    composed = compose(ner_model, [lang_delta], device="cpu")
    with_lang = snapshot(ner_model)
    with pytest.raises(BaseModelMismatchError, match="base-model parameter"):
        composed.add(bad)
    with pytest.raises(BaseModelMismatchError, match="base-model parameter"):
        composed.swap(task=bad)
    assert composed.deltas == [lang_delta]
    assert_unchanged(ner_model, with_lang)
    composed.reset()
    assert_unchanged(ner_model, before)


def test_a_head_naming_the_word_embeddings_or_a_tied_alias_is_refused(tiny_base_dir):
    mlm = load_model(tiny_base_dir, "masked-lm")
    delta = synthetic_delta(mlm, density=0.05, seed=3, kind="task", task="mlm", task_type="masked-lm")
    embeddings = mlm.get_input_embeddings().weight
    tied = [name for name, p in mlm.named_parameters(remove_duplicate=False) if p is embeddings]
    assert len(tied) == 2, "the decoder must be tied to the word embeddings for this test to mean anything"
    assert not set(tied) & set(head_parameters(mlm))
    before = snapshot(mlm)
    for name in tied:
        bad = with_head(delta, {**delta.head, name: torch.zeros(embeddings.shape)})
        with pytest.raises(BaseModelMismatchError, match="embeddings.word_embeddings.weight"):
            bad.apply(mlm)
    assert_unchanged(mlm, before)


def test_a_head_sharing_memory_with_a_base_parameter_is_refused(ner_model, task_delta):
    """Tied by storage, not by identity: the classifier's weight a view of a base matrix."""
    dense = ner_model.base_model.encoder.layer[0].output.dense
    ner_model.classifier.weight = torch.nn.Parameter(dense.weight.data[: len(NER_LABELS)])
    before = snapshot(ner_model)
    with pytest.raises(BaseModelMismatchError, match="head::classifier.weight' names the base-model parameter"):
        task_delta.apply(ner_model)
    assert_unchanged(ner_model, before)


def test_two_names_of_one_tied_head_parameter_are_refused(tiny_bert_dir):
    mlm = load_model(tiny_bert_dir, "masked-lm")
    assert mlm.get_parameter("cls.predictions.decoder.bias") is mlm.get_parameter("cls.predictions.bias")
    delta = synthetic_delta(mlm, density=0.05, seed=3, kind="task", task="mlm", task_type="masked-lm")
    bias = delta.head["cls.predictions.bias"]
    alias = with_head(delta, {**{n: t for n, t in delta.head.items() if n != "cls.predictions.bias"},
                              "cls.predictions.decoder.bias": bias})
    before = snapshot(mlm)
    with alias.applied(mlm):  # a head parameter under its tied name is fine
        assert torch.equal(mlm.get_parameter("cls.predictions.bias"), bias)
    assert_unchanged(mlm, before)
    both = with_head(delta, {**delta.head, "cls.predictions.decoder.bias": bias})
    with pytest.raises(BaseModelMismatchError, match="name the same"):
        both.apply(mlm)
    assert_unchanged(mlm, before)


# ---- reverting out of order ----------------------------------------------------------------------------------------


def test_an_out_of_order_revert_of_overlapping_deltas_raises_and_changes_nothing(ner_model, lang_delta, task_delta):
    assert shares_entries(task_delta, lang_delta)
    base = snapshot(ner_model)
    task_handle = task_delta.apply(ner_model)
    lang_handle = lang_delta.apply(ner_model)
    composed = snapshot(ner_model)
    with pytest.raises(RuntimeError, match=f"cannot revert delta 'ner': delta '{lang_delta.name}'"):
        task_handle.revert()
    assert task_handle.active
    assert_unchanged(ner_model, composed)
    lang_handle.revert()
    task_handle.revert()
    assert_unchanged(ner_model, base)


def test_two_heads_overlap_even_with_disjoint_sparse_entries(ner_model, task_delta):
    first, second = split(task_delta)
    first, second = with_head(first, task_delta.head), with_head(second, {n: -t for n, t in task_delta.head.items()})
    base = snapshot(ner_model)
    first_handle, second_handle = first.apply(ner_model), second.apply(ner_model)
    with pytest.raises(RuntimeError, match="cannot revert"):
        first_handle.revert()
    second_handle.revert()
    first_handle.revert()
    assert_unchanged(ner_model, base)


def test_an_out_of_order_revert_of_disjoint_deltas_is_allowed_and_exact(ner_model, lang_delta):
    even, odd = split(lang_delta)
    base = snapshot(ner_model)
    even_handle = even.apply(ner_model)
    odd_handle = odd.apply(ner_model, scale=0.5)
    even_handle.revert()
    with_odd = snapshot(ner_model)
    odd_handle.revert()
    assert_unchanged(ner_model, base)
    with odd.applied(ner_model, scale=0.5):  # the odd-only weights, reached directly
        assert_unchanged(ner_model, with_odd)


def test_a_dropped_handle_stays_applied_and_still_blocks(ner_model, lang_delta, task_delta):
    """A delta whose handle is dropped is applied for good; reverting an earlier overlapping one would corrupt it."""
    task_handle = task_delta.apply(ner_model)
    lang_delta.apply(ner_model)
    gc.collect()
    with pytest.raises(RuntimeError, match="cannot revert"):
        task_handle.revert()


def test_nested_in_order_reverts_are_exact(ner_model, lang_delta, task_delta):
    other = synthetic_delta(ner_model, density=0.2, seed=7, kind="language", language="en")
    base = snapshot(ner_model)
    for _ in range(3):
        with task_delta.applied(ner_model):
            with_task = snapshot(ner_model)
            with lang_delta.applied(ner_model, scale=0.5), other.applied(ner_model, scale=-2.0):
                pass
            assert_unchanged(ner_model, with_task)
    assert_unchanged(ner_model, base)


# ---- the composer --------------------------------------------------------------------------------------------------


def test_removing_a_middle_delta_equals_never_adding_it(tiny_base_dir, lang_delta, task_delta):
    other = synthetic_delta(load_model(tiny_base_dir, "token-classification", NER_LABELS), density=0.2, seed=8,
                            kind="language", language="en")
    model = load_model(tiny_base_dir, "token-classification", NER_LABELS)
    base = snapshot(model)
    composed = compose(model, [task_delta, lang_delta], device="cpu")
    composed.add(other)
    composed.remove(lang_delta)
    assert composed.deltas == [task_delta, other]
    reference = load_model(tiny_base_dir, "token-classification", NER_LABELS)
    compose(reference, [task_delta, other], device="cpu")
    assert_unchanged(model, snapshot(reference))
    composed.reset()
    assert_unchanged(model, base)


def test_remove_refuses_when_an_outside_delta_overlaps_and_changes_nothing(tiny_base_dir, lang_delta, task_delta):
    model = load_model(tiny_base_dir, "token-classification", NER_LABELS)
    composed = compose(model, [task_delta, lang_delta], device="cpu")
    outside = synthetic_delta(model, density=0.3, seed=9, kind="language", language="en")
    handle = outside.apply(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="cannot revert"):
        composed.remove(task_delta)
    with pytest.raises(RuntimeError, match="cannot revert"):
        composed.reset()
    assert composed.deltas == [task_delta, lang_delta]
    assert_unchanged(model, before)
    handle.revert()
    composed.remove(task_delta)
    assert composed.deltas == [lang_delta]

