"""The artifact contract, format versions 1 and 2: files, keys, dtypes, metadata, manifest, model card.

The tensors file is read here with `safetensors.safe_open` directly, and version 2's gaps are decoded
here with numpy, independently of our loader, so these tests pin the on-disk format itself and not
just "save then load gives the same thing". Tests taking `version` run on both format versions.
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from sftstore import SparseDelta
from sftstore.demo import NER_LABELS, perturb
from sftstore.format import CARD_FILE, CONFIG_FILE, TENSORS_FILE
from sftstore.modeling import base_parameters, fingerprint, head_parameters
from sftstore.store import DeltaStore

# Tests taking `which` also take `tiny_base_dir` (directly or via `ner_model`) so that they run on
# both architectures and `request.getfixturevalue(which)` can build the delta on that base.
DELTA_FIXTURES = ["lang_delta", "task_delta"]
_BITS = {4: torch.int32, 2: torch.int16}
PARTS = {1: ("indices", "values"), 2: ("gaps", "escape_positions", "escape_values", "values")}


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def version(request) -> int:
    """The artifact format version a test writes and reads."""
    return request.param


# ---- helpers -----------------------------------------------------------------------------------


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (so -0.0 != 0.0 and NaN payloads count)."""
    return tensor.contiguous().view(_BITS[tensor.element_size()])


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        assert torch.equal(bits(a), bits(b))
    else:
        assert torch.equal(a, b)


def assert_same_delta(a: SparseDelta, b: SparseDelta) -> None:
    assert a.params.keys() == b.params.keys()
    for name, entry in a.params.items():
        other = b.params[name]
        assert entry.shape == other.shape, name
        assert_bit_identical(entry.indices, other.indices)
        assert_bit_identical(entry.values, other.values)
    assert a.head.keys() == b.head.keys()
    for name, tensor in a.head.items():
        assert_bit_identical(tensor, b.head[name])
    assert a.config.to_dict() == b.config.to_dict()
    assert a.nnz == b.nnz and a.density == b.density and a.values_dtype == b.values_dtype


def read_tensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))


def stored_indices(tensors: dict[str, torch.Tensor], name: str, version: int) -> np.ndarray:
    """The flat indices of `name` as the file stores them, decoded here (v2: gaps with 0 at each escape
    position, whose full gap is in the escape list; the first gap counts from -1)."""
    if version == 1:
        return tensors[f"{name}::indices"].numpy().astype(np.int64)
    gaps = tensors[f"{name}::gaps"].numpy().astype(np.int64)
    positions = tensors[f"{name}::escape_positions"].numpy()
    gaps[positions] = tensors[f"{name}::escape_values"].numpy()
    return np.cumsum(gaps) - 1


# ---- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", DELTA_FIXTURES)
def test_save_load_round_trip_is_bit_exact(request, which, tiny_base_dir, tmp_path, version):
    delta = request.getfixturevalue(which)
    assert delta.nnz > 0
    if which == "task_delta":
        assert delta.head
    out = delta.save_pretrained(tmp_path / "artifact", format_version=version)
    assert sorted(p.name for p in out.iterdir()) == sorted([TENSORS_FILE, CONFIG_FILE, CARD_FILE])
    loaded = SparseDelta.from_pretrained(out)
    assert_same_delta(delta, loaded)
    # A second save of the loaded delta writes byte-identical tensors and manifest.
    again = loaded.save_pretrained(tmp_path / "again", format_version=version)
    for name in (TENSORS_FILE, CONFIG_FILE):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


# ---- the tensors file --------------------------------------------------------------------------


