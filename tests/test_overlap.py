"""Support overlap between deltas (and masks): exact Jaccard, per layer/module, signs, correlation, `sft overlap`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sftstore.analysis import (
    SupportView, jaccard_matrix, mask_overlap_matrix, module_type, overlap_matrix, support_overlap,
)
from sftstore.delta import SparseDelta, config_for_base
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import load_model
from sftstore.store import DeltaStore
from sftstore.train.masks import jaccard as mask_jaccard
from sftstore_cli.common import SftGroup
from sftstore_cli.overlap import overlap_command

EMB = "embeddings.word_embeddings.weight"
QUERY = "encoder.layer.0.attention.self.query.weight"
INTER = "encoder.layer.0.intermediate.dense.weight"
LN = "encoder.layer.1.attention.output.LayerNorm.weight"
OUT = "encoder.layer.1.output.dense.weight"
SHAPES = {EMB: (4, 5), QUERY: (4, 4), INTER: (2, 4), LN: (4,), OUT: (4, 2)}


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    return load_model(tiny_bert_dir, "token-classification", NER_LABELS)


@pytest.fixture(scope="module")
def config(model):
    return config_for_base(model, kind="language", language="x")


def make(config, entries: dict[str, tuple[list[int], list[float]]]) -> SparseDelta:
    tensors = {n: (torch.tensor(i, dtype=torch.int32), torch.tensor(v, dtype=torch.float32)) for n, (i, v) in entries.items()}
    return SparseDelta.from_tensors(tensors, {n: SHAPES[n] for n in entries}, config)


@pytest.fixture(scope="module")
def pair(config):
    a = make(config, {EMB: ([0, 3, 7], [1, -2, 3]), QUERY: ([1, 2, 5, 9], [0.5, 0.5, -1, 2]),
                      INTER: ([0, 1], [1, 1]), OUT: ([6], [-3])})
    b = make(config, {EMB: ([3, 7, 8], [-1, 4, 1]), QUERY: ([1, 5, 9, 10], [1, -2, -1, 1]),
                      LN: ([0], [1]), OUT: ([6], [-0.5])})
    return a, b


def to_masks(delta: SparseDelta) -> dict[str, torch.Tensor]:
    return {n: e.to_dense() != 0 for n, e in delta.params.items()}


def test_module_type():
    assert module_type(EMB) == "embeddings"
    assert module_type("embeddings.LayerNorm.weight") == "layernorm"
    assert module_type(QUERY) == "attention"
    assert module_type("encoder.layer.0.attention.output.dense.weight") == "attention"
    assert module_type(LN) == "layernorm"
    assert module_type(INTER) == "ffn"
    assert module_type(OUT) == "ffn"
    assert module_type("pooler.dense.weight") == "pooler"
    assert module_type("something.else") == "other"


def test_exact_overlap_by_hand(pair):
    a, b = pair
    r = support_overlap(a, b, name_a="a", name_b="b")
    assert (r.a, r.b, r.nnz_a, r.nnz_b, r.intersection, r.union) == ("a", "b", 10, 9, 6, 13)
    assert r.jaccard == pytest.approx(6 / 13)
    assert list(r.by_layer) == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    assert {k: g.jaccard for k, g in r.by_layer.items()} == pytest.approx(
        {"embeddings": 2 / 4, "encoder.layer.0": 3 / 7, "encoder.layer.1": 1 / 2})
    assert list(r.by_module) == ["embeddings", "attention", "ffn", "layernorm"]
    assert {k: g.jaccard for k, g in r.by_module.items()} == pytest.approx(
        {"embeddings": 2 / 4, "attention": 3 / 5, "ffn": 1 / 3, "layernorm": 0.0})
    assert r.density_a == pytest.approx({"embeddings": 3 / 20, "encoder.layer.0": 6 / 24, "encoder.layer.1": 1 / 8})
    assert r.density_b == pytest.approx({"embeddings": 3 / 20, "encoder.layer.0": 4 / 16, "encoder.layer.1": 2 / 12})
    # shared entries: (a value, b value)
    shared = np.array([(-2, -1), (3, 4), (0.5, 1), (-1, -2), (2, -1), (-3, -0.5)])
    assert r.sign_agreement == pytest.approx(np.mean(np.sign(shared[:, 0]) == np.sign(shared[:, 1])))
    assert r.sign_agreement == pytest.approx(5 / 6)
    assert r.correlation == pytest.approx(np.corrcoef(shared[:, 0], shared[:, 1])[0, 1])
    # symmetric in the supports
    assert support_overlap(b, a).jaccard == pytest.approx(r.jaccard)
    json.dumps(r.to_dict())


def test_identical_disjoint_and_empty(pair, config):
    a, _ = pair
    same = support_overlap(a, a)
    assert (same.jaccard, same.sign_agreement) == (1.0, 1.0)
    assert same.correlation == pytest.approx(1.0)
    assert all(g.jaccard == 1.0 for g in [*same.by_layer.values(), *same.by_module.values()])
    other = make(config, {EMB: ([1, 2], [1, 1]), QUERY: ([0, 3], [1, 2]), LN: ([1], [5])})
    disjoint = support_overlap(a, other)
    assert (disjoint.intersection, disjoint.jaccard, disjoint.sign_agreement, disjoint.correlation) == (0, 0.0, None, None)
    # a single shared entry: sign agreement is defined, correlation is not
    one = support_overlap(a, make(config, {EMB: ([0], [-4])}))
    assert (one.intersection, one.sign_agreement, one.correlation) == (1, 0.0, None)
    # zero variance on one side: no correlation
    flat = support_overlap(make(config, {INTER: ([0, 1], [1, 1])}), make(config, {INTER: ([0, 1], [1, 2])}))
    assert flat.correlation is None and flat.sign_agreement == 1.0
    empty = support_overlap(make(config, {}), make(config, {}))
    assert (empty.jaccard, empty.union, empty.by_layer) == (1.0, 0, {})


def test_random_against_numpy(config):
    gen = torch.Generator().manual_seed(0)
    shape = (40, 25)
    field = torch.randn(1000, generator=gen)  # shared signal, so the values on common entries correlate
    dense = []
    for _ in range(2):
        idx = torch.randperm(1000, generator=gen)[:300].sort().values
        dense.append((idx, field[idx] + 0.5 * torch.randn(300, generator=gen)))
    common = np.intersect1d(dense[0][0].numpy(), dense[1][0].numpy())
    assert len(common) > 10
    tensors = [{QUERY: (i.int(), v)} for i, v in dense]
    deltas = [SparseDelta.from_tensors(t, {QUERY: shape}, config) for t in tensors]
    r = support_overlap(*deltas)
    da, db = (d.params[QUERY].to_dense().numpy().ravel() for d in deltas)
    both = (da != 0) & (db != 0)
    either = (da != 0) | (db != 0)
    assert r.intersection == both.sum() and r.union == either.sum()
    assert r.jaccard == pytest.approx(both.sum() / either.sum())
    assert r.sign_agreement == pytest.approx(np.mean(np.sign(da[both]) == np.sign(db[both])))
    assert r.correlation == pytest.approx(np.corrcoef(da[both], db[both])[0, 1])
    assert mask_jaccard(to_masks(deltas[0]), to_masks(deltas[1])) == pytest.approx(r.jaccard)


def test_masks_path_equals_delta_path(pair, lang_delta, task_delta):
    for a, b in (pair, (lang_delta, task_delta)):
        from_deltas = support_overlap(a, b)
        from_masks = support_overlap(SupportView.from_masks(to_masks(a), "a"), SupportView.from_masks(to_masks(b), "b"))
        assert from_masks.jaccard == from_deltas.jaccard
        assert (from_masks.intersection, from_masks.union) == (from_deltas.intersection, from_deltas.union)
        assert from_masks.by_layer == from_deltas.by_layer
        assert from_masks.by_module == from_deltas.by_module
        assert from_masks.density_a == pytest.approx(from_deltas.density_a)
        assert (from_masks.sign_agreement, from_masks.correlation) == (None, None)
        assert mask_jaccard(to_masks(a), to_masks(b)) == pytest.approx(from_deltas.jaccard)
        # a mask view against a delta view compares supports too
        assert support_overlap(SupportView.from_masks(to_masks(a), "a"), b).jaccard == from_deltas.jaccard


def test_overlap_matrix_and_masks_matrix(pair, config):
    a, b = pair
    c = make(config, {EMB: ([0], [1.0])})
    reports = overlap_matrix({"a": a, "b": b, "c": c})
    assert list(reports) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert reports[("a", "b")].jaccard == pytest.approx(6 / 13)
    assert reports[("a", "c")].jaccard == pytest.approx(1 / 10)
    assert reports[("b", "c")].jaccard == 0.0
    matrix = jaccard_matrix(["a", "b", "c"], reports)
    assert matrix == [[1.0, 6 / 13, 1 / 10], [6 / 13, 1.0, 0.0], [1 / 10, 0.0, 1.0]]
    by_masks = mask_overlap_matrix({"a": to_masks(a), "b": to_masks(b), "c": to_masks(c)})
    assert {k: r.jaccard for k, r in by_masks.items()} == {k: r.jaccard for k, r in reports.items()}
    with pytest.raises(ValueError, match="expected torch.bool"):
        SupportView.from_masks({EMB: torch.zeros(4, 5)}, "bad")


# ---- the command line ----------------------------------------------------------------------------

def run(*args, code: int = 0):
    group = SftGroup(commands={"overlap": overlap_command})
    result = CliRunner().invoke(group, ["overlap", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture
def stored(model):
    store = DeltaStore()
    deltas = {
        "hau": synthetic_delta(model, density=0.3, seed=1, kind="language", language="hau"),
        "yor": synthetic_delta(model, density=0.3, seed=2, kind="language", language="yor"),
        "ner": synthetic_delta(model, density=0.2, seed=3, kind="task", task="ner",
                               task_type="token-classification", labels=NER_LABELS),
    }
    for delta in deltas.values():
        store.add(delta)
    return deltas


def test_cli_table(stored):
    out = run("lang/hau", "lang/yor", "task/ner").output
    assert "Jaccard of supports" in out and "same sign" in out and "corr" in out
    assert "…" not in out  # fits 80 columns
    assert "lang/hau@1" in out and "task/ner@1" in out
    by_layer = run("lang/hau", "lang/yor", "--by", "layer").output
    assert "Jaccard per layer" in by_layer and "embeddings" in by_layer and "encoder.layer.0" in by_layer
    by_module = run("lang/hau", "lang/yor", "--by", "module").output
    assert "Jaccard per module" in by_module and "attention" in by_module and "ffn" in by_module


def test_cli_json(stored):
    data = json.loads(run("lang/hau", "lang/yor", "task/ner", "--json").output)
    assert data["refs"] == ["lang/hau@1", "lang/yor@1", "task/ner@1"]
    expected = support_overlap(stored["hau"], stored["yor"])
    assert data["jaccard"][0][1] == data["jaccard"][1][0] == pytest.approx(expected.jaccard)
    assert [data["jaccard"][i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    first = data["pairs"][0]
    assert (first["a"], first["b"]) == ("lang/hau@1", "lang/yor@1")
    assert first["intersection"] == expected.intersection
    assert first["sign_agreement"] == pytest.approx(expected.sign_agreement)
    assert first["correlation"] == pytest.approx(expected.correlation)
    assert set(first["by_module"]) <= {"embeddings", "attention", "ffn", "layernorm", "pooler", "other"}
    assert all(0.0 < d <= 1.0 for d in first["density_a"].values())


def test_cli_errors(stored):
    assert "at least two" in run("lang/hau", code=2).output
    assert "at least two" in run("lang/hau", "lang/hau@1", code=2).output
    assert "no delta lang/xxx" in run("lang/hau", "lang/xxx", code=1).output


def test_cli_plot(stored, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "overlap.png"
    result = run("lang/hau", "lang/yor", "task/ner", "--plot", str(out))
    assert f"heatmap saved to {out}" in result.output.replace("\n", "")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib(stored, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = run("lang/hau", "lang/yor", "--plot", str(tmp_path / "x.png"), code=2)
    assert "pip install matplotlib" in result.output and "sftstore[plot]" in result.output
    assert not (tmp_path / "x.png").exists()
