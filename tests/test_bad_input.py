"""Every bad input gets a clear error, and leaves the weights and the store untouched.

File-level cases start from a valid artifact written by `save_pretrained`, rewrite
`sft_delta.safetensors` with one corruption, and fix the manifest's `tensors_sha256` (and `nnz`)
so that the check under test, not the checksum, is the one that fires. Each asserts the
exception type, that the message names the file and the tensor or field at fault, and that
`DeltaStore.import_directory` refuses the same directory without writing anything.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from sftstore import SparseDelta
from sftstore.compose import compose
from sftstore.demo import NER_LABELS, build_tiny_base, perturb, synthetic_delta
from sftstore.errors import (
    BaseModelMismatchError,
    DeltaFormatError,
    InvalidNameError,
    RefNotFoundError,
    SftError,
)
from sftstore.format import CONFIG_FILE, TENSORS_FILE
from sftstore.modeling import base_parameters, fingerprint, load_model
from sftstore.naming import DeltaRef
from sftstore.store import DeltaStore

P = "encoder.layer.0.attention.self.query.weight"  # the parameter the corruptions target (32 x 32)
P_NUMEL = 32 * 32
HEAD = "classifier.weight"  # a head tensor of the task delta (7 x 32)
MISSING_P = "encoder.layer.9.attention.self.query.weight"  # the tiny bases have 2 layers


# ---- fixtures ----------------------------------------------------------------------------------


def _ner_model(base_dir):
    return load_model(base_dir, "token-classification", NER_LABELS)


@pytest.fixture(scope="module")
def bert_task_delta(tiny_bert_dir):
    """A task delta on the tiny BERT: sparse entries (P among them) and a classifier head."""
    delta = synthetic_delta(
        _ner_model(tiny_bert_dir), density=0.08, seed=12, kind="task", task="ner",
        task_type="token-classification", labels=NER_LABELS,
    )
    assert P in delta.params and delta.params[P].nnz > 4 and HEAD in delta.head
    return delta


@pytest.fixture(scope="module")
def bert_lang_delta(tiny_bert_dir):
    return synthetic_delta(_ner_model(tiny_bert_dir), density=0.05, seed=11, kind="language", language="hau")


@pytest.fixture(scope="module")
def other_bert_dir(tmp_path_factory):
    """The same architecture as `tiny_bert_dir`, other weights."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-bert-seed5"), arch="bert", seed=5)


@pytest.fixture
def artifact(bert_task_delta, tmp_path) -> Path:
    """Format version 1, whose `P::indices` the corruptions below edit (version 2's: tests/test_format_v2.py)."""
    return bert_task_delta.save_pretrained(tmp_path / "artifact", format_version=1)


@pytest.fixture
def fresh_model(tiny_bert_dir):
    return _ner_model(tiny_bert_dir)


# ---- helpers -----------------------------------------------------------------------------------


def read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(directory / TENSORS_FILE), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata())


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / CONFIG_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def fix_manifest(directory: Path, nnz: int | None = None) -> None:
    """Make `tensors_sha256` (and `nnz` when given) agree with the tensors file as it is now."""
    manifest = read_manifest(directory)
    manifest["tensors_sha256"] = hashlib.sha256((directory / TENSORS_FILE).read_bytes()).hexdigest()
    if nnz is not None:
        manifest["nnz"] = nnz
    write_manifest(directory, manifest)


def rewrite_tensors(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Replace the tensors file and fix the manifest's checksum and nnz to match it."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / TENSORS_FILE), metadata=metadata)
    nnz = sum(t.numel() for k, t in tensors.items() if k.endswith("::indices"))
    fix_manifest(directory, nnz)


def rewrite_bytes(directory: Path, data: bytes) -> None:
    (directory / TENSORS_FILE).write_bytes(data)
    fix_manifest(directory)


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name, tensor in after.items() if not torch.equal(tensor, before[name])]
    assert not changed, f"weights changed by a refused delta: {changed}"


