"""The C extension (`sftstore/_sparse_kernel.c`) against the pure numpy/PyTorch passes it replaces: same bits."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from sftstore import gaps, native, sparse_update
from sftstore.native import disabled
from sftstore.sparse_update import Job, add_in_place, restore

needs_kernel = pytest.mark.skipif(not native.available(), reason="the C extension is not built here")


def weights_and_jobs(seed: int, values_dtype=torch.float32, weights_dtype=torch.float32):
    """Three flat parameters (one of them larger than several chunks) and a sparse job on each."""
    generator = torch.Generator().manual_seed(seed)
    flats, jobs = {}, []
    for name, numel, density in (("big", 300_000, 0.2), ("small", 1_000, 0.5), ("empty", 50, 0.0)):
        flat = torch.randn(numel, generator=generator).to(weights_dtype)
        indices = (torch.rand(numel, generator=generator) < density).nonzero().squeeze(1).to(torch.int32)
        values = (torch.randn(indices.numel(), generator=generator) * 1e-3).to(values_dtype)
        flats[name] = flat
        jobs.append(Job(name, flat, indices, values))
    return flats, jobs


class CountingKernel:
    """The extension, counting the calls of each function."""

    def __init__(self, module) -> None:
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        function = getattr(self.module, name)

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return function(*args)

        return counted


def test_the_kernel_is_built_wherever_a_c_compiler_and_python_headers_are():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: the pure-PyTorch pass is the one in use")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        pytest.skip("no Python headers here: the pure-PyTorch pass is the one in use")
    assert native.available()


@needs_kernel
@pytest.mark.parametrize("scale", [1.0, 0.5, -1.25])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
def test_the_fused_pass_adds_exactly_what_pytorch_adds(monkeypatch, scale, values_dtype):
    monkeypatch.setattr(sparse_update, "KERNEL_CHUNK", 4_096)  # many chunks, over both threads
    fused_flats, fused_jobs = weights_and_jobs(7, values_dtype)
    plain_flats, plain_jobs = weights_and_jobs(7, values_dtype)
    originals = {name: flat.clone() for name, flat in fused_flats.items()}

    fused = add_in_place(fused_jobs, scale)
    with disabled():
        plain = add_in_place(plain_jobs, scale)

    for name in fused_flats:
        assert torch.equal(fused_flats[name], plain_flats[name]), name
    assert len(fused) > 10
    for touched in fused:
        assert torch.equal(touched.before, originals[touched.name][touched.indices.long()])
    assert torch.equal(torch.cat([t.before for t in fused]), torch.cat([t.before for t in plain]))
    restore(fused, fused_flats)
    for name, flat in fused_flats.items():
        assert torch.equal(flat, originals[name]), name


@needs_kernel
def test_the_fused_pass_does_the_adding(monkeypatch):
    counting = CountingKernel(native.kernel())
    monkeypatch.setattr(native, "_module", counting)
    flats, jobs = weights_and_jobs(10)
    originals = {name: flat.clone() for name, flat in flats.items()}
    restore(add_in_place(jobs), flats)
    assert counting.calls == {"add_keeping_originals": 2, "write_back": 2}  # "big" and "small"; "empty" has none
    assert all(torch.equal(flats[name], originals[name]) for name in flats)


@needs_kernel
def test_either_pass_reverts_what_the_other_added():
    flats, jobs = weights_and_jobs(8)
    strided = torch.stack([jobs[0].indices, jobs[0].indices], 1)[:, 0]  # the same indices, not contiguous
    jobs[0] = Job(jobs[0].name, jobs[0].flat, strided, jobs[0].values)
    originals = {name: flat.clone() for name, flat in flats.items()}
    touched = add_in_place(jobs)
    with disabled():
        restore(touched, flats)
    assert all(torch.equal(flats[name], originals[name]) for name in flats)

    with disabled():
        touched = add_in_place(jobs)
    restore(touched, flats)
    assert all(torch.equal(flats[name], originals[name]) for name in flats)


def test_half_precision_weights_and_int64_indices_take_the_pytorch_pass():
    for dtype in (torch.bfloat16, torch.float16):
        assert not sparse_update._fused(torch.zeros(4, dtype=dtype), torch.zeros(1, dtype=torch.int32))
    assert not sparse_update._fused(torch.zeros(4), torch.zeros(1, dtype=torch.int64))
    with disabled():
        assert not native.available()
        assert not sparse_update._fused(torch.zeros(4), torch.zeros(1, dtype=torch.int32))

    flats, jobs = weights_and_jobs(9, weights_dtype=torch.bfloat16)
    originals = {name: flat.clone() for name, flat in flats.items()}
    touched = add_in_place(jobs)
    big = jobs[0]
    expected = (originals["big"][big.indices.long()].float() + big.values).to(torch.bfloat16)
    assert torch.equal(flats["big"][big.indices.long()], expected)
    restore(touched, flats)
    assert all(torch.equal(flats[name], originals[name]) for name in flats)


@needs_kernel
@pytest.mark.parametrize("bad_index", [-1, 10])
def test_an_index_outside_the_weights_is_refused_before_anything_is_written(bad_index):
    weights = np.arange(10, dtype=np.float32)
    indices = np.array([0, 3, bad_index], dtype=np.int32)
    values, before = np.ones(3, dtype=np.float32), np.zeros(3, dtype=np.float32)
    with pytest.raises(IndexError, match=rf"index {bad_index} at position 2 is outside the 10 weights"):
        native.kernel().add_keeping_originals(weights, indices, values, before)
    with pytest.raises(IndexError, match="outside the 10 weights"):
        native.kernel().write_back(weights, indices, values)
    assert np.array_equal(weights, np.arange(10, dtype=np.float32)) and not before.any()


@needs_kernel
def test_the_kernel_checks_its_buffers():
    kernel = native.kernel()
    weights, indices = np.zeros(10, dtype=np.float32), np.array([1, 2], dtype=np.int32)
    two, three = np.ones(2, dtype=np.float32), np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="weights: expected a buffer of format 'f'"):
        kernel.add_keeping_originals(np.zeros(10), indices, two, two.copy())
    with pytest.raises(TypeError, match="indices: expected a buffer of format 'i'"):
        kernel.write_back(weights, indices.astype(np.int64), two)
    with pytest.raises(ValueError, match="values has 3 entries; expected 2"):
        kernel.add_keeping_originals(weights, indices, three, two.copy())
    with pytest.raises(BufferError):
        kernel.add_keeping_originals(weights, indices, two, bytes(8))  # `before` must be writable
    assert not weights.any()


@needs_kernel
@pytest.mark.parametrize("numel, density", [(1_000, 0.5), (200_000, 0.001), (300_000, 0.3), (10, 0.0)])
def test_gap_decoding_gives_the_same_indices_as_numpy(monkeypatch, numel, density):
    counting = CountingKernel(native.kernel())
    monkeypatch.setattr(native, "_module", counting)
    generator = torch.Generator().manual_seed(numel)
    indices = (torch.rand(numel, generator=generator) < density).nonzero().squeeze(1).to(torch.int32)
    code = gaps.encode(indices, numel)
    assert density != 0.001 or code.escape_positions.numel() > 10  # sparse enough to need escapes
    gaps.check(code, numel, "w", "test")
    decoded = gaps.decode(code, numel)
    assert counting.calls == {"decode_gaps": 1}
    with disabled():
        assert torch.equal(gaps.decode(code, numel), indices)
    assert counting.calls == {"decode_gaps": 1}
    assert decoded.dtype == torch.int32 and torch.equal(decoded, indices)

    strided = gaps.GapCode(torch.stack([code.gaps, code.gaps], 1)[:, 0], code.escape_positions, code.escape_values)
    assert not strided.gaps.is_contiguous() or strided.gaps.numel() <= 1
    assert torch.equal(gaps.decode(strided, numel), indices)


@needs_kernel
def test_gap_decoding_refuses_codes_that_leave_the_parameter():
    kernel = native.kernel()
    out = np.empty(3, dtype=np.int32)
    no_escapes = np.empty(0, dtype=np.int32)
    kernel.decode_gaps(np.array([1, 2, 3], dtype=np.uint8), no_escapes, out, 6)
    assert out.tolist() == [0, 2, 5]
    with pytest.raises(ValueError, match="within the parameter"):
        kernel.decode_gaps(np.array([1, 2, 3], dtype=np.uint8), no_escapes, out, 5)  # index 5 of 5
    with pytest.raises(ValueError, match="within the parameter"):
        kernel.decode_gaps(np.array([1, 0, 3], dtype=np.uint8), no_escapes, out, 1000)  # a zero with no escape
    with pytest.raises(ValueError, match="within the parameter"):
        kernel.decode_gaps(np.array([1, 0, 3], dtype=np.uint8), np.array([-7], dtype=np.int32), out, 1000)
    with pytest.raises(ValueError, match="out has 2 entries; expected 3"):
        kernel.decode_gaps(np.array([1, 2, 3], dtype=np.uint8), no_escapes, out[:2], 6)
    with pytest.raises(ValueError, match="does not fit int32"):
        kernel.decode_gaps(np.array([1], dtype=np.uint8), no_escapes, out[:1], 2**40)
