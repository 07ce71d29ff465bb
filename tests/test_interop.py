"""composable-sft interop: `pytorch_diff.bin` files written here the way that tool writes them.

The files are built by an encoder that follows composable-sft's `encode_sparse_tensor` (COO
coordinates flattened COLUMN-major with multipliers `cumprod([1] + size[:-1])`, sorted, gaps as a
list whose first item is a `numpy.int64`), and checked against a reference apply that decodes them
the composable-sft way (coordinates -> `torch.sparse_coo_tensor` -> dense add; `abs` copied).
"""

from __future__ import annotations

import contextlib
import os
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sftstore import interop
from sftstore.demo import NER_LABELS
from sftstore.errors import BaseModelMismatchError, DeltaFormatError
from sftstore.interop import (
    COMPOSABLE_SFT_FILE,
    base_model_prefix_for,
    from_composable_sft,
    read_composable_sft,
    to_composable_sft,
)
from sftstore.modeling import base_parameters, head_parameters, load_model

# One sparse-diffed and one dense (`abs`) MLM-head parameter per architecture, by base_model_prefix.
MLM_HEAD = {
    "bert": ("cls.predictions.transform.dense.weight", "cls.predictions.bias"),
    "roberta": ("lm_head.dense.weight", "lm_head.bias"),
}
QUERY = "encoder.layer.0.attention.self.query.weight"
NUMPY_SCALAR = np.int64(0).__reduce__()[0]  # numpy's multiarray.scalar, under either numpy's module name
MB = 2**20


# ---- composable-sft, as that tool does it -----------------------------------------------------


def encode(dense: torch.Tensor, index_dtype: type = np.int64) -> dict:
    """composable-sft's `encode_sparse_tensor` of a dense difference tensor, its flat indices of `index_dtype`."""
    sparse = dense.to_sparse().coalesce()
    multipliers = np.cumprod([1] + list(sparse.size())[:-1], dtype=np.int64)
    indices = (multipliers @ sparse.indices().numpy().astype(np.int64)).astype(index_dtype)
    perm = np.argsort(indices, kind="stable")
    indices = indices[perm]
    steps = (indices[1:] - indices[:-1]).tolist()
    if len(indices):
        steps = [indices[0]] + steps  # a numpy scalar (numpy.int64) first, plain ints after
    return {"size": sparse.size(), "index_steps": steps, "values": sparse.values()[torch.from_numpy(perm)]}


def reference_apply(state: dict[str, torch.Tensor], path: Path, with_abs: bool = True) -> dict[str, torch.Tensor]:
    """Apply a `pytorch_diff.bin` to `{full name: tensor}` the composable-sft way (decode, dense add, copy)."""
    data = torch.load(path, map_location="cpu", weights_only=False)  # the tests' own files
    state = {name: tensor.clone() for name, tensor in state.items()}
    for name, encoding in data["diffs"].items():
        size = list(encoding["size"])
        indices = np.cumsum(np.asarray(encoding["index_steps"], dtype=np.int64))
        divisors = np.cumprod([1] + size[:-1], dtype=np.int64)
        coordinates = (indices[None, :] // divisors[:, None]) % np.asarray(size, dtype=np.int64)[:, None]
        coo = torch.sparse_coo_tensor(torch.from_numpy(coordinates), encoding["values"], size, check_invariants=True)
        state[name] += coo.to_dense()
    if with_abs:
        for name, tensor in data["abs"].items():
            state[name].copy_(tensor)
    return state


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights under every name: transformers 5 lists XLM-R's lm_head before roberta, so the
    # de-duplicated names would hide roberta.embeddings.word_embeddings.weight.
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}


def random_diff(shape: torch.Size, generator: torch.Generator, density: float = 0.1) -> torch.Tensor:
    mask = torch.rand(shape, generator=generator) < density
    return torch.randn(shape, generator=generator) * 0.05 * mask


def write_sft(path: Path, diffs: dict, abs_tensors: dict, **extra) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"diffs": diffs, "abs": abs_tensors, **extra}, path / COMPOSABLE_SFT_FILE)
    return path / COMPOSABLE_SFT_FILE


