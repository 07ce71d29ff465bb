"""Masks for sparse fine-tuning: exact global top-K (LT-SFT), random (Rand-SFT), bias (BitFit), helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sftstore.train.masks import (
    bias_mask,
    jaccard,
    lottery_ticket_mask,
    mask_nnz,
    masks_union,
    parse_budget,
    random_mask,
    top_k_mask,
)

# ---- brute-force reference ------------------------------------------------------------------------


def reference_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Concatenate all scores (sorted names, flat order), order by (score desc, position asc), take k."""
    names = sorted(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names]).numpy().astype(np.float64)
    flat = flat + 0.0  # -0.0 -> 0.0
    order = np.lexsort((np.arange(flat.size), -flat))[:k]  # last key is primary: score descending
    selected = np.zeros(flat.size, dtype=bool)
    selected[order] = True
    masks, offset = {}, 0
    for name in names:
        numel = scores[name].numel()
        masks[name] = torch.from_numpy(selected[offset : offset + numel].copy()).view(scores[name].shape)
        offset += numel
    return masks


def assert_masks_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, mask in got.items():
        assert mask.dtype == torch.bool and mask.shape == expected[name].shape, name
        assert torch.equal(mask, expected[name]), f"{name}: {mask.tolist()} != {expected[name].tolist()}"


# Names deliberately out of sorted order (and with "layer.10" < "layer.2" as strings).
NAMES = ["layer.2.weight", "embeddings.weight", "layer.10.bias", "layer.10.weight", "a"]


def random_scores(kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 2, 4), (0, 4), (1,)]
    scores = {}
    for name, shape in zip(NAMES, shapes):
        if kind == "continuous":
            value = torch.rand(shape, generator=g)
        elif kind == "integer-ties":
            value = torch.randint(0, 4, shape, generator=g).float()
        elif kind == "all-zero":
            value = torch.zeros(shape)
        elif kind == "wide-range":  # subnormals to huge, zeros and +inf: many different high bins
            value = torch.exp(torch.empty(shape).uniform_(-100, 80, generator=g)) * torch.randint(0, 2, shape, generator=g)
            if value.numel() > 3:
                value.view(-1)[:2] = torch.tensor([torch.inf, 1e-45])  # +inf and the smallest subnormal
        elif kind == "adjacent-floats":  # all in one high bin: only the low 16 bits differ
            bits = torch.randint(0, 40, shape, generator=g, dtype=torch.int32) + 0x3F800000
            value = bits.view(torch.float32)
        else:
            raise AssertionError(kind)
        scores[name] = value
    return scores


KINDS = ["continuous", "integer-ties", "all-zero", "wide-range", "adjacent-floats"]


