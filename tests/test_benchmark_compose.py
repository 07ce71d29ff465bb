"""`benchmarks/compose.py` runs end to end (its `--small` smoke size, on the CPU; `--device cuda` takes the
same code path with the deltas moved to the device) and checks its own results as it goes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def compose_script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports benchmarks/table.py
    spec = importlib.util.spec_from_file_location("compose_benchmark", BENCHMARKS / "compose.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("table", None)


def test_the_compose_benchmark_prints_its_table(compose_script, capsys):
    compose_script.main(["--small", "--repeats", "1", "--skip-baseline", "--device", "cpu"])
    output = capsys.readouterr().out
    for row in ("bytes per non-zero, language delta", "format v1", "load both deltas", "compose both (cpu)",
                "revert both (cpu)", "hot swap of the (task, language) pair (cpu)"):
        assert row in output, row
    assert "revert is bit-identical" in output