def base_diffs(model: torch.nn.Module, seed: int) -> dict:
    """An encoded diff for every base parameter (as composable-sft writes one per maskable parameter),
    the last one empty."""
    generator = torch.Generator().manual_seed(seed)
    prefix = model.base_model_prefix
    names = sorted(base_parameters(model))
    diffs = {}
    for name in names:
        shape = base_parameters(model)[name].shape
        dense = random_diff(shape, generator) if name != names[-1] else torch.zeros(shape)
        diffs[f"{prefix}.{name}"] = encode(dense)
    return diffs


@pytest.fixture
def mlm_model(tiny_base_dir):
    return load_model(tiny_base_dir, "masked-lm")


@pytest.fixture
def language_sft(mlm_model, tmp_path) -> Path:
    """A language SFT: base diffs, plus an MLM-head diff and an MLM-head `abs` tensor."""
    head_diff, head_abs = MLM_HEAD[mlm_model.base_model_prefix]
    heads = head_parameters(mlm_model)
    generator = torch.Generator().manual_seed(5)
    diffs = base_diffs(mlm_model, seed=4)
    diffs[head_diff] = encode(random_diff(heads[head_diff].shape, generator))
    abs_tensors = {head_abs: torch.randn(heads[head_abs].shape, generator=generator)}
    return write_sft(tmp_path / "lang-sft", diffs, abs_tensors)


@pytest.fixture
def task_sft(ner_model, tmp_path) -> Path:
    """A task SFT: base diffs and the classifier in `abs`."""
    generator = torch.Generator().manual_seed(6)
    abs_tensors = {name: torch.randn(p.shape, generator=generator) for name, p in head_parameters(ner_model).items()}
    return write_sft(tmp_path / "task-sft", base_diffs(ner_model, seed=7), abs_tensors)


@contextlib.contextmanager
def traced_peak() -> Iterator[list[int]]:
    """Yields a list that gets the peak bytes allocated by Python and numpy inside the block (torch's
    allocator is not traced; numpy's is, and numpy is what expands a nested list)."""
    peak: list[int] = []
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        if started:
            tracemalloc.stop()