# ---- top_k_mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_top_k_matches_brute_force(kind, seed):
    scores = random_scores(kind, seed)
    total = sum(s.numel() for s in scores.values())
    ks = sorted({1, 2, total // 3, total // 2, total - 1, total, 1 + seed * 7 % total})
    for k in ks:
        expected = reference_top_k(scores, k)
        for chunk_size in (1, 4, 11, 2**22):
            got = top_k_mask(scores, k, chunk_size=chunk_size)
            assert list(got) == list(scores)  # the mapping's order is kept
            assert_masks_equal(got, expected)
            assert mask_nnz(got) == k


def test_top_k_many_parameters_many_ties():
    g = torch.Generator().manual_seed(5)
    scores = {f"p{i:02d}": torch.randint(0, 3, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).float()
              for i in range(30)}
    total = sum(s.numel() for s in scores.values())
    for k in range(1, total + 1, 17):
        assert_masks_equal(top_k_mask(scores, k, chunk_size=8), reference_top_k(scores, k))


def test_tie_rule_is_name_then_index():
    scores = {"b": torch.tensor([1.0, 1.0]), "a": torch.tensor([[1.0, 0.0], [1.0, 2.0]])}
    masks = top_k_mask(scores, 3)
    assert masks["a"].tolist() == [[True, False], [True, True]]
    assert masks["b"].tolist() == [False, False]
    masks = top_k_mask(scores, 4, chunk_size=1)
    assert masks["a"].tolist() == [[True, False], [True, True]] and masks["b"].tolist() == [True, False]


def test_callables_and_tensors_give_identical_masks():
    scores = random_scores("integer-ties", 3)
    calls = {name: 0 for name in scores}

    def lazy(name):
        def score():
            calls[name] += 1
            return scores[name].clone()

        return score

    for k in (1, 9, 30):
        from_tensors = top_k_mask(scores, k, chunk_size=3)
        from_callables = top_k_mask({name: lazy(name) for name in scores}, k, chunk_size=3)
        assert_masks_equal(from_callables, from_tensors)
    assert set(calls.values()) == {9}  # three passes, three calls of each


def test_other_score_dtypes():
    g = torch.Generator().manual_seed(0)
    scores = {"x": torch.randint(0, 5, (4, 6), generator=g), "y": torch.rand(10, generator=g, dtype=torch.float64)}
    for dtype_scores in (scores, {n: s.half() for n, s in scores.items()}):
        got = top_k_mask(dtype_scores, 11, chunk_size=5)
        assert_masks_equal(got, reference_top_k(dtype_scores, 11))


def test_negative_zero_counts_as_zero():
    scores = {"a": torch.tensor([-0.0, 0.0, 1.0, -0.0]), "b": torch.tensor([0.0, -0.0])}
    for k in range(1, 7):
        assert_masks_equal(top_k_mask(scores, k, chunk_size=3), reference_top_k(scores, k))


def test_k_zero_and_empty():
    masks = top_k_mask({"a": torch.rand(3), "b": torch.rand(2, 2)}, 0)
    assert mask_nnz(masks) == 0 and masks["b"].shape == (2, 2)
    assert top_k_mask({}, 0) == {}


def test_nan_and_bad_input_raise():
    good = torch.rand(5)
    with pytest.raises(ValueError, match="'layer.1.weight' contain NaN"):
        top_k_mask({"a": good, "layer.1.weight": torch.tensor([0.5, float("nan")])}, 2)
    with pytest.raises(ValueError, match="'w' contain NaN"):
        top_k_mask({"w": torch.tensor([0.5, -float("nan")])}, 1, chunk_size=1)
    with pytest.raises(ValueError, match="'w' contain negative"):
        top_k_mask({"w": torch.tensor([0.5, -1.0])}, 1)
    with pytest.raises(ValueError, match="outside"):
        top_k_mask({"a": good}, 6)
    with pytest.raises(ValueError, match="outside"):
        top_k_mask({"a": good}, -1)
    with pytest.raises(TypeError):
        top_k_mask({"a": good}, 2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        top_k_mask({"a": good}, 2, chunk_size=0)
    with pytest.raises(TypeError, match="'a'"):
        top_k_mask({"a": lambda: [1.0]}, 1)


def test_scores_that_change_between_passes_are_detected():
    state = {"n": 0}

    def drifting():
        state["n"] += 1
        return torch.arange(10, dtype=torch.float32) * state["n"]

    with pytest.raises(RuntimeError, match="changed between passes"):
        top_k_mask({"a": drifting}, 3)


# ---- lottery_ticket_mask ----------------------------------------------------------------------------


def test_lottery_ticket_matches_top_k_of_abs_diff():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model[0].bias[:3] = theta0["0.bias"][:3]  # some exact zeros (ties)
    current = dict(model.named_parameters())
    diffs = {name: (current[name].detach() - theta0[name]).abs() for name in current}
    total = sum(d.numel() for d in diffs.values())
    for k in (1, 10, 50, total):
        expected = reference_top_k(diffs, k)
        for chunk_size in (1, 7, 2**22):
            assert_masks_equal(lottery_ticket_mask(current, theta0, k, chunk_size=chunk_size), expected)
            lazy = {name: (lambda t=t: t.clone()) for name, t in theta0.items()}
            assert_masks_equal(lottery_ticket_mask(current, lazy, k, chunk_size=chunk_size), expected)


def test_lottery_ticket_half_precision_and_errors():
    cur = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)}
    ref = {"w": torch.tensor([1.0, 1.0, 1.0])}
    assert lottery_ticket_mask(cur, ref, 1)["w"].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="no values"):
        lottery_ticket_mask(cur, {}, 1)
    with pytest.raises(ValueError, match="shape"):
        lottery_ticket_mask(cur, {"w": torch.zeros(4)}, 1)
    with pytest.raises(ValueError, match="'w' contain NaN"):
        lottery_ticket_mask({"w": torch.tensor([float("nan"), 1.0])}, {"w": torch.zeros(2)}, 1)


# ---- parse_budget -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, expected",
    [
        ("7.6M", 7_600_000), ("14.2M", 14_200_000), ("500k", 500_000), ("500K", 500_000), ("1e6", 1_000_000),
        ("123456", 123_456), (" 2.5 m ", 2_500_000), ("7_600_000", 7_600_000), ("1.5B", 1_500_000_000),
        (".5k", 500), (42, 42),
    ],
)
def test_parse_budget_counts(count, expected):
    assert parse_budget(count, None, 2_000_000_000) == expected


def test_parse_budget_density():
    assert parse_budget(None, 0.028, 277_453_056) == round(0.028 * 277_453_056)
    assert parse_budget(None, 1.0, 10) == 10
    assert parse_budget(None, 0.25, 10) == 2  # round(2.5), half to even


