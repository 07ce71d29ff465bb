"""Applying, reverting and composing deltas: the arithmetic and exactness contracts."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForTokenClassification, pipeline

from sftstore import BaseModelMismatchError, SparseDelta
from sftstore.compose import compose
from sftstore.demo import NER_LABELS, perturb, synthetic_delta
from sftstore.modeling import base_parameters, fingerprint, head_parameters, load_model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    for name, tensor in model.state_dict().items():
        if name not in skip:
            assert torch.equal(tensor, expected[name]), f"{name} differs"


def dense_sum(model, deltas_and_scales) -> dict[str, torch.Tensor]:
    """theta + sum(scale * phi), computed densely and independently of SparseDelta.apply."""
    expected = {name: p.detach().clone().double() for name, p in base_parameters(model).items()}
    for delta, scale in deltas_and_scales:
        for name, entry in delta.params.items():
            flat = expected[name].view(-1)
            flat[entry.indices.long()] += entry.values.double() * scale
    return expected


def test_from_models_support_and_values_are_exact(ner_model):
    tuned = copy.deepcopy(ner_model)
    masks = perturb(tuned, density=0.1, seed=3)
    delta = SparseDelta.from_models(ner_model, tuned, masks=masks, kind="language", language="hau")
    base, after = base_parameters(ner_model), base_parameters(tuned)
    for name, mask in masks.items():
        changed = (after[name] != base[name]) & mask
        entry = delta.params.get(name)
        support = torch.zeros(mask.numel(), dtype=torch.bool)
        if entry is not None:
            support[entry.indices.long()] = True
            diff = (after[name] - base[name]).reshape(-1)[entry.indices.long()]
            assert torch.equal(entry.values, diff)
        assert torch.equal(support, changed.reshape(-1)), name
    assert delta.nnz <= sum(int(m.sum()) for m in masks.values())
    assert delta.head == {}  # language deltas carry no head


def test_task_delta_carries_the_head_and_labels(ner_model, task_delta):
    assert set(task_delta.head) == set(head_parameters(ner_model))
    assert task_delta.config.labels == NER_LABELS
    assert not any(name.startswith("classifier") for name in task_delta.params)


def test_apply_equals_dense_sum_and_revert_is_bit_exact(ner_model, lang_delta, task_delta):
    original = snapshot(ner_model)
    expected = dense_sum(ner_model, [(task_delta, 1.0), (lang_delta, 0.5)])
    task_handle = task_delta.apply(ner_model)
    lang_handle = lang_delta.apply(ner_model, scale=0.5)
    for name, param in base_parameters(ner_model).items():
        torch.testing.assert_close(param.double(), expected[name], rtol=0, atol=1e-6)
    for name, tensor in task_delta.head.items():
        assert torch.equal(ner_model.get_parameter(name), tensor)
    lang_handle.revert()
    task_handle.revert()
    assert_bit_identical(ner_model, original)
    with pytest.raises(RuntimeError, match="already reverted"):
        task_handle.revert()


def test_thousand_apply_revert_cycles_with_overlapping_supports(ner_model, lang_delta, task_delta):
    overlap = sum(
        len(set(entry.indices.tolist()) & set(task_delta.params[name].indices.tolist()))
        for name, entry in lang_delta.params.items()
        if name in task_delta.params
    )
    assert overlap > 0, "the fixtures must overlap for this test to mean anything"
    original = snapshot(ner_model)
    for _ in range(1000):
        task_handle = task_delta.apply(ner_model)
        lang_handle = lang_delta.apply(ner_model)
        lang_handle.revert()
        task_handle.revert()
    assert_bit_identical(ner_model, original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_accumulate_in_float32(ner_model, lang_delta, dtype):
    ner_model.to(dtype)
    original = snapshot(ner_model)
    expected = dense_sum(load_model_like(ner_model), [(lang_delta, 1.0)])
    handle = lang_delta.apply(ner_model)
    for name, param in base_parameters(ner_model).items():
        # one rounding of the float32 sum, not a sum of rounded terms
        assert torch.equal(param, expected[name].float().to(dtype)), name
    handle.revert()
    assert_bit_identical(ner_model, original)


def load_model_like(model):
    """The same weights widened to float32 (the half model's exact values)."""
    return copy.deepcopy(model).float()


def test_applied_context_manager_reverts_on_error(ner_model, lang_delta):
    original = snapshot(ner_model)
    name, entry = next(iter(lang_delta.params.items()))
    with pytest.raises(ZeroDivisionError):
        with lang_delta.applied(ner_model):
            assert not torch.equal(base_parameters(ner_model)[name], original[_full_name(ner_model, name)])
            1 / 0
    assert_bit_identical(ner_model, original)


def _full_name(model, base_name: str) -> str:
    prefix = model.base_model_prefix
    return f"{prefix}.{base_name}" if f"{prefix}.{base_name}" in model.state_dict() else base_name


def test_summaries(lang_delta):
    rows = lang_delta.summary()
    assert sum(row.nnz for row in rows) == lang_delta.nnz
    layers = {row.name: row for row in lang_delta.layer_summary()}
    assert "embeddings" in layers and "encoder.layer.0" in layers and "encoder.layer.1" in layers
    assert sum(row.nnz for row in layers.values()) == lang_delta.nnz
    assert 0.03 < lang_delta.density < 0.07  # built at 5%: only changed entries are kept


def test_compose_equals_dense_sum(tiny_base_dir, ner_model, lang_delta, task_delta):
    expected = dense_sum(ner_model, [(task_delta, 1.0), (lang_delta, 1.0)])
    composed = compose(tiny_base_dir, [lang_delta, task_delta], device="cpu")
    for name, param in base_parameters(composed.model).items():
        torch.testing.assert_close(param.double(), expected[name], rtol=0, atol=1e-6)
    for name, tensor in task_delta.head.items():
        assert torch.equal(composed.model.get_parameter(name), tensor)
    assert composed.model.config.id2label == dict(enumerate(NER_LABELS))
    assert [d.kind for d in composed.deltas] == ["task", "language"]


def test_compose_in_bf16(tiny_base_dir, ner_model, lang_delta, task_delta):
    expected = dense_sum(ner_model, [(task_delta, 1.0)])
    composed = compose(tiny_base_dir, [task_delta], device="cpu", dtype="bf16")
    for name, param in base_parameters(composed.model).items():
        assert param.dtype == torch.bfloat16
        base_bf16 = base_parameters(ner_model)[name].detach().to(torch.bfloat16).float()
        sparse = expected[name] - base_parameters(ner_model)[name].double()
        assert torch.equal(param, (base_bf16 + sparse.float()).to(torch.bfloat16)), name


def test_hot_swap_and_remove_restore_exact_weights(tiny_base_dir, ner_model, lang_delta, task_delta):
    other_lang = synthetic_delta(ner_model, density=0.05, seed=99, kind="language", language="en")
    composed = compose(tiny_base_dir, [task_delta], device="cpu")
    with_task = snapshot(composed.model)
    composed.add(lang_delta)
    composed.swap(language=other_lang)
    expected = dense_sum(ner_model, [(task_delta, 1.0), (other_lang, 1.0)])
    for name, param in base_parameters(composed.model).items():
        torch.testing.assert_close(param.double(), expected[name], rtol=0, atol=1e-6)
    composed.remove(other_lang)
    assert_bit_identical(composed.model, with_task)
    # removing a delta below another one: the later delta is reverted and re-applied
    composed.add(lang_delta)
    composed.remove(task_delta)
    expected = dense_sum(ner_model, [(lang_delta, 1.0)])
    for name, param in base_parameters(composed.model).items():
        torch.testing.assert_close(param.double(), expected[name], rtol=0, atol=1e-6)
    composed.reset()
    head = tuple(head_parameters(composed.model))
    assert_bit_identical(composed.model, snapshot(ner_model), skip=head)
    assert composed.deltas == []


def test_second_task_head_must_be_swapped_not_added(tiny_base_dir, ner_model, task_delta):
    other = synthetic_delta(ner_model, density=0.05, seed=5, kind="task", task="pos",
                            task_type="token-classification", labels=NER_LABELS)
    composed = compose(tiny_base_dir, [task_delta], device="cpu")
    with pytest.raises(BaseModelMismatchError, match="already applied"):
        composed.add(other)
    composed.swap(task=other)
    assert [d.name for d in composed.deltas] == ["pos"]


def test_language_delta_composes_on_every_head(tiny_bert_dir):
    """The pooler exists only for some heads; fingerprints ignore it so one language delta fits all."""
    mlm = load_model(tiny_bert_dir, "masked-lm")
    delta = synthetic_delta(mlm, density=0.05, seed=1, kind="language", language="hau")
    seq = load_model(tiny_bert_dir, "sequence-classification", ["a", "b"])
    assert "pooler.dense.weight" in base_parameters(seq) and "pooler.dense.weight" not in base_parameters(mlm)
    assert fingerprint(seq) == fingerprint(mlm)
    composed = compose(tiny_bert_dir, [delta], device="cpu")  # AutoModel, with a pooler
    assert composed.deltas == [delta]
    original = snapshot(seq)
    with delta.applied(seq):
        pass
    assert_bit_identical(seq, original)


def test_saved_composition_runs_in_transformers_pipeline(tmp_path, tiny_bert_dir):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    lang = synthetic_delta(model, density=0.05, seed=1, kind="language", language="hau")
    task = synthetic_delta(model, density=0.05, seed=2, kind="task", task="ner",
                           task_type="token-classification", labels=NER_LABELS)
    composed = compose(tiny_bert_dir, [task, lang], device="cpu")
    sentence = "shugaban kasar najeriya buhari ya ce a kano"
    live = pipeline("token-classification", model=composed.model, tokenizer=composed.tokenizer, device="cpu")(sentence)
    out = composed.save(tmp_path / "composed")
    reloaded = AutoModelForTokenClassification.from_pretrained(out)
    assert reloaded.config.id2label == dict(enumerate(NER_LABELS))
    for name, param in reloaded.state_dict().items():
        assert torch.equal(param, composed.model.state_dict()[name]), name
    from_dir = pipeline("token-classification", model=str(out), device="cpu")(sentence)
    assert [(t["word"], t["entity"]) for t in from_dir] == [(t["word"], t["entity"]) for t in live]
    assert len(live) == len(sentence.split())
    assert (out / "sft_composition.json").is_file()


def test_fingerprint_samples_stay_in_range_for_large_parameters():
    from sftstore.modeling import sample_positions

    for numel in (1, 2, 63, 64, 65, 2**24 + 1, 192_001_536, 250_002 * 768, 2**31 + 7):
        positions = sample_positions(numel)
        assert positions[0] == 0 and positions[-1] == numel - 1
        assert len(positions) == min(64, numel)
        assert bool((positions[1:] > positions[:-1]).all())


def test_a_refused_swap_leaves_the_composition_as_it_was(tiny_base_dir, ner_model, task_delta, lang_delta):
    from sftstore.modeling import load_model

    composed = compose(tiny_base_dir, [task_delta, lang_delta], device="cpu")
    before = snapshot(composed.model)
    five = load_model(tiny_base_dir, "token-classification", ["O", "A", "B", "C", "D"])
    other_head = synthetic_delta(five, 0.05, 4, kind="task", task="pos", task_type="token-classification",
                                 labels=["O", "A", "B", "C", "D"])
    with pytest.raises(BaseModelMismatchError, match="head::classifier.weight"):
        composed.swap(task=other_head)
    assert composed.deltas == [task_delta, lang_delta]
    assert_bit_identical(composed.model, before)
    assert composed.model.config.id2label == dict(enumerate(NER_LABELS))
