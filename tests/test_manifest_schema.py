"""The manifest's schema (`config.FIELD_RULES`), checked on every load and when a config is built in Python,
and safetensors headers that give a key twice.

Each file case writes a valid artifact, corrupts one thing (the tensors file stays as written, so its
sha256 still matches), and asserts that loading raises a `DeltaFormatError` naming the file and the field,
that `sft import` fails with one clean line, and that the store is left empty, without an orphan blob.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from safetensors_bytes import join_header, split_header
from sftstore import SparseDelta
from sftstore.config import BASE_MODEL_RULES, FIELD_RULES, MAX_MANIFEST_BYTES, BaseModelInfo, DeltaConfig
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.errors import DeltaFormatError
from sftstore.format import CONFIG_FILE, MASKS_FILE, TENSORS_FILE, load_delta
from sftstore.modeling import base_parameters, load_model
from sftstore.store import DeltaStore
from sftstore.subnetworks import SubnetworkMasks
from sftstore_cli.main import cli

Edit = Callable[[str], str]  # the manifest's text -> the corrupted text
_RAW = "\x00raw\x00"  # stands for a value spliced into the manifest's text as it is


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ner_model(tiny_bert_dir):
    return load_model(tiny_bert_dir, "token-classification", NER_LABELS)


@pytest.fixture(scope="module")
def deltas(ner_model) -> dict[str, SparseDelta]:
    """A language delta and a task delta (with a head) on the tiny BERT."""
    return {
        "language": synthetic_delta(ner_model, density=0.05, seed=11, kind="language", language="hau"),
        "task": synthetic_delta(ner_model, density=0.08, seed=12, kind="task", task="ner",
                                task_type="token-classification", labels=NER_LABELS),
    }


# ---- helpers -----------------------------------------------------------------------------------


def set_field(name: str, value: object) -> Edit:
    """Set a top-level field."""
    return lambda text: _dump({**json.loads(text), name: value})


def set_base_field(name: str, value: object) -> Edit:
    def edit(text: str) -> str:
        manifest = json.loads(text)
        manifest["base_model"][name] = value
        return _dump(manifest)

    return edit


def set_raw(name: str, raw: str) -> Edit:
    """Set a top-level field to `raw` JSON text (what `json.dumps` cannot write: huge integers, deep nesting, NaN)."""
    return lambda text: set_field(name, _RAW)(text).replace(json.dumps(_RAW), raw)


def duplicate(name: str) -> Edit:
    """Give a top-level field a second time, with the same value."""
    return lambda text: text.rstrip()[:-1] + f', {json.dumps(name)}: {json.dumps(json.loads(text)[name])}}}'


def _dump(manifest: dict) -> str:
    return json.dumps(manifest, indent=2) + "\n"


def assert_refused(directory: Path, path: Path, *fragments: str) -> None:
    """Loading, importing and `sft import` all refuse `directory` naming `path` and every fragment; the store
    stays empty, without an orphan blob."""
    with pytest.raises(DeltaFormatError) as info:
        load_delta(directory)
    for fragment in (str(path), *fragments):
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    store = DeltaStore()
    with pytest.raises(DeltaFormatError):
        store.import_directory(directory)
    result = CliRunner().invoke(cli, ["import", str(directory)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], result.output
    assert "Traceback" not in result.output
    assert store.list() == []
    assert list(store.blobs_dir.iterdir()) == []


# ---- every field of the manifest, and the known failing cases ----------------------------------

CASES = [
    # (kind of delta, field named in the message, edit)
    ("language", "format_version", set_field("format_version", "1")),
    ("language", "format_version", set_field("format_version", True)),
    ("language", "kind", set_field("kind", 3)),
    ("language", "language", set_field("language", ["hau"])),
    ("language", "languages", set_field("languages", 5)),
    ("language", "languages", set_field("languages", ["hau", 7])),
    ("task", "task", set_field("task", 7)),
    ("language", "task", set_field("task", {"name": "ner"})),
    ("language", "task_type", set_field("task_type", ["masked-lm"])),
    ("language", "task_type", set_field("task_type", None)),
    ("language", "labels", set_field("labels", [1, 2])),
    ("task", "labels", set_field("labels", "O,B-PER")),
    ("task", "labels", set_field("labels", ["x" * 300])),
    ("language", "base_model", set_field("base_model", "bert-base-cased")),
    ("language", "base_model.id", set_base_field("id", 5)),
    ("language", "base_model.arch_digest", set_base_field("arch_digest", None)),
    ("language", "base_model.weights_digest", set_base_field("weights_digest", [])),
    ("language", "base_model.revision", set_base_field("revision", ["main"])),
    ("language", "method", set_field("method", [])),
    ("language", "method", set_field("method", {"name": {"x": 1}})),
    ("language", "num_parameters", set_field("num_parameters", "1000")),
    ("language", "requested_k", set_field("requested_k", "1000")),
    ("language", "num_parameters", set_field("num_parameters", 2**63)),
    ("language", "num_parameters", set_raw("num_parameters", "9" * 5000)),
    ("language", "nnz", set_field("nnz", "5")),
    ("language", "nnz", set_field("nnz", -1)),
    ("language", "nnz", set_raw("nnz", "9" * 5000)),
    ("language", "nnz", duplicate("nnz")),
    ("language", "density", set_field("density", "0.05")),
    ("language", "density", set_field("density", 1.5)),
    ("language", "density", set_raw("density", "NaN")),
    ("language", "density", set_raw("density", "9" * 400)),  # too long for a float: no OverflowError
    ("language", "license", set_raw("license", '"\\ud800"')),  # a lone surrogate: no UnicodeEncodeError
    ("language", "values_dtype", set_field("values_dtype", 32)),
    ("language", "values_dtype", set_field("values_dtype", "int8")),
    ("language", "tensors_sha256", set_field("tensors_sha256", "A" * 64)),
    ("language", "masks_sha256", set_field("masks_sha256", 7)),
    ("language", "training", set_field("training", ["steps", 100])),
    ("language", "metrics", set_field("metrics", [0.9])),
    ("language", "metrics", set_field("metrics", {"dev_f1": [0.9]})),
    ("language", "metrics", set_raw("metrics", '{"dev_f1": Infinity}')),
    ("language", "lineage", set_field("lineage", "from lang/en")),
    ("language", "license", set_field("license", {"id": "mit"})),
    ("language", "created_at", set_field("created_at", {"when": "now"})),
    ("language", "created_at", set_field("created_at", None)),
    ("language", "created_at", set_field("created_at", "yesterday")),
    ("language", "notes", set_raw("notes", "[" * 100_000 + "]" * 100_000)),
    ("language", "notes", set_raw("notes", '{"a": {"b": "[[[[", "c": ' + "[" * 70 + "]" * 70 + "}}")),
    ("language", "notes", set_raw("notes", '{"steps": [' + "7" * 5000 + "]}")),
]


@pytest.mark.parametrize(("kind", "field", "edit"), [pytest.param(*c, id=f"{c[1]}-{i}") for i, c in enumerate(CASES)])
def test_manifest_field_of_the_wrong_type_or_size_is_refused(deltas, tmp_path, kind, field, edit):
    directory = deltas[kind].save_pretrained(tmp_path / "artifact")
    config = directory / CONFIG_FILE
    config.write_text(edit(config.read_text(encoding="utf-8")), encoding="utf-8")
    assert_refused(directory, config, f"'{field}'")


@pytest.mark.parametrize("field", ["created_at", "format_version", "density", "values_dtype"])
def test_manifest_missing_a_required_field_is_refused(deltas, tmp_path, field):
    directory = deltas["language"].save_pretrained(tmp_path / "artifact")
    config = directory / CONFIG_FILE
    manifest = json.loads(config.read_text())
    del manifest[field]
    config.write_text(_dump(manifest), encoding="utf-8")
    assert_refused(directory, config, "missing", field)


def test_every_field_of_the_schema_has_a_case(deltas, tmp_path):
    """The table of cases covers every field the schema knows, and the schema every field sftstore writes."""
    covered = {field for _, field, _ in CASES}
    assert set(FIELD_RULES) | {f"base_model.{name}" for name in BASE_MODEL_RULES} <= covered
    for delta in deltas.values():
        written = json.loads((delta.save_pretrained(tmp_path / delta.kind) / CONFIG_FILE).read_text())
        assert set(written) <= set(FIELD_RULES) and set(written["base_model"]) <= set(BASE_MODEL_RULES)


def test_manifest_larger_than_the_bound_is_refused_before_parsing(deltas, tmp_path):
    directory = deltas["language"].save_pretrained(tmp_path / "artifact")
    config = directory / CONFIG_FILE
    config.write_text(set_field("notes", "x" * 50_000_000)(config.read_text()), encoding="utf-8")
    assert_refused(directory, config, "bytes", f"{MAX_MANIFEST_BYTES:,}")


def test_unknown_fields_and_optional_values_are_kept(deltas, tmp_path):
    directory = deltas["language"].save_pretrained(tmp_path / "artifact")
    config = directory / CONFIG_FILE
    manifest = json.loads(config.read_text())
    manifest.update(notes={"deep": [[[["ok"]]]], "big": 2**100}, license=None,
                    metrics={"dev_f1": 0.9, "held_out_mlm_loss": 3, "note": "n/a", "dev_las": None})
    manifest["base_model"]["revision"] = None
    config.write_text(_dump(manifest), encoding="utf-8")
    loaded = load_delta(directory)
    assert loaded.config.extra == {"notes": {"deep": [[[["ok"]]]], "big": 2**100}}
    assert loaded.config.metrics["note"] == "n/a" and loaded.config.license is None
    version, created = DeltaStore().import_directory(directory)
    assert created and version.created_at == manifest["created_at"]


# ---- a config built in Python ------------------------------------------------------------------


def _nested(depth: int) -> list:
    """`depth` nested lists, built without recursion."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