@pytest.mark.parametrize(
    "count, density, total, message",
    [
        (None, None, 10, "exactly one"),
        ("5", 0.5, 10, "exactly one"),
        ("7.6X", None, 10**9, "cannot read"),
        ("M", None, 10**9, "cannot read"),
        ("", None, 10**9, "cannot read"),
        ("-5", None, 10**9, "cannot read"),
        ("1.5", None, 10, "whole number"),
        ("1.2345k", None, 10**9, "whole number"),
        ("0", None, 10, "at least 1"),
        (0, None, 10, "at least 1"),
        ("11", None, 10, "more than"),
        (None, 0.0, 10, r"\(0, 1\]"),
        (None, 1.5, 10, r"\(0, 1\]"),
        (None, float("nan"), 10, r"\(0, 1\]"),
        (None, 0.01, 10, "at least 1"),
        (None, "0.5", 10, "density"),
        (True, None, 10, "parameter count"),
        ("5", None, 0, "total"),
    ],
)
def test_parse_budget_errors(count, density, total, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(count, density, total)


# ---- random_mask -----------------------------------------------------------------------------------


SHAPES = {"b": torch.Size([100, 1000]), "a": torch.Size([10_000]), "c": torch.Size([10, 100]), "d": torch.Size([0])}


def test_random_mask_exact_and_deterministic():
    total = sum(math.prod(s) for s in SHAPES.values())
    for k in (0, 1, 20_000, total // 2, total // 2 + 1, total - 3, total):
        masks = random_mask(SHAPES, k, seed=7)
        assert list(masks) == list(SHAPES)
        assert all(masks[n].shape == SHAPES[n] and masks[n].dtype == torch.bool for n in SHAPES)
        assert mask_nnz(masks) == k
        again = random_mask(SHAPES, k, seed=7)
        assert all(torch.equal(masks[n], again[n]) for n in SHAPES)
    first, second = random_mask(SHAPES, 20_000, seed=1), random_mask(SHAPES, 20_000, seed=2)
    assert not all(torch.equal(first[n], second[n]) for n in SHAPES)
    assert 0.05 < jaccard(first, second) < 0.15  # independent draws at density 0.18 overlap ~0.1


def test_random_mask_per_parameter_counts_are_proportional():
    total = sum(math.prod(s) for s in SHAPES.values())
    k = 20_000
    for seed in range(3):
        masks = random_mask(SHAPES, k, seed=seed)
        for name, shape in SHAPES.items():
            mean = k * math.prod(shape) / total
            assert abs(int(masks[name].sum()) - mean) <= 6 * math.sqrt(mean) + 1, name
        # and spread over each parameter: both halves of the largest one get about half
        rows = masks["b"].sum(dim=1)
        assert abs(int(rows[:50].sum()) - int(rows[50:].sum())) < 6 * math.sqrt(k)


def test_random_mask_is_uniform_over_positions():
    shapes = {"x": torch.Size([3, 4]), "y": torch.Size([8])}
    counts = torch.zeros(20)
    runs = 3000
    for seed in range(runs):
        masks = random_mask(shapes, 5, seed=seed)
        counts += torch.cat([masks["x"].reshape(-1), masks["y"]]).float()
    expected = runs * 5 / 20
    assert ((counts - expected).abs() < 6 * math.sqrt(expected)).all(), counts.tolist()
    # the k > total / 2 path (drawing the unselected positions) is uniform too
    counts = torch.zeros(20)
    for seed in range(runs):
        masks = random_mask(shapes, 15, seed=seed)
        counts += torch.cat([masks["x"].reshape(-1), masks["y"]]).float()
    expected = runs * 15 / 20
    assert ((counts - expected).abs() < 6 * math.sqrt(runs * 15 / 20 * 5 / 20)).all(), counts.tolist()


def test_random_mask_takes_tensors_and_checks_k():
    params = {"w": torch.zeros(4, 5), "v": torch.zeros(3)}
    masks = random_mask(params, 6, seed=0)
    assert masks["w"].shape == (4, 5) and masks["w"].device == params["w"].device and mask_nnz(masks) == 6
    with pytest.raises(ValueError, match="outside"):
        random_mask(params, 24, seed=0)
    with pytest.raises(TypeError):
        random_mask(params, 2, seed=None)


# ---- bias_mask and helpers --------------------------------------------------------------------------


def test_bias_mask():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    params = dict(model.named_parameters())
    masks = bias_mask(params)
    assert masks["0.bias"].all() and masks["1.bias"].all()
    assert not masks["0.weight"].any() and not masks["1.weight"].any()
    assert masks["0.weight"].shape == (4, 3) and mask_nnz(masks) == 8


def test_union_nnz_jaccard():
    a = {"x": torch.tensor([True, False, True]), "y": torch.tensor([[False, True]])}
    b = {"x": torch.tensor([True, True, False]), "z": torch.tensor([True])}
    union = masks_union(a, b)
    assert union["x"].tolist() == [True, True, True] and union["y"].tolist() == [[False, True]]
    assert union["z"].tolist() == [True]
    assert a["x"].tolist() == [True, False, True]  # inputs untouched
    assert mask_nnz(a) == 3 and mask_nnz(union) == 5 and masks_union() == {}
    assert jaccard(a, b) == pytest.approx(1 / 5)
    assert jaccard(a, a) == 1.0
    assert jaccard({"x": torch.zeros(2, dtype=torch.bool)}, {}) == 1.0
    with pytest.raises(ValueError, match="'x'"):
        jaccard(a, {"x": torch.tensor([True])})
    with pytest.raises(ValueError, match="'x'"):
        masks_union(a, {"x": torch.tensor([True])})