def assert_store_empty(store: DeltaStore) -> None:
    assert store.list() == []
    assert list(store.blobs_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []


def assert_rejected(directory: Path, error: type[Exception], *fragments: str) -> str:
    """Loading and importing `directory` both raise `error`, whose message holds every fragment."""
    with pytest.raises(error) as info:
        SparseDelta.from_pretrained(directory)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    store = DeltaStore()
    with pytest.raises(error):
        store.import_directory(directory)
    assert_store_empty(store)
    return message


# ---- (a), (b): not a safetensors file, truncated -------------------------------------------------


@pytest.mark.parametrize(
    "make_bytes",
    [
        pytest.param(lambda good: random.Random(0).randbytes(4096), id="random-bytes"),
        pytest.param(lambda good: b"this is a text file, not safetensors\n" * 20, id="text-file"),
        pytest.param(lambda good: good[: len(good) // 2], id="truncated-half"),
        pytest.param(lambda good: good[:-1], id="truncated-last-byte"),
        pytest.param(lambda good: b"", id="empty-file"),
    ],
)
def test_tensors_file_not_safetensors_or_truncated(artifact, make_bytes):
    good = (artifact / TENSORS_FILE).read_bytes()
    rewrite_bytes(artifact, make_bytes(good))
    assert_rejected(artifact, DeltaFormatError, str(artifact / TENSORS_FILE), "not a valid safetensors file")


def test_tensors_file_missing(artifact):
    (artifact / TENSORS_FILE).unlink()
    assert_rejected(artifact, DeltaFormatError, str(artifact), TENSORS_FILE)


# ---- (c)-(h): malformed tensors ----------------------------------------------------------------

Mutation = Callable[[dict, dict], list]  # edits tensors/metadata in place, returns expected message fragments


def _set_index(position: int, value: int) -> Mutation:
    def mutate(tensors, metadata):
        indices = tensors[f"{P}::indices"].clone()
        indices[position] = value
        tensors[f"{P}::indices"] = indices
        return [f"{P}::indices", str(value), f"outside [0, {P_NUMEL})"]

    return mutate


def _float_indices(tensors, metadata):
    tensors[f"{P}::indices"] = tensors[f"{P}::indices"].float()
    return [f"{P}::indices", "dtype torch.float32", "int32"]


def _unsorted(tensors, metadata):
    tensors[f"{P}::indices"] = tensors[f"{P}::indices"].flip(0)
    return [f"{P}::indices", "not strictly increasing"]


def _swapped_pair(tensors, metadata):
    indices = tensors[f"{P}::indices"].clone()
    indices[[1, 2]] = indices[[2, 1]]
    tensors[f"{P}::indices"] = indices
    return [f"{P}::indices", "not strictly increasing"]


def _duplicated(tensors, metadata):
    indices = tensors[f"{P}::indices"].clone()
    indices[1] = indices[0]
    tensors[f"{P}::indices"] = indices
    return [f"{P}::indices", "duplicated"]


def _values_shorter(tensors, metadata):
    tensors[f"{P}::values"] = tensors[f"{P}::values"][:-1]
    return [f"{P}::indices", f"{P}::values", "entries"]


def _values_longer(tensors, metadata):
    tensors[f"{P}::values"] = torch.cat([tensors[f"{P}::values"], torch.ones(3)])
    return [f"{P}::indices", f"{P}::values", "entries"]


def _bad_value(value: float, position: int = 0) -> Mutation:
    def mutate(tensors, metadata):
        values = tensors[f"{P}::values"].clone()
        values[position] = value
        tensors[f"{P}::values"] = values
        return [f"{P}::values", "NaN or Inf"]

    return mutate


def _bad_head_value(value: float) -> Mutation:
    def mutate(tensors, metadata):
        head = tensors[f"head::{HEAD}"].clone()
        head[3, 5] = value
        tensors[f"head::{HEAD}"] = head
        return [f"head::{HEAD}", "NaN or Inf"]

    return mutate


def _int_values(tensors, metadata):
    tensors[f"{P}::values"] = torch.ones_like(tensors[f"{P}::indices"])
    return [f"{P}::values", "dtype"]


def _two_dim_indices(tensors, metadata):
    tensors[f"{P}::indices"] = tensors[f"{P}::indices"][:4].reshape(2, 2)
    tensors[f"{P}::values"] = tensors[f"{P}::values"][:4]
    return [f"{P}::indices", "1-D"]


def _values_without_indices(tensors, metadata):
    del tensors[f"{P}::indices"]
    return [f"{P}::values", f"{P}::indices"]


def _unexpected_key(tensors, metadata):
    tensors["not-a-delta-key"] = torch.zeros(3)
    return ["not-a-delta-key"]


def _shapes_lack_parameter(tensors, metadata):
    shapes = json.loads(metadata["shapes"])
    del shapes[P]
    metadata["shapes"] = json.dumps(shapes)
    return ["shapes", P]


def _shapes_not_json(tensors, metadata):
    metadata["shapes"] = "{not json"
    return ["shapes"]


def _negative_shape(tensors, metadata):
    shapes = json.loads(metadata["shapes"])
    shapes[P] = [-32, -32]
    metadata["shapes"] = json.dumps(shapes)
    return [P, "shape"]


def _wrong_format_name(tensors, metadata):
    metadata["format"] = "something-else"
    return ["format", "something-else"]


def _future_format_version(tensors, metadata):
    metadata["format_version"] = "3"
    return ["format_version", "'3'"]


TENSOR_CORRUPTIONS = {
    "c-float-indices": _float_indices,
    "d-index-equal-numel": _set_index(-1, P_NUMEL),
    "d-index-far-beyond-numel": _set_index(-1, P_NUMEL + 10_000),
    "d-negative-index": _set_index(0, -1),
    "e-unsorted-reversed": _unsorted,
    "e-unsorted-swapped-pair": _swapped_pair,
    "f-duplicated-index": _duplicated,
    "g-values-shorter": _values_shorter,
    "g-values-longer": _values_longer,
    "h-nan-value": _bad_value(float("nan")),
    "h-inf-value": _bad_value(float("inf")),
    "h-minus-inf-last-value": _bad_value(float("-inf"), position=-1),
    "h-nan-in-head": _bad_head_value(float("nan")),
    "h-inf-in-head": _bad_head_value(float("inf")),
    "int-values": _int_values,
    "2d-indices": _two_dim_indices,
    "values-without-indices": _values_without_indices,
    "unexpected-key": _unexpected_key,
    "shapes-lack-parameter": _shapes_lack_parameter,
    "shapes-not-json": _shapes_not_json,
    "negative-shape": _negative_shape,
    "wrong-format-name": _wrong_format_name,
    "future-format-version": _future_format_version,
}


@pytest.mark.parametrize("mutate", TENSOR_CORRUPTIONS.values(), ids=TENSOR_CORRUPTIONS.keys())
def test_malformed_tensors_are_rejected(artifact, mutate):
    tensors, metadata = read_tensors(artifact)
    fragments = mutate(tensors, metadata)
    rewrite_tensors(artifact, tensors, metadata)
    assert_rejected(artifact, DeltaFormatError, str(artifact / TENSORS_FILE), *fragments)


# ---- (i), (j): parameters that do not fit the base ---------------------------------------------


def _rename_parameter(tensors, metadata):
    for part in ("indices", "values"):
        tensors[f"{MISSING_P}::{part}"] = tensors.pop(f"{P}::{part}")
    shapes = json.loads(metadata["shapes"])
    shapes[MISSING_P] = shapes.pop(P)
    metadata["shapes"] = json.dumps(shapes)
    return [MISSING_P, "does not exist"]


def _reshape_parameter(tensors, metadata):
    shapes = json.loads(metadata["shapes"])
    assert shapes[P] == [32, 32]
    shapes[P] = [16, 64]  # same numel: every index stays in range, only the shape differs
    metadata["shapes"] = json.dumps(shapes)
    return [P, "[16, 64]", "[32, 32]"]


def _grow_parameter(tensors, metadata):
    shapes = json.loads(metadata["shapes"])
    shapes[P] = [32, 33]
    metadata["shapes"] = json.dumps(shapes)
    return [P, "[32, 33]", "[32, 32]"]


def _reshape_head(tensors, metadata):
    tensors[f"head::{HEAD}"] = torch.zeros(len(NER_LABELS) + 1, 32)
    return [f"head::{HEAD}", f"[{len(NER_LABELS) + 1}, 32]", f"[{len(NER_LABELS)}, 32]"]


def _unknown_head(tensors, metadata):
    tensors["head::score.weight"] = torch.zeros(3, 32)
    return ["head::score.weight"]


MISFITS = {
    "i-parameter-missing-from-base": _rename_parameter,
    "j-parameter-other-shape": _reshape_parameter,
    "j-parameter-other-numel": _grow_parameter,
    "j-head-other-shape": _reshape_head,
    "head-not-in-model": _unknown_head,
}


@pytest.mark.parametrize("how", ["apply", "compose-model", "compose-dir"])
@pytest.mark.parametrize("mutate", MISFITS.values(), ids=MISFITS.keys())
def test_delta_that_does_not_fit_the_base_is_refused(artifact, fresh_model, tiny_bert_dir, mutate, how):
    tensors, metadata = read_tensors(artifact)
    fragments = mutate(tensors, metadata)
    rewrite_tensors(artifact, tensors, metadata)
    delta = SparseDelta.from_pretrained(artifact)  # well-formed: only the base can tell it does not fit
    before = state(fresh_model)
    with pytest.raises(BaseModelMismatchError) as info:
        if how == "apply":
            delta.apply(fresh_model)
        elif how == "compose-model":
            compose(fresh_model, [delta], device="cpu")
        else:
            compose(tiny_bert_dir, [delta], device="cpu")
    for fragment in fragments:
        assert fragment in str(info.value)
    assert_unchanged(fresh_model, before)


def test_compose_refuses_misfit_before_applying_any_delta(tmp_path, fresh_model, bert_task_delta, bert_lang_delta):
    assert P in bert_lang_delta.params
    directory = bert_lang_delta.save_pretrained(tmp_path / "lang", format_version=1)
    tensors, metadata = read_tensors(directory)
    _rename_parameter(tensors, metadata)
    rewrite_tensors(directory, tensors, metadata)
    bad_lang = SparseDelta.from_pretrained(directory)
    before = state(fresh_model)
    with pytest.raises(BaseModelMismatchError, match=re.escape(MISSING_P)):
        compose(fresh_model, [bert_task_delta, bad_lang], device="cpu")  # the task delta goes first
    assert_unchanged(fresh_model, before)


# ---- (k), (l): manifest ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["kind", "base_model", "num_parameters", "tensors_sha256", "nnz"])
def test_manifest_missing_required_field(artifact, field):
    manifest = read_manifest(artifact)
    del manifest[field]
    write_manifest(artifact, manifest)
    assert_rejected(artifact, DeltaFormatError, str(artifact / CONFIG_FILE), field, "missing")


@pytest.mark.parametrize(
    "text, fragment",
    [
        pytest.param('{"kind": "task", ', "not a readable JSON manifest", id="truncated-json"),
        pytest.param("kind: task\n", "not a readable JSON manifest", id="yaml-not-json"),
        pytest.param("[1, 2, 3]\n", "expected a JSON object", id="json-array"),
    ],
)
def test_manifest_not_json(artifact, text, fragment):
    (artifact / CONFIG_FILE).write_text(text, encoding="utf-8")
    assert_rejected(artifact, DeltaFormatError, str(artifact / CONFIG_FILE), fragment)


def test_manifest_missing(artifact):
    (artifact / CONFIG_FILE).unlink()
    assert_rejected(artifact, DeltaFormatError, str(artifact), CONFIG_FILE)


@pytest.mark.parametrize(
    "field, value",
    [
        ("kind", "adapter"),
        ("format_version", 3),
        ("num_parameters", 0),
        ("labels", []),
        ("base_model", {"id": "x", "arch_digest": "a"}),
        ("task_type", "translation"),
        ("method", "lt-sft"),
    ],
)
def test_manifest_malformed_field(artifact, field, value):
    manifest = read_manifest(artifact)
    manifest[field] = value
    write_manifest(artifact, manifest)
    assert_rejected(artifact, DeltaFormatError, str(artifact / CONFIG_FILE), field)


def test_manifest_sha256_does_not_match(artifact):
    manifest = read_manifest(artifact)
    manifest["tensors_sha256"] = "0" * 64
    write_manifest(artifact, manifest)
    assert_rejected(artifact, DeltaFormatError, str(artifact / TENSORS_FILE), "tensors_sha256", "0" * 64)


def test_tensors_edited_after_manifest_was_written(artifact):
    """A finite, well-formed edit of a value is caught by the checksum alone."""
    tensors, metadata = read_tensors(artifact)
    tensors[f"{P}::values"] = tensors[f"{P}::values"] * 2
    save_file(tensors, str(artifact / TENSORS_FILE), metadata=metadata)  # manifest left as it was
    assert_rejected(artifact, DeltaFormatError, str(artifact / TENSORS_FILE), "sha256", str(artifact / CONFIG_FILE))


def test_manifest_nnz_does_not_match(artifact):
    manifest = read_manifest(artifact)
    manifest["nnz"] += 1
    write_manifest(artifact, manifest)
    assert_rejected(artifact, DeltaFormatError, str(artifact / CONFIG_FILE), "nnz")


def test_manifest_values_dtype_does_not_match(artifact):
    manifest = read_manifest(artifact)
    manifest["values_dtype"] = "bfloat16"
    write_manifest(artifact, manifest)
    assert_rejected(artifact, DeltaFormatError, str(artifact / CONFIG_FILE), "values_dtype", "bfloat16")


def test_manifest_density_does_not_match(artifact):
    manifest = read_manifest(artifact)
    manifest["density"] = 0.5
    write_manifest(artifact, manifest)
    assert_rejected(artifact, DeltaFormatError, str(artifact / CONFIG_FILE), "density")


def test_classification_task_delta_without_head_is_rejected(artifact):
    tensors, metadata = read_tensors(artifact)
    for key in [k for k in tensors if k.startswith("head::")]:
        del tensors[key]
    rewrite_tensors(artifact, tensors, metadata)
    assert_rejected(artifact, DeltaFormatError, str(artifact / TENSORS_FILE), "head")


def test_language_delta_with_head_tensors_is_rejected(bert_lang_delta, bert_task_delta, tmp_path):
    directory = bert_lang_delta.save_pretrained(tmp_path / "lang", format_version=1)
    tensors, metadata = read_tensors(directory)
    tensors.update({f"head::{name}": t for name, t in bert_task_delta.head.items()})
    rewrite_tensors(directory, tensors, metadata)
    assert_rejected(directory, DeltaFormatError, str(directory / TENSORS_FILE), "language delta carries head")


@pytest.mark.parametrize(("field", "value"), [("format_version", True), ("nnz", 1.0), ("tensors_sha256", 5)])
def test_manifest_field_of_the_wrong_type(artifact, field, value):
    manifest = read_manifest(artifact)
    manifest[field] = value
    write_manifest(artifact, manifest)
    assert_rejected(artifact, DeltaFormatError, str(artifact / CONFIG_FILE), field)


# ---- (m): a delta for another base -------------------------------------------------------------


def test_delta_for_another_architecture_is_refused(bert_lang_delta, tiny_xlmr_dir):
    recorded = bert_lang_delta.config.base_model
    xlmr = load_model(tiny_xlmr_dir)
    actual = fingerprint(xlmr)
    # The tiny BERT and XLM-R share every base parameter name, shape and dtype, so their
    # arch_digests coincide (by design it hashes only those); the weights digest tells them apart.
    assert actual != recorded.fingerprint
    with pytest.raises(BaseModelMismatchError) as info:
        compose(tiny_xlmr_dir, [bert_lang_delta], device="cpu")
    message = str(info.value)
    for fragment in (
        recorded.arch_digest[:12], actual.arch_digest[:12], recorded.weights_digest[:12],
        actual.weights_digest[:12], str(tiny_xlmr_dir), "force",
    ):
        assert fragment in message
    before = state(xlmr)
    with pytest.raises(BaseModelMismatchError):
        compose(xlmr, [bert_lang_delta], device="cpu")
    assert_unchanged(xlmr, before)


def test_delta_for_same_architecture_other_weights_is_refused_unless_forced(bert_lang_delta, other_bert_dir):
    recorded = bert_lang_delta.config.base_model
    other = load_model(other_bert_dir)
    actual = fingerprint(other)
    assert actual.arch_digest == recorded.arch_digest and actual.weights_digest != recorded.weights_digest

    with pytest.raises(BaseModelMismatchError) as info:
        compose(other_bert_dir, [bert_lang_delta], device="cpu")
    message = str(info.value)
    assert recorded.weights_digest[:12] in message
    assert actual.weights_digest[:12] in message
    before = state(other)
    with pytest.raises(BaseModelMismatchError):
        compose(other, [bert_lang_delta], device="cpu")
    assert_unchanged(other, before)

    composed = compose(other_bert_dir, [bert_lang_delta], device="cpu", force=True)
    assert composed.deltas == [bert_lang_delta]
    entry = bert_lang_delta.params[P]
    got = base_parameters(composed.model)[P].detach().reshape(-1)[entry.indices.long()]
    expected = base_parameters(other)[P].detach().reshape(-1)[entry.indices.long()] + entry.values
    torch.testing.assert_close(got, expected)


# ---- (n): references that do not exist ---------------------------------------------------------


@pytest.fixture
def store_with_hau(bert_lang_delta, tmp_path):
    store = DeltaStore()
    version, _ = store.import_directory(bert_lang_delta.save_pretrained(tmp_path / "hau"))
    assert version.ref == "lang/hau@1"
    return store


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("lang/xx", "lang/xx"),
        ("task/hau", "task/hau"),
        ("lang/hau@7", "lang/hau@7"),
        ("lang/hau@0", "lang/hau@0"),
        ("lang/hau@best", "lang/hau@best"),
    ],
)
def test_unknown_reference(store_with_hau, ref, fragment):
    for call in (store_with_hau.resolve, store_with_hau.load):
        with pytest.raises(RefNotFoundError, match=re.escape(fragment)):
            call(ref)
    with pytest.raises(RefNotFoundError):
        store_with_hau.tag(ref, "best")
    assert [v.aliases for v in store_with_hau.list()] == [()]


def test_unknown_reference_in_empty_store():
    with pytest.raises(RefNotFoundError, match="lang/hau"):
        DeltaStore().resolve("lang/hau")


# ---- (o), (o2): names with path separators, reserved aliases -----------------------------------


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("lang/../x", "invalid name '../x'"),
        ("lang/a/b", "invalid name 'a/b'"),
        ("lang/..", "invalid name '..'"),
        ("lang/.hidden", "invalid name '.hidden'"),
        ("lang/hau@../x", "invalid version or alias '../x'"),
        ("lang/hau@a/b", "invalid version or alias 'a/b'"),
        ("lang/hau@", "invalid version or alias ''"),
        ("../x", "invalid reference '../x'"),
        ("", "invalid reference ''"),
    ],
)
def test_reference_with_path_separators_or_dotdot_is_invalid(text, fragment):
    with pytest.raises(InvalidNameError, match=re.escape(fragment)):
        DeltaRef.parse(text)