PYTHON_CASES = [
    ("created_at", {"when": "now"}),
    ("created_at", None),
    ("num_parameters", 10**5000),
    ("labels", [1, 2]),
    ("metrics", {"dev_f1": float("nan")}),
    ("lineage", "from lang/en"),
    ("training", {"log": _nested(100_000)}),
    ("training", {"data": object()}),
    ("training", {1: "not a string key"}),
]


@pytest.mark.parametrize(("field", "value"), [pytest.param(*c, id=f"{c[0]}-{i}") for i, c in enumerate(PYTHON_CASES)])
def test_config_built_in_python_is_checked_by_the_same_schema(deltas, field, value):
    fields = {"kind": "language", "language": "hau", "base_model": BaseModelInfo("bert", "a" * 64, "b" * 64),
              "num_parameters": 1000, field: value}
    with pytest.raises(DeltaFormatError, match=f"field '{field}'"):
        DeltaConfig(**fields)


@pytest.mark.parametrize(("field", "value"), [("created_at", {"when": "now"}), ("extra", {"notes": _nested(100)})])
def test_store_add_of_a_config_changed_after_it_was_built_writes_nothing(deltas, field, value):
    delta = deltas["language"]
    config = DeltaConfig(**vars(delta.config))
    setattr(config, field, value)
    store = DeltaStore()
    with pytest.raises(DeltaFormatError, match="'created_at'" if field == "created_at" else "'notes'"):
        store.add(SparseDelta(delta.params, config, delta.head))
    assert store.list() == []
    assert list(store.blobs_dir.iterdir()) == []