class Reduces:
    """Pickles as the call `function(*args)`: what a crafted file can ask of the globals it may use."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def minimal_sft(tmp_path: Path, entry: dict | None = None, **extra) -> Path:
    """A one-entry file on the 1-D LayerNorm bias (32 elements), `entry` overriding its fields."""
    good = {"size": torch.Size([32]), "index_steps": [np.int64(3), 2, 5], "values": torch.tensor([0.1, -0.2, 0.3])}
    return write_sft(tmp_path / "sft", {"bert.embeddings.LayerNorm.bias": {**good, **(entry or {})}}, {}, **extra)


# ---- import -------------------------------------------------------------------------------------


def test_the_encoder_writes_numpy_scalars_and_column_major_indices(language_sft, mlm_model):
    data = torch.load(language_sft, weights_only=False)
    prefix = mlm_model.base_model_prefix
    steps = data["diffs"][f"{prefix}.{QUERY}"]["index_steps"]
    assert type(steps[0]) is np.int64 and all(type(s) is int for s in steps[1:])
    with pytest.raises(Exception, match="numpy"):
        torch.load(language_sft, weights_only=True)  # why read_composable_sft allows numpy scalars
    dense = torch.zeros(3, 4)
    dense[1, 2], dense[0, 3] = 1.5, -2.0  # column-major flat: 1 + 3*2 = 7, 0 + 3*3 = 9
    encoded = encode(dense)
    assert encoded["index_steps"] == [7, 2] and encoded["values"].tolist() == [1.5, -2.0]


def test_read_returns_row_major_sorted_indices(tmp_path):
    dense = torch.zeros(3, 4)
    dense[1, 2], dense[0, 3] = 1.5, -2.0
    path = write_sft(tmp_path / "sft", {"bert.x.weight": encode(dense)}, {"classifier.bias": torch.ones(2)})
    diffs, abs_tensors = read_composable_sft(path.parent)  # the directory works too
    entry = diffs["bert.x.weight"]
    assert entry["size"] == torch.Size([3, 4])
    assert entry["indices"].tolist() == [3, 6] and entry["values"].tolist() == [-2.0, 1.5]  # row-major: 0*4+3, 1*4+2
    assert torch.equal(abs_tensors["classifier.bias"], torch.ones(2))


def test_import_language_sft_composes_like_composable_sft(language_sft, mlm_model, tiny_base_dir):
    delta = from_composable_sft(language_sft, mlm_model, kind="language", name="hau", base_id="tiny")
    prefix = mlm_model.base_model_prefix
    head_diff, head_abs = MLM_HEAD[prefix]
    assert delta.head == {} and delta.kind == "language" and delta.config.task_type == "masked-lm"
    assert delta.config.lineage == {"converted_from": "composable-sft", "dropped": sorted([head_diff, head_abs])}
    assert delta.config.method["name"] == "composable-sft-import"
    written = torch.load(language_sft, weights_only=False)["diffs"]
    touched = {n[len(prefix) + 1 :] for n, e in written.items() if n.startswith(prefix + ".") and e["index_steps"]}
    assert sorted(base_parameters(mlm_model))[-1] not in touched  # its diff is empty: skipped
    assert delta.params.keys() == touched
    assert delta.nnz == sum(len(e["index_steps"]) for e in written.values()) - len(written[head_diff]["index_steps"])
    assert all(e.indices.dtype == torch.int32 and e.values.dtype == torch.float32 for e in delta.params.values())

    fresh_mlm = load_model(tiny_base_dir, "masked-lm")
    expected = reference_apply(params_of(fresh_mlm), language_sft)
    ner = load_model(tiny_base_dir, "token-classification", NER_LABELS)  # a language delta composes with any head
    ner_head = {n: p.detach().clone() for n, p in head_parameters(ner).items()}
    delta.apply(ner)
    for name, param in base_parameters(ner).items():
        assert torch.equal(param, expected[f"{prefix}.{name}"]), name
    assert all(torch.equal(p, ner_head[n]) for n, p in head_parameters(ner).items())
    delta.apply(fresh_mlm)  # the MLM head is dropped: unchanged, unlike composable-sft's apply
    for name in (head_diff, head_abs):
        assert torch.equal(params_of(fresh_mlm)[name], params_of(mlm_model)[name])
        assert not torch.equal(expected[name], params_of(mlm_model)[name])


def test_import_task_sft_composes_like_composable_sft(task_sft, ner_model, tiny_base_dir):
    delta = from_composable_sft(
        task_sft, ner_model, kind="task", name="ner", task_type="token-classification", labels=NER_LABELS,
        method={"original": "lt-sft"}, base_id="tiny",
    )
    assert delta.config.method == {"name": "composable-sft-import", "original": "lt-sft"}
    assert delta.config.labels == NER_LABELS and delta.config.lineage["dropped"] == []
    abs_tensors = torch.load(task_sft, weights_only=False)["abs"]
    assert delta.head.keys() == abs_tensors.keys() == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(delta.head[n], t) for n, t in abs_tensors.items())

    fresh = load_model(tiny_base_dir, "token-classification", NER_LABELS)
    expected = reference_apply(params_of(fresh), task_sft)
    delta.apply(fresh)
    got = params_of(fresh)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got), [n for n in got if not torch.equal(got[n], expected[n])]


def test_a_file_written_under_numpy_1_is_read(tmp_path):
    """numpy 1.x pickles its scalars as `numpy.core.multiarray.scalar`; simulate by renaming the global
    in a legacy-format (non-zip) torch file, whose pickle has no absolute offsets."""
    obj = {"diffs": {"bert.b": {"size": torch.Size([8]), "index_steps": [np.int64(2), 3], "values": torch.ones(2)}}}
    path = tmp_path / COMPOSABLE_SFT_FILE
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray\nscalar" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    diffs, _ = read_composable_sft(path)
    assert diffs["bert.b"]["indices"].tolist() == [2, 5]


@pytest.mark.parametrize("index_dtype", [np.int32, np.uint32, np.int16, np.uint64])
def test_index_steps_of_any_numpy_integer_type_are_read(index_dtype, tmp_path):
    dense = random_diff(torch.Size([6, 5]), torch.Generator().manual_seed(3), density=0.4)
    narrow = encode(dense, index_dtype)  # as composable-sft writes it from indices of that type
    every_step = {**narrow, "index_steps": [index_dtype(step) for step in narrow["index_steps"]]}
    path = write_sft(tmp_path / "sft", {"bert.a": encode(dense), "bert.b": narrow, "bert.c": every_step}, {})
    steps = torch.load(path, weights_only=False)["diffs"]["bert.b"]["index_steps"]
    assert len(steps) > 3 and type(steps[0]) is index_dtype and all(type(s) is int for s in steps[1:])
    diffs, _ = read_composable_sft(path)
    for name in ("bert.b", "bert.c"):
        assert torch.equal(diffs[name]["indices"], diffs["bert.a"]["indices"])
        assert torch.equal(diffs[name]["values"], diffs["bert.a"]["values"])


def test_latest_composable_sft_layout_with_empty_block_sparses_is_read(tmp_path):
    diffs, _ = read_composable_sft(minimal_sft(tmp_path, block_sparses={}))
    assert diffs["bert.embeddings.LayerNorm.bias"]["indices"].tolist() == [3, 5, 10]


# ---- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["lang", "task"])
def test_export_then_import_round_trips(which, lang_delta, task_delta, ner_model, tmp_path):
    delta = lang_delta if which == "lang" else task_delta
    path = to_composable_sft(delta, tmp_path / "out", ner_model.base_model_prefix)
    assert path == tmp_path / "out" / COMPOSABLE_SFT_FILE
    assert [p.name for p in path.parent.iterdir()] == [COMPOSABLE_SFT_FILE]  # no temp file left behind
    torch.load(path, weights_only=True)  # plain ints and torch.Size: no extra globals needed
    fields = dict(kind="language", name="hau") if which == "lang" else dict(
        kind="task", name="ner", task_type="token-classification", labels=NER_LABELS
    )
    back = from_composable_sft(path, ner_model, **fields)
    assert back.params.keys() == delta.params.keys()
    for name, entry in delta.params.items():
        assert back.params[name].shape == entry.shape
        assert torch.equal(back.params[name].indices, entry.indices), name
        assert torch.equal(back.params[name].values, entry.values), name
    assert back.head.keys() == delta.head.keys()
    assert all(torch.equal(back.head[n], t) for n, t in delta.head.items())
    assert back.config.base_model.fingerprint == delta.config.base_model.fingerprint


@pytest.mark.parametrize("which", ["lang", "task"])
def test_export_applies_in_composable_sft_like_delta_apply(
    which, lang_delta, task_delta, ner_model, tiny_base_dir, tmp_path
):
    delta = lang_delta if which == "lang" else task_delta
    prefix = ner_model.base_model_prefix
    path = to_composable_sft(delta, tmp_path / "out", prefix)
    data = torch.load(path, weights_only=True)
    assert all(name.startswith(prefix + ".") for name in data["diffs"])
    assert set(data["abs"]) == set(delta.head)
    fresh = load_model(tiny_base_dir, "token-classification", NER_LABELS)
    expected = reference_apply(params_of(fresh), path)
    delta.apply(fresh)
    got = params_of(fresh)
    assert all(torch.equal(got[n], expected[n]) for n in got), [n for n in got if not torch.equal(got[n], expected[n])]


# ---- refusals -----------------------------------------------------------------------------------

MARKER_NAME = "pwned-marker"


def _make_marker(path: str) -> None:  # what a malicious pickle would run
    Path(path).write_text("ran")


class _CallsFunction:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (str(self.marker),))


class _CallsSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload,global_name", [(_CallsFunction, "_make_marker"), (_CallsSystem, "system")])
def test_a_file_asking_for_other_globals_is_refused_unexecuted(payload, global_name, tmp_path):
    marker = tmp_path / MARKER_NAME
    entry = {"size": torch.Size([4]), "index_steps": [1], "values": torch.ones(1)}
    path = write_sft(tmp_path / "sft", {"bert.b": entry}, {"x": payload(marker)})
    with pytest.raises(DeltaFormatError, match=rf"{COMPOSABLE_SFT_FILE}.*global '[\w.]*{global_name}'"):
        read_composable_sft(path)
    assert not marker.exists()


def test_a_class_outside_the_allowlist_is_refused(tmp_path):
    import argparse

    path = write_sft(tmp_path / "sft", {}, {}, extra=argparse.Namespace(a=1))
    with pytest.raises(DeltaFormatError, match=r"global 'argparse.Namespace'"):
        read_composable_sft(path)


def test_garbage_and_wrong_layouts_are_refused(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 definitely not a torch file " * 10)
    with pytest.raises(DeltaFormatError, match=r"garbage\.bin: not a readable torch file"):
        read_composable_sft(garbage)
    with pytest.raises(DeltaFormatError, match=r"missing\.bin: not a readable torch file"):
        read_composable_sft(tmp_path / "missing.bin")
    not_dict = tmp_path / "list.bin"
    torch.save([1, 2], not_dict)
    with pytest.raises(DeltaFormatError, match=r"list\.bin: no 'diffs'"):
        read_composable_sft(not_dict)
    no_diffs = tmp_path / "nodiffs.bin"
    torch.save({"abs": {}}, no_diffs)
    with pytest.raises(DeltaFormatError, match=r"nodiffs\.bin: no 'diffs'"):
        read_composable_sft(no_diffs)
    old_layout = tmp_path / "body.bin"
    torch.save({"body": {}, "head": {}, "diffs": {}}, old_layout)
    with pytest.raises(DeltaFormatError, match=r"unexpected top-level entries \['body', 'head'\]"):
        read_composable_sft(old_layout)
    with pytest.raises(DeltaFormatError, match="block_sparses"):
        read_composable_sft(minimal_sft(tmp_path, block_sparses={"bert.x": {"parameters": {}, "buffers": {}}}))


@pytest.mark.parametrize(
    "value,asked",
    [
        (np.float64(1.5), r"numpy.dtype\('f8'\)"),
        (np.bool_(True), r"numpy.dtype\('\|?b1'\)"),
        (Reduces(NUMPY_SCALAR, Reduces(np.dtype, "V1000000000", False, True)), r"numpy.dtype\('V1000000000'\)"),
        (Reduces(NUMPY_SCALAR, np.dtype("i8"), b"\x00" * 3), r"a numpy scalar of \w+ that is not a plain integer"),
    ],
)
def test_numpy_scalars_other_than_integers_are_refused_unbuilt(value, asked, tmp_path):
    path = minimal_sft(tmp_path, {"index_steps": [value, 2, 5]})
    with traced_peak() as peak, pytest.raises(DeltaFormatError, match=rf"refused: the file asks for {asked}"):
        read_composable_sft(path)
    assert peak[0] < 50 * MB  # the void scalar (1 GB of zeros) was never made


def test_a_nested_index_steps_bomb_is_refused_in_small_memory(tmp_path):
    """The issue's file: one inner list shared 10,000 times, which numpy would expand to 10**8 int64s (800 MB)."""
    inner = list(range(1, 10_001))
    entry = {"size": torch.Size([10_000, 10_000]), "index_steps": [inner] * 10_000, "values": torch.ones(1)}
    path = write_sft(tmp_path / "sft", {"bert.x.weight": entry}, {})
    assert path.stat().st_size < 60_000
    where = rf"{COMPOSABLE_SFT_FILE}: diffs entry 'bert.x.weight'"
    message = rf"{where}: 'index_steps' is not a flat list of integers \(it holds list\)"
    with traced_peak() as peak, pytest.raises(DeltaFormatError, match=message):
        read_composable_sft(path)
    assert peak[0] < 50 * MB


