"""The module layout keeps its layers (DESIGN.md section 7): no module imports one above it.

Artifact (the delta, its format and what they need) depends on nothing above it; the store, the
Hub transfer, the registry and the composer on the artifact alone; store-level Hub operations on
those; training, analysis and the CLI on anything. The one allowance: `SparseDelta.from_pretrained`
/ `push_to_hub` lazily call the transfer module, which itself never touches the store.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sftstore

PACKAGE = Path(sftstore.__file__).parent
ARTIFACT = {"__init__", "errors", "_io", "naming", "settings", "base_ids", "bounded_json", "languages", "network", "redaction",
            "modeling", "config", "subnetworks", "card", "delta", "format", "interop", "composition", "summary",
            "gaps", "sparse_update", "native"}
ALLOWED = {
    **{module: ARTIFACT for module in ARTIFACT},
    "store": ARTIFACT,
    "transfer": ARTIFACT,
    "registry": ARTIFACT,
    "compose": ARTIFACT,
    "hub": ARTIFACT | {"store", "transfer", "registry"},
}
LAZY_ALLOWANCES = {("delta", "transfer")}  # inside a method, never at import time


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def sftstore_imports(path: Path) -> list[tuple[str, bool]]:
    """The sftstore modules `path` imports, each with whether the import runs at module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")[:-1]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] in ("sftstore", "sftstore_cli"):
                parts = node.module.split(".")[1:] if node.module.startswith("sftstore.") or node.module == "sftstore" \
                    else [node.module]
            else:
                continue
            for alias in node.names:  # `from . import store` imports the module `store`
                submodule = parts + [alias.name]
                is_module = (PACKAGE.joinpath(*submodule).with_suffix(".py").is_file()
                             or PACKAGE.joinpath(*submodule).is_dir())
                found.append((".".join(submodule if is_module else parts) or "__init__", id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(alias.name.removeprefix("sftstore."), id(node) in top_level) for alias in node.names
                      if alias.name.split(".")[0] in ("sftstore", "sftstore_cli")]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_module_imports_a_layer_above_it(path):
    module = module_name(path)
    for target, at_import_time in sftstore_imports(path):
        assert not target.startswith("sftstore_cli"), f"{module} imports the command line"
        if module not in ALLOWED:
            continue  # training, analysis, merge, the demo: above every layer
        top = target.split(".")[0]
        lazy_ok = (module, top) in LAZY_ALLOWANCES and not at_import_time
        assert top in ALLOWED[module] or lazy_ok, f"{module} imports {target}, a layer above it"


def test_the_transfer_module_never_reaches_the_store():
    def reachable(module: str, seen: set[str]) -> set[str]:
        path = PACKAGE / (module.replace(".", "/") + ".py")
        if module in seen or not path.is_file():
            return seen
        seen.add(module)
        for target, _ in sftstore_imports(path):
            reachable(target, seen)
        return seen

    assert {"store", "hub", "registry"}.isdisjoint(reachable("transfer", set()))