# ---- safetensors headers that give a key twice -------------------------------------------------


def _with_duplicate_key(data: bytes, in_metadata: bool) -> tuple[bytes, str]:
    """Safetensors bytes whose header gives a key twice (with the same value), written by hand, and the key:
    the first tensor's name, or the metadata's 'format'."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    obj = header["__metadata__"] if in_metadata else header
    name = "format" if in_metadata else next(k for k in header if k != "__metadata__")
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in [*obj.items(), (name, obj[name])]) + "}"
    if in_metadata:
        rest = {k: v for k, v in header.items() if k != "__metadata__"}
        text = '{"__metadata__":' + text + "," + json.dumps(rest)[1:]
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + header_len :], name


def _rewrite(directory: Path, file_name: str, data: bytes, sha_field: str) -> None:
    (directory / file_name).write_bytes(data)
    manifest = json.loads((directory / CONFIG_FILE).read_text())
    manifest[sha_field] = hashlib.sha256(data).hexdigest()
    (directory / CONFIG_FILE).write_text(_dump(manifest), encoding="utf-8")


@pytest.fixture
def masked_delta(deltas, ner_model) -> SparseDelta:
    """The task delta with per-language sub-network masks (an `sft_masks.safetensors` file)."""
    generator = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(p.shape, generator=generator) < 0.1 for n, p in base_parameters(ner_model).items()}
             for lang in ("hau", "swa")}
    task = deltas["task"]
    return SparseDelta(task.params, task.config, task.head, SubnetworkMasks.from_bool(masks))


@pytest.mark.parametrize("file_name", [TENSORS_FILE, MASKS_FILE])
@pytest.mark.parametrize("in_metadata", [False, True], ids=["tensor-key", "metadata-key"])
def test_safetensors_header_with_a_duplicated_key_is_refused(masked_delta, tmp_path, file_name, in_metadata):
    directory = masked_delta.save_pretrained(tmp_path / "artifact")
    sha_field = "tensors_sha256" if file_name == TENSORS_FILE else "masks_sha256"
    data, name = _with_duplicate_key((directory / file_name).read_bytes(), in_metadata)
    _rewrite(directory, file_name, data, sha_field)
    assert_refused(directory, directory / file_name, repr(name), "more than once")


def test_metadata_json_is_bounded_too(deltas, tmp_path):
    directory = deltas["language"].save_pretrained(tmp_path / "artifact")
    data = (directory / TENSORS_FILE).read_bytes()
    header, body = split_header(data)
    header["__metadata__"]["shapes"] = "[" * 200_000 + "]" * 200_000  # nesting hidden inside a string value
    _rewrite(directory, TENSORS_FILE, join_header(header, body), "tensors_sha256")
    with pytest.raises(DeltaFormatError, match="metadata 'shapes' is not a JSON object.*nested more than"):
        load_delta(directory)