def test_index_steps_shared_between_entries_are_refused_before_decoding(tmp_path):
    entry = {"size": torch.Size([10**8]), "index_steps": [0] + [1] * 4_999, "values": torch.zeros(5_000)}
    path = write_sft(tmp_path / "sft", {f"bert.p{i}": entry for i in range(2_000)}, {})  # 10**7 steps
    size = path.stat().st_size
    message = rf"diffs entry 'bert.p\d+': 'index_steps' bring the file's total to \d+ steps, more than its {size} bytes"
    with traced_peak() as peak, pytest.raises(DeltaFormatError, match=message):
        read_composable_sft(path)
    assert peak[0] < 50 * MB


def test_files_bigger_once_read_than_on_disk_are_refused_unread(tmp_path, monkeypatch):
    path = minimal_sft(tmp_path)
    deflated = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    assert torch.load(deflated, weights_only=False)["diffs"]  # torch itself would inflate it
    with pytest.raises(DeltaFormatError, match=r"deflated\.bin: compressed zip records \[.*data\.pkl"):
        read_composable_sft(deflated)
    monkeypatch.setattr(interop, "MAX_FILE_BYTES", 100)
    too_big = rf"{COMPOSABLE_SFT_FILE}: {path.stat().st_size} bytes; files over 100 bytes are refused unread"
    with pytest.raises(DeltaFormatError, match=too_big):
        read_composable_sft(path)
    monkeypatch.undo()
    monkeypatch.setattr(interop, "_MAX_ENTRIES", 1)
    with pytest.raises(DeltaFormatError, match=r"more than 1 diffs and abs entries"):
        read_composable_sft(write_sft(tmp_path / "two", {}, {"a": torch.ones(1), "b": torch.ones(1)}))