@pytest.mark.parametrize("which", DELTA_FIXTURES)
def test_tensors_file_layout(request, which, ner_model, tmp_path, version):
    delta = request.getfixturevalue(which)
    out = delta.save_pretrained(tmp_path / "artifact", format_version=version)
    tensors, metadata = read_tensors_file(out / TENSORS_FILE)
    base = base_parameters(ner_model)

    expected_keys = {f"{p}::{part}" for p in delta.params for part in PARTS[version]}
    expected_keys |= {f"head::{h}" for h in delta.head}
    assert set(tensors) == expected_keys

    for name in delta.params:
        assert name in base, f"{name} is not named relative to model.base_model"
        values = tensors[f"{name}::values"]
        if version == 1:
            assert tensors[f"{name}::indices"].dtype == torch.int32 and tensors[f"{name}::indices"].dim() == 1
        else:
            gaps, positions = tensors[f"{name}::gaps"], tensors[f"{name}::escape_positions"]
            escapes = tensors[f"{name}::escape_values"]
            assert gaps.dtype == torch.uint8 and gaps.dim() == 1 and gaps.numel() == values.numel()
            assert positions.dtype == escapes.dtype == torch.int32 and positions.numel() == escapes.numel()
            assert torch.equal((gaps == 0).nonzero().squeeze(1), positions.long()), "zeros mark the escapes exactly"
            assert bool((escapes > 255).all()), "only gaps that do not fit in a byte are escaped"
        indices = stored_indices(tensors, name, version)
        assert values.dtype == torch.float32 and values.dim() == 1
        assert len(indices) == values.numel() > 0
        assert bool((np.diff(indices) > 0).all()), f"{name}: indices not strictly increasing"
        assert 0 <= indices[0] and indices[-1] < base[name].numel()
        assert np.array_equal(indices, delta.params[name].indices.numpy())
        assert bool(torch.isfinite(values).all()) and bool((values != 0).all())

    if which == "task_delta":
        heads = head_parameters(ner_model)
        assert set(delta.head) == set(heads) == {"classifier.weight", "classifier.bias"}
        for name, param in heads.items():
            assert tensors[f"head::{name}"].shape == param.shape
            assert_bit_identical(tensors[f"head::{name}"], delta.head[name])
    else:
        assert not any(key.startswith("head::") for key in tensors)

    assert metadata["format"] == "sftstore-delta"
    assert metadata["format_version"] == str(version)
    shapes = json.loads(metadata["shapes"])
    assert shapes == {name: list(base[name].shape) for name in delta.params}


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_half_precision_values_round_trip(ner_model, tmp_path, dtype, name, version):
    tuned = copy.deepcopy(ner_model)
    masks = perturb(tuned, density=0.05, seed=21)
    delta = SparseDelta.from_models(ner_model, tuned, masks=masks, values_dtype=dtype, kind="language", language="hau")
    assert delta.values_dtype == dtype
    out = delta.save_pretrained(tmp_path / "artifact", format_version=version)

    tensors, _ = read_tensors_file(out / TENSORS_FILE)
    assert {t.dtype for key, t in tensors.items() if key.endswith("::values")} == {dtype}
    index_part = "::indices" if version == 1 else "::gaps"
    assert {t.dtype for key, t in tensors.items() if key.endswith(index_part)} == {torch.int32 if version == 1 else torch.uint8}
    assert read_manifest(out)["values_dtype"] == name

    loaded = SparseDelta.from_pretrained(out)
    assert_same_delta(delta, loaded)
    base, tuned_params = base_parameters(ner_model), base_parameters(tuned)
    for pname, entry in loaded.params.items():
        diff = (tuned_params[pname].detach().reshape(-1) - base[pname].detach().reshape(-1)).float()
        assert_bit_identical(entry.values, diff[entry.indices.long()].to(dtype))


# ---- the manifest ------------------------------------------------------------------------------

REQUIRED_FIELDS = (
    "format_version", "kind", "task_type", "base_model", "method", "nnz", "num_parameters", "density",
    "values_dtype", "tensors_sha256", "created_at", "training", "metrics", "lineage",
)


@pytest.mark.parametrize("which", DELTA_FIXTURES)
def test_manifest_fields(request, which, ner_model, tmp_path, version):
    delta = request.getfixturevalue(which)
    out = delta.save_pretrained(tmp_path / "artifact", format_version=version)
    manifest = read_manifest(out)
    tensors, _ = read_tensors_file(out / TENSORS_FILE)
    base = base_parameters(ner_model)

    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    assert not missing
    assert manifest["format_version"] == version
    if which == "lang_delta":
        assert manifest["kind"] == "language"
        assert manifest["language"] == "hau" and manifest["languages"] == ["hau"]
        assert manifest["task_type"] == "masked-lm"
    else:
        assert manifest["kind"] == "task"
        assert manifest["task"] == "ner"
        assert manifest["task_type"] == "token-classification"
        assert manifest["labels"] == NER_LABELS

    info = manifest["base_model"]
    assert {"id", "revision", "arch_digest", "weights_digest"} <= info.keys()
    digests = fingerprint(ner_model)
    assert info["arch_digest"] == digests.arch_digest
    assert info["weights_digest"] == digests.weights_digest
    assert info["id"]

    assert manifest["method"]["name"] == "synthetic"
    assert manifest["values_dtype"] == "float32"
    assert manifest["tensors_sha256"] == hashlib.sha256((out / TENSORS_FILE).read_bytes()).hexdigest()
    nnz = sum(t.numel() for key, t in tensors.items() if key.endswith("::values"))
    assert manifest["nnz"] == nnz == delta.nnz
    assert manifest["num_parameters"] == sum(p.numel() for p in base.values())
    assert manifest["density"] == pytest.approx(nnz / manifest["num_parameters"], rel=1e-12)
    assert 0 < manifest["density"] < 1
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None
    for section in ("training", "metrics", "lineage"):
        assert isinstance(manifest[section], dict)