@pytest.mark.parametrize("alias", ["x/y", "..", "../x", "a..b", "/abs", "", "12", "007", "latest"])
def test_bad_alias_is_refused(store_with_hau, alias):
    with pytest.raises(InvalidNameError, match=re.escape(repr(alias))):
        store_with_hau.tag("lang/hau@1", alias)
    assert [v.aliases for v in store_with_hau.list()] == [()]


@pytest.mark.parametrize("alias", ["12", "latest"])
def test_reserved_alias_message_says_why(store_with_hau, alias):
    with pytest.raises(InvalidNameError, match="reserved"):
        store_with_hau.tag("lang/hau", alias)


@pytest.mark.parametrize("field", ["language", "task"])
@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "/etc/passwd", "x\\y"])
def test_manifest_name_with_path_separator_is_refused_on_import(tmp_path, bert_lang_delta, bert_task_delta, field, name):
    delta = bert_lang_delta if field == "language" else bert_task_delta
    directory = delta.save_pretrained(tmp_path / "evil")
    manifest = read_manifest(directory)
    manifest[field] = name
    if field == "language":
        manifest["languages"] = [name]
    write_manifest(directory, manifest)
    assert_rejected(directory, DeltaFormatError, str(directory / CONFIG_FILE), f"field '{field}'", repr(name))