@pytest.mark.parametrize("missing", ["size", "index_steps", "values"])
def test_an_entry_missing_a_field_is_refused(missing, tmp_path):
    path = minimal_sft(tmp_path)
    data = torch.load(path, weights_only=False)
    del data["diffs"]["bert.embeddings.LayerNorm.bias"][missing]
    torch.save(data, path)
    where = rf"{COMPOSABLE_SFT_FILE}: diffs entry 'bert.embeddings.LayerNorm.bias'"
    with pytest.raises(DeltaFormatError, match=rf"{where}: missing '{missing}'"):
        read_composable_sft(path)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"index_steps": [3, -1, 5]}, r"'index_steps'\[1\] is -1: unsorted indices"),
        ({"index_steps": [3, 0, 5]}, r"'index_steps'\[1\] is 0: a duplicate index"),
        ({"index_steps": [np.int64(-3), 2, 5]}, r"'index_steps'\[0\] \(the first index\) is -3"),
        ({"index_steps": [3, 2, 27]}, r"'index_steps' reach past the end of a parameter of 32 elements \(index 32\)"),
        ({"index_steps": [3, 2, 2**40]}, r"'index_steps' reach past the end of a parameter of 32 elements"),
        ({"index_steps": [3, 2.0, 5]}, r"'index_steps' is not a flat list of integers \(it holds float\)"),
        ({"index_steps": [3, True, 5]}, r"'index_steps' is not a flat list of integers \(it holds bool\)"),
        ({"size": torch.Size([2])}, r"'index_steps' reach past the end of a parameter of 2 elements \(3 steps\)"),
        ({"index_steps": [3, "2", 5]}, r"'index_steps' is not a flat list of integers"),
        ({"index_steps": torch.tensor([3, 2, 5])}, r"'index_steps' is a Tensor; expected a list of integers"),
        ({"values": torch.tensor([0.1, 0.2])}, r"'values' has shape \[2\]; 'index_steps' has 3 entries"),
        ({"values": torch.tensor([0.1, float("nan"), 0.3])}, r"'values' holds NaN or Inf"),
        ({"index_steps": [3, [2], 5]}, r"'index_steps' is not a flat list of integers"),
        ({"index_steps": [3, 2**64, 5]}, r"'index_steps' reach past the end .* \(a step over 64 bits\)"),
        ({"values": torch.tensor([1, 2, 3])}, r"'values' is torch.int64 \(torch.strided\); expected a dense floating"),
        ({"values": [0.1, 0.2, 0.3]}, r"'values' is list; expected a dense floating-point tensor"),
        ({"size": [32.0]}, r"'size' is \[32.0\]; expected a torch.Size"),
        ({"size": torch.Size([1] * 65)}, r"'size' is torch.Size\(.*; expected a torch.Size"),
        ({"size": torch.Size([2**31, 2**31, 2])}, r"'size' \[2147483648, 2147483648, 2\] has more than \d+ elements"),
        ({"values": torch.ones(1).expand(3)}, r"'values' has 3 elements over a storage of 4 bytes \(an expanded"),
        ({"values": torch.empty(3, device="meta")}, r"'values' is on device 'meta'"),
    ],
)
def test_malformed_entries_are_refused_naming_file_and_entry(entry, message, tmp_path):
    where = rf"{COMPOSABLE_SFT_FILE}: diffs entry 'bert.embeddings.LayerNorm.bias'"
    with pytest.raises(DeltaFormatError, match=rf"{where}: {message}"):
        read_composable_sft(minimal_sft(tmp_path, entry))