# ---- the model card ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", DELTA_FIXTURES)
def test_model_card_front_matter(request, which, tiny_base_dir, tmp_path):
    delta = request.getfixturevalue(which)
    out = delta.save_pretrained(tmp_path / "artifact")
    text = (out / CARD_FILE).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    card = ModelCard.load(out / CARD_FILE)
    data = card.data.to_dict()
    assert data["library_name"] == "sftstore"
    assert "base_model" not in data and str(tiny_base_dir) not in text  # a local base: never named in the card
    assert "sparse-fine-tuning" in data["tags"]
    assert data["license"]
    if which == "lang_delta":
        assert data["language"] == ["hau"]
        assert "language-delta" in data["tags"]
    else:
        assert "task-delta" in data["tags"] and "ner" in data["tags"]
    assert "huggingface.co//" not in text


def test_model_card_links_a_hub_base(lang_delta, tmp_path):
    lang_delta.config.base_model.id = "xlm-roberta-base"
    text = (lang_delta.save_pretrained(tmp_path / "a") / CARD_FILE).read_text(encoding="utf-8")
    assert "(https://huggingface.co/xlm-roberta-base)" in text


# ---- building from models ----------------------------------------------------------------------


def test_from_models_with_mask_is_exact(ner_model):
    tuned = copy.deepcopy(ner_model)
    perturb(tuned, density=0.3, seed=31)  # what "training" changed
    base, tuned_params = base_parameters(ner_model), base_parameters(tuned)
    names = sorted(base)
    generator = torch.Generator().manual_seed(32)
    # A mask over every other parameter only, overlapping the changed entries partly.
    masks = {n: torch.rand(base[n].shape, generator=generator) < 0.5 for n in names[::2]}

    delta = SparseDelta.from_models(ner_model, tuned, masks=masks, kind="language", language="hau")

    assert set(delta.params) <= set(masks), "parameters outside the mask must not be in the delta"
    for name in names:
        diff = (tuned_params[name].detach() - base[name].detach()).float().reshape(-1)
        support = masks[name].reshape(-1) & (diff != 0) if name in masks else torch.zeros_like(diff, dtype=torch.bool)
        if not support.any():
            assert name not in delta.params
            continue
        entry = delta.params[name]
        assert entry.shape == tuple(base[name].shape)
        assert torch.equal(entry.indices.long(), support.nonzero().squeeze(1))
        assert_bit_identical(entry.values, diff[support])
    mask_count = sum(int(m.sum()) for m in masks.values())
    assert 0 < delta.nnz < mask_count  # the mask holds unchanged entries: those are not kept
    assert not delta.head


def test_bitfit_like_mask_touches_only_biases(ner_model, tmp_path):
    tuned = copy.deepcopy(ner_model)
    perturb(tuned, density=1.0, seed=41)  # everything changed
    base = base_parameters(ner_model)
    bias_names = {n for n in base if n.endswith(".bias")}
    masks = {n: torch.ones_like(base[n], dtype=torch.bool) for n in bias_names}

    delta = SparseDelta.from_models(ner_model, tuned, masks=masks, kind="language", language="hau", method={"name": "bitfit"})
    assert set(delta.params) == bias_names
    assert all(e.nnz == e.numel for e in delta.params.values())

    loaded = SparseDelta.from_pretrained(delta.save_pretrained(tmp_path / "bitfit"))
    assert_same_delta(delta, loaded)
    model = copy.deepcopy(ner_model)
    loaded.apply(model)
    after, tuned_params = base_parameters(model), base_parameters(tuned)
    for name, param in after.items():
        if name in bias_names:
            torch.testing.assert_close(param, tuned_params[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(param, base[name]), name


@pytest.mark.parametrize("kind", ["language", "task"])
def test_empty_delta_saves_and_loads(ner_model, tmp_path, kind, version):
    fields = (
        dict(kind="language", language="hau")
        if kind == "language"
        else dict(kind="task", task="ner", task_type="token-classification", labels=NER_LABELS)
    )
    delta = SparseDelta.from_models(ner_model, copy.deepcopy(ner_model), **fields)
    assert delta.nnz == 0 and delta.params == {} and delta.density == 0.0
    out = delta.save_pretrained(tmp_path / "empty", format_version=version)

    tensors, metadata = read_tensors_file(out / TENSORS_FILE)
    assert set(tensors) == ({"head::classifier.weight", "head::classifier.bias"} if kind == "task" else set())
    assert json.loads(metadata["shapes"]) == {}
    manifest = read_manifest(out)
    assert manifest["nnz"] == 0 and manifest["density"] == 0.0

    loaded = SparseDelta.from_pretrained(out)
    assert_same_delta(delta, loaded)
    model = copy.deepcopy(ner_model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with loaded.applied(model):
        pass
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    version, created = DeltaStore().import_directory(out)
    assert created and version.nnz == 0