# ---- from_models: bad masks --------------------------------------------------------------------


def test_from_models_mask_for_unknown_parameter(fresh_model):
    tuned = copy.deepcopy(fresh_model)
    masks = perturb(tuned, density=0.05, seed=3)
    masks["bert." + P] = masks.pop(P)  # full name in the task model instead of the base-relative one
    with pytest.raises((SftError, ValueError), match=re.escape("bert." + P)):
        SparseDelta.from_models(fresh_model, tuned, masks=masks, kind="language", language="hau")


@pytest.mark.parametrize("mask_shape", [(1,), (5,)], ids=["broadcastable", "wrong-size"])
def test_from_models_mask_of_wrong_shape(fresh_model, mask_shape):
    tuned = copy.deepcopy(fresh_model)
    masks = perturb(tuned, density=0.05, seed=3)
    masks[P] = torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises((SftError, ValueError), match=re.escape(P)):
        SparseDelta.from_models(fresh_model, tuned, masks=masks, kind="language", language="hau")


# ---- the command line --------------------------------------------------------------------------


def test_cli_import_of_bad_directory_prints_one_clean_error(artifact):
    from sftstore_cli.main import cli

    tensors, metadata = read_tensors(artifact)
    _bad_value(float("nan"))(tensors, metadata)
    rewrite_tensors(artifact, tensors, metadata)
    result = CliRunner().invoke(cli, ["import", str(artifact)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert str(artifact / TENSORS_FILE) in lines[0] and f"{P}::values" in lines[0]
    assert "Traceback" not in result.output
    assert_store_empty(DeltaStore())


@pytest.mark.parametrize("ref", ["lang/hau@²", "lang/hau@٣"])
def test_versions_are_ascii_digits(ref):
    with pytest.raises(InvalidNameError):
        DeltaRef.parse(ref)