@pytest.mark.parametrize(
    "tensor,message",
    [
        (torch.tensor([1.0, float("inf")]), "holds NaN or Inf"),
        (torch.ones(1).expand(10**12), r"has 1000000000000 elements over a storage of 4 bytes \(an expanded view\)"),
    ],
)
def test_a_bad_abs_tensor_is_refused(tensor, message, tmp_path):
    path = write_sft(tmp_path / "sft", {}, {"classifier.bias": tensor})
    with pytest.raises(DeltaFormatError, match=rf"abs entry 'classifier.bias' {message}"):
        read_composable_sft(path)


def test_a_shape_that_does_not_fit_the_base_is_refused(ner_model, tmp_path):
    prefix = ner_model.base_model_prefix
    path = write_sft(tmp_path / "sft", {f"{prefix}.{QUERY}": encode(torch.ones(16, 32))}, {})
    with pytest.raises(BaseModelMismatchError, match=rf"'{QUERY}' has shape \[16, 32\] in the file but \[32, 32\]"):
        from_composable_sft(path, ner_model, kind="language", name="hau")


def test_names_the_base_does_not_have_are_refused(ner_model, tmp_path):
    prefix = ner_model.base_model_prefix
    other = "roberta" if prefix == "bert" else "bert"
    wrong_arch = write_sft(tmp_path / "a", {f"{other}.{QUERY}": encode(torch.ones(32, 32))}, {})
    with pytest.raises(BaseModelMismatchError, match="another architecture"):
        from_composable_sft(wrong_arch, ner_model, kind="language", name="hau")
    unknown = write_sft(tmp_path / "b", {f"{prefix}.encoder.layer.9.x.weight": encode(torch.ones(2))}, {})
    with pytest.raises(BaseModelMismatchError, match=r"'encoder.layer.9.x.weight' .* does not exist in the base model"):
        from_composable_sft(unknown, ner_model, kind="language", name="hau")


