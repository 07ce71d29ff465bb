"""`merge_deltas` (weighted sum, TIES) and `sft merge`: exact results on small hand-built deltas."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sftstore.config import BaseModelInfo, DeltaConfig
from sftstore.delta import SparseDelta
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.errors import BaseModelMismatchError
from sftstore.merge import MergeError, merge_deltas
from sftstore.modeling import load_model
from sftstore.store import DeltaStore
from sftstore_cli.common import SftGroup
from sftstore_cli.merge import merge_command

SHAPES = {"encoder.w": (4, 5), "encoder.b": (5,), "embeddings.e": (3, 2)}


def _base(weights_digest: str = "w" * 16) -> BaseModelInfo:
    return BaseModelInfo(id="test/tiny", arch_digest="a" * 16, weights_digest=weights_digest)


def make_delta(entries, *, kind="language", name="hau", base=None, head=None, labels=None) -> SparseDelta:
    """`entries`: {param: {flat index: value}}."""
    fields = {"language": name} if kind == "language" else {
        "task": name, "task_type": "token-classification", "labels": labels or ["O", "B-PER"]}
    config = DeltaConfig(kind=kind, base_model=base or _base(), num_parameters=51, **fields)
    tensors, shapes = {}, {}
    for pname, values in entries.items():
        idx = sorted(values)
        tensors[pname] = (torch.tensor(idx, dtype=torch.int32), torch.tensor([values[i] for i in idx], dtype=torch.float32))
        shapes[pname] = SHAPES[pname]
    return SparseDelta.from_tensors(tensors, shapes, config, head)


def random_delta(seed: int, density: float = 0.4, **kwargs) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for pname, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        mask = torch.rand(numel, generator=g) < density
        vals = torch.randn(numel, generator=g)
        entries[pname] = {int(i): float(vals[i]) for i in mask.nonzero().flatten()}
    return make_delta(entries, **kwargs)


def dense(delta: SparseDelta, pname: str) -> torch.Tensor:
    entry = delta.params.get(pname)
    return entry.to_dense() if entry is not None else torch.zeros(SHAPES[pname])


def support(delta: SparseDelta, pname: str) -> set[int]:
    entry = delta.params.get(pname)
    return set(entry.indices.tolist()) if entry is not None else set()


@pytest.mark.parametrize("weights", [None, [0.7, -1.25, 2.0]])
def test_sum_equals_dense_reference(weights):
    deltas = [random_delta(s, name=f"l{s}") for s in (1, 2, 3)]
    merged = merge_deltas(deltas, method="sum", weights=weights, name="mix")
    w = weights or [1 / 3] * 3
    assert merged.config.method == {"name": "merge-sum", "weights": [float(x) for x in w]}
    for pname in SHAPES:
        reference = torch.zeros(SHAPES[pname])
        for delta, wi in zip(deltas, w):
            reference = reference + dense(delta, pname) * wi
        assert torch.equal(dense(merged, pname), reference), pname
        union = set().union(*(support(d, pname) for d in deltas))
        assert support(merged, pname) <= union
        assert support(merged, pname) == {i for i in union if reference.view(-1)[i] != 0}
        entry = merged.params[pname]
        assert entry.indices.dtype == torch.int32 and bool((entry.indices[1:] > entry.indices[:-1]).all())
        assert bool((entry.values != 0).all())


def test_sum_drops_cancelling_entries_and_unions_parameters():
    a = make_delta({"encoder.w": {0: 1.0, 3: 2.0}}, name="a")
    b = make_delta({"encoder.w": {0: -1.0, 7: 4.0}, "encoder.b": {2: 0.5}}, name="b")
    merged = merge_deltas([a, b], method="sum", weights=[1, 1], name="ab")
    assert merged.params["encoder.w"].indices.tolist() == [3, 7]
    assert merged.params["encoder.w"].values.tolist() == [2.0, 4.0]
    assert merged.params["encoder.b"].indices.tolist() == [2]
    assert merged.nnz == 3 and merged.kind == "language" and merged.name == "ab"
    assert merged.config.languages == ["a", "b"]


def test_ties_trim_elect_disjoint_mean_exact():
    # a: nnz 5, trim 0.2 keeps ceil(0.8 * 5) = 4: |0.5| at index 4 is trimmed.
    a = make_delta({"encoder.w": {0: 4.0, 1: -2.0, 2: 3.0, 3: 1.0, 4: 0.5}}, name="a")
    # b: nnz 5, keeps 4: |-0.25| at index 9 is trimmed.
    b = make_delta({"encoder.w": {0: 2.0, 1: 6.0, 2: -3.0, 4: -1.0, 9: -0.25}}, name="b")
    # c: nnz 1, keeps ceil(0.8) = 1.
    c = make_delta({"encoder.w": {0: -8.0}}, name="c")
    merged = merge_deltas([a, b, c], method="ties", trim=0.2, name="t")
    # idx 0: 4 + 2 - 8 = -2 -> sign -, agreeing: -8 -> -8
    # idx 1: -2 + 6 = 4 -> +, agreeing: 6 -> 6
    # idx 2: 3 - 3 = 0 -> no elected sign -> dropped
    # idx 3: 1 -> 1
    # idx 4: a's 0.5 trimmed, b's -1 -> -1
    # idx 9: b's -0.25 trimmed -> absent
    entry = merged.params["encoder.w"]
    assert entry.indices.tolist() == [0, 1, 3, 4]
    assert entry.values.tolist() == [-8.0, 6.0, 1.0, -1.0]
    assert merged.config.method == {"name": "merge-ties", "weights": [1.0, 1.0, 1.0], "trim": 0.2}

    # Disjoint mean over several agreeing values, and weights applied before the election.
    x = make_delta({"encoder.b": {0: 1.0, 1: 3.0}}, name="x")
    y = make_delta({"encoder.b": {0: 3.0, 1: -1.0}}, name="y")
    z = make_delta({"encoder.b": {0: -1.0, 1: -1.0}}, name="z")
    plain = merge_deltas([x, y, z], method="ties", trim=0.0, name="p").params["encoder.b"]
    assert plain.values.tolist() == [2.0, 3.0]  # idx 0: + wins, mean(1, 3); idx 1: 3-1-1 = 1 > 0, 3
    weighted = merge_deltas([x, y, z], method="ties", trim=0.0, weights=[1.0, 1.0, 4.0], name="w").params["encoder.b"]
    # idx 0: 1 + 3 - 4 = 0 -> dropped; idx 1: 3 - 1 - 4 = -2 -> mean(-1, -4) = -2.5
    assert weighted.indices.tolist() == [1] and weighted.values.tolist() == [-2.5]


def test_ties_ties_at_threshold_are_kept():
    a = make_delta({"encoder.b": {0: 1.0, 1: -1.0, 2: 1.0, 3: 3.0}}, name="a")
    merged = merge_deltas([a], method="ties", trim=0.5, name="t")  # keep ceil(2): threshold 1.0, all |1| kept
    assert merged.params["encoder.b"].indices.tolist() == [0, 1, 2, 3]
    merged = merge_deltas([a], method="ties", trim=0.75, name="t")  # keep 1: only 3.0
    assert merged.params["encoder.b"].indices.tolist() == [3]


def test_ties_support_within_union_random():
    deltas = [random_delta(s, name=f"l{s}") for s in (4, 5, 6)]
    merged = merge_deltas(deltas, method="ties", trim=0.3, name="mix")
    for pname in SHAPES:
        assert support(merged, pname) <= set().union(*(support(d, pname) for d in deltas))
    assert 0 < merged.nnz <= sum(d.nnz for d in deltas)


def test_mismatched_base_is_refused_naming_both_digests():
    a = make_delta({"encoder.b": {0: 1.0}}, name="a")
    b = make_delta({"encoder.b": {0: 1.0}}, name="b", base=_base("v" * 16))
    with pytest.raises(BaseModelMismatchError) as info:
        merge_deltas([a, b], method="sum", name="ab")
    assert "w" * 16 in str(info.value) and "v" * 16 in str(info.value)


def test_mixed_kinds_and_labels_are_refused():
    head = {"classifier.weight": torch.ones(2, 3)}
    lang = make_delta({"encoder.b": {0: 1.0}}, name="hau")
    task = make_delta({"encoder.b": {1: 1.0}}, kind="task", name="ner", head=head)
    with pytest.raises(MergeError, match="different kinds"):
        merge_deltas([lang, task], method="sum", name="x")
    forced = merge_deltas([lang, task], method="sum", name="x", kind="task")
    assert forced.kind == "task" and torch.equal(forced.head["classifier.weight"], head["classifier.weight"])
    other = make_delta({"encoder.b": {1: 1.0}}, kind="task", name="ner2", head=head, labels=["O", "B-LOC"])
    with pytest.raises(MergeError, match="labels"):
        merge_deltas([task, other], method="sum", name="x")


def test_task_heads_are_weighted_averages():
    t1 = make_delta({"encoder.b": {0: 1.0}}, kind="task", name="a", head={"classifier.bias": torch.tensor([1.0, 2.0])})
    t2 = make_delta({"encoder.b": {0: 1.0}}, kind="task", name="b", head={"classifier.bias": torch.tensor([3.0, 6.0])})
    merged = merge_deltas([t1, t2], method="sum", weights=[1.0, 3.0], name="ab")
    assert merged.head["classifier.bias"].tolist() == [2.5, 5.0]
    assert merged.config.labels == ["O", "B-PER"] and merged.config.task_type == "token-classification"
    t3 = make_delta({"encoder.b": {0: 1.0}}, kind="task", name="c", head={"classifier.bias": torch.zeros(3)})
    with pytest.raises(MergeError, match="head"):
        merge_deltas([t1, t3], method="sum", name="x")


def test_merge_of_real_model_deltas(tiny_bert_dir):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    a = synthetic_delta(model, density=0.05, seed=1, kind="language", language="hau")
    b = synthetic_delta(model, density=0.05, seed=2, kind="language", language="yor")
    merged = merge_deltas([a, b], method="sum", name="hau-yor")
    for pname, entry in merged.params.items():
        reference = (dense_of(a, pname, entry.shape) * 0.5) + (dense_of(b, pname, entry.shape) * 0.5)
        assert torch.equal(entry.to_dense(), reference)
    assert merged.config.base_model == a.config.base_model and merged.num_parameters == a.num_parameters
    merged.check_fits(model)


def dense_of(delta, pname, shape):
    entry = delta.params.get(pname)
    return entry.to_dense() if entry is not None else torch.zeros(shape)


def _cli():
    group = SftGroup()
    group.add_command(merge_command)
    return group


def test_cli_merge_stores_lineage():
    store = DeltaStore()
    va, _ = store.add(random_delta(1, name="hau"), source={"type": "test"})
    vb, _ = store.add(random_delta(2, name="yor"), source={"type": "test"})
    runner = CliRunner()
    result = runner.invoke(_cli(), ["merge", "lang/hau", "lang/yor@1", "--into", "hau-yor", "--method", "ties",
                                    "--weights", "1,2", "--trim", "0.25", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["ref"] == "lang/hau-yor@1" and out["created"] is True
    assert out["source"] == {"type": "merge", "method": "merge-ties", "inputs": ["lang/hau@1", "lang/yor@1"]}
    manifest = store.manifest(store.resolve("lang/hau-yor"))
    assert manifest["method"] == {"name": "merge-ties", "weights": [1.0, 2.0], "trim": 0.25}
    merged_from = manifest["lineage"]["merged_from"]
    assert [m["ref"] for m in merged_from] == [va.ref, vb.ref]
    assert [m["tensors_sha256"] for m in merged_from] == [va.tensors_sha256, vb.tensors_sha256]
    assert [m["nnz"] for m in merged_from] == [va.nnz, vb.nnz]
    stored = store.load("lang/hau-yor")
    expected = merge_deltas([store.load(va), store.load(vb)], method="ties", weights=[1, 2], trim=0.25, name="hau-yor")
    for pname, entry in expected.params.items():
        assert torch.equal(stored.params[pname].indices, entry.indices)
        assert torch.equal(stored.params[pname].values, entry.values)

    text = runner.invoke(_cli(), ["merge", "lang/hau", "lang/yor", "--into", "avg"], catch_exceptions=False)
    assert text.exit_code == 0 and "lang/avg@1" in text.output and "density" in text.output


def test_cli_merge_errors_are_clean():
    store = DeltaStore()
    store.add(random_delta(1, name="hau"))
    store.add(make_delta({"encoder.b": {0: 1.0}}, kind="task", name="ner", head={"classifier.bias": torch.zeros(2)}))
    result = CliRunner().invoke(_cli(), ["merge", "lang/hau", "task/ner", "--into", "x"])
    assert result.exit_code == 1 and "different kinds" in result.output
    result = CliRunner().invoke(_cli(), ["merge", "lang/hau", "lang/hau", "--into", "x", "--weights", "1"])
    assert result.exit_code == 1 and "1 weight(s) given for 2 deltas" in result.output