def test_task_heads_must_match_the_model(task_sft, ner_model, tmp_path):
    task = dict(kind="task", name="ner", task_type="token-classification", labels=NER_LABELS)
    data = torch.load(task_sft, weights_only=False)
    head_diff = write_sft(tmp_path / "a", data["diffs"] | {"classifier.bias": encode(torch.ones(7))}, data["abs"])
    with pytest.raises(DeltaFormatError, match="'classifier.bias' is a sparse difference on a head parameter"):
        from_composable_sft(head_diff, ner_model, **task)
    partial = write_sft(tmp_path / "b", data["diffs"], {"classifier.weight": data["abs"]["classifier.weight"]})
    with pytest.raises(BaseModelMismatchError, match=r"no abs tensors for head parameter\(s\) \['classifier.bias'\]"):
        from_composable_sft(partial, ner_model, **task)
    wrong = write_sft(tmp_path / "c", data["diffs"], data["abs"] | {"classifier.bias": torch.ones(3)})
    with pytest.raises(BaseModelMismatchError, match=r"'classifier.bias' has shape \[3\] in the file but \[7\]"):
        from_composable_sft(wrong, ner_model, **task)
    full_query = {f"{ner_model.base_model_prefix}.{QUERY}": torch.ones(32, 32)}
    base_in_full = write_sft(tmp_path / "d", data["diffs"], data["abs"] | full_query)
    with pytest.raises(DeltaFormatError, match="stores a base-model parameter in full"):
        from_composable_sft(base_in_full, ner_model, **task)


def test_base_model_prefix_for_reads_the_config(tiny_bert_dir, tiny_xlmr_dir):
    assert base_model_prefix_for(tiny_bert_dir) == "bert"
    assert base_model_prefix_for(tiny_xlmr_dir) == "roberta"


def test_cli_export_and_import_composable_sft(tmp_path, tiny_bert_dir):
    from click.testing import CliRunner

    from sftstore.demo import synthetic_delta
    from sftstore.store import DeltaStore
    from sftstore_cli.main import cli

    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    task_delta = synthetic_delta(model, 0.05, 4, kind="task", task="ner", task_type="token-classification",
                                 labels=NER_LABELS)
    DeltaStore().add(task_delta)
    runner = CliRunner()
    exported = runner.invoke(cli, ["export", "task/ner", str(tmp_path / "out"), "--format", "composable-sft"])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "out" / "pytorch_diff.bin").is_file()
    usage = runner.invoke(cli, ["import", str(tmp_path / "out"), "--base", str(tiny_bert_dir)])
    assert usage.exit_code == 2 and "--task-type" in usage.output
    imported = runner.invoke(cli, ["import", str(tmp_path / "out"), "--base", str(tiny_bert_dir), "--task", "ner2",
                                   "--task-type", "token-classification", "--labels", ",".join(NER_LABELS), "--json"])
    assert imported.exit_code == 0, imported.output
    back = DeltaStore().load("task/ner2")
    for name, entry in task_delta.params.items():
        assert torch.equal(back.params[name].indices.long(), entry.indices.long())
        assert torch.equal(back.params[name].values, entry.values)
    for name, tensor in task_delta.head.items():
        assert torch.equal(back.head[name], tensor)
