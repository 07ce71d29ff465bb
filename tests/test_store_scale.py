"""The store's index at scale: schema versions and the in-place migration of an earlier sftstore's index,
lookups answered by indexed SQL (never a scan of the versions), resolve agreeing with the plain definition
on a store of hundreds of versions, and listing and resolving without torch."""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sftstore import RefNotFoundError, StoreError
from sftstore import store as store_module
from sftstore.demo import synthetic_delta
from sftstore.modeling import load_model
from sftstore.naming import LATEST, DeltaRef
from sftstore.store import SCHEMA_VERSION, DeltaStore, StoredVersion

# The index as sftstore 0.1 created it (schema version 0: no `user_version`, no indexes beyond the keys);
# an index older still lacks `versions.masks_sha256`, which 0.1 added on open.
SCHEMA_0 = """
CREATE TABLE deltas (id INTEGER PRIMARY KEY, base TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    last_version INTEGER NOT NULL DEFAULT 0, UNIQUE (base, kind, name));
CREATE TABLE versions (delta_id INTEGER NOT NULL REFERENCES deltas(id), version INTEGER NOT NULL,
    tensors_sha256 TEXT NOT NULL, config_sha256 TEXT NOT NULL, card_sha256 TEXT NOT NULL, nnz INTEGER NOT NULL,
    density REAL NOT NULL, size INTEGER NOT NULL, created_at TEXT NOT NULL, added_at TEXT NOT NULL,
    source TEXT NOT NULL{masks}, PRIMARY KEY (delta_id, version));
CREATE TABLE remotes (delta_id INTEGER NOT NULL, version INTEGER NOT NULL, repo_id TEXT NOT NULL,
    revision_commit TEXT NOT NULL, tag TEXT NOT NULL, recorded_at TEXT NOT NULL,
    PRIMARY KEY (delta_id, version, repo_id),
    FOREIGN KEY (delta_id, version) REFERENCES versions(delta_id, version) ON DELETE CASCADE);
CREATE TABLE results (id INTEGER PRIMARY KEY, base TEXT NOT NULL, deltas TEXT NOT NULL, data TEXT NOT NULL,
    data_sha256 TEXT NOT NULL, metrics TEXT NOT NULL, recorded_at TEXT NOT NULL);
CREATE TABLE aliases (delta_id INTEGER NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (delta_id, alias),
    FOREIGN KEY (delta_id, version) REFERENCES versions(delta_id, version) ON DELETE CASCADE);
"""
XLMR, XLMR_RENAMED = "xlm-roberta-base", "FacebookAI/xlm-roberta-base"


@pytest.fixture
def base_model(tiny_bert_dir):
    return load_model(tiny_bert_dir, "masked-lm")


def insert_versions(db: sqlite3.Connection, delta_id: int, numbers: list[int], template: StoredVersion) -> None:
    """Version rows as an add writes them, pointing at `template`'s blobs (tensors made distinct per version)."""
    db.executemany(
        "INSERT INTO versions (delta_id, version, tensors_sha256, config_sha256, card_sha256, nnz, density, size, "
        "created_at, added_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(delta_id, number, f"{number:064x}" if number != template.version else template.tensors_sha256,
          template.config_sha256, template.card_sha256, template.nnz, template.density, template.size,
          template.created_at, template.added_at, json.dumps(template.source)) for number in numbers],
    )


def legacy_store(root: Path, donor: DeltaStore, template: StoredVersion, masks_column: bool = True) -> Path:
    """An index as sftstore 0.1 left it, with `template`'s blobs: lang/hau (versions 1-8, of which 3, 6 and 8
    were removed; aliases best -> 2, stable -> 5, and `gone` left pointing at the removed 6), the same name
    under the Hub's new id of XLM-R (filed there by an older sftstore), task/ner under XLM-R, and lang/en whose
    every version was removed."""
    shutil.copytree(donor.blobs_dir, root / "blobs")
    with sqlite3.connect(root / "index.sqlite", isolation_level=None) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA_0.format(masks=", masks_sha256 TEXT" if masks_column else ""))
        db.executemany("INSERT INTO deltas VALUES (?, ?, ?, ?, ?)", [
            (1, template.base, "language", "hau", 8), (2, XLMR_RENAMED, "language", "hau", 3),
            (3, XLMR, "task", "ner", 2), (4, template.base, "language", "en", 4),
        ])
        insert_versions(db, 1, [1, 2, 4, 5, 7], template)
        insert_versions(db, 2, [1, 2, 3], template)
        insert_versions(db, 3, [1, 2], template)
        db.executemany("INSERT INTO aliases VALUES (?, ?, ?)", [(1, "best", 2), (1, "stable", 5), (1, "gone", 6),
                                                                 (3, "best", 1)])
    db.close()
    return root


@pytest.fixture
def donor(tmp_path, base_model):
    store = DeltaStore(tmp_path / "donor")
    version, _ = store.add(synthetic_delta(base_model, density=0.05, seed=1, kind="language", language="hau"))
    return store, version


def index_names(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    db.close()
    return names


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (found,) = db.execute("PRAGMA user_version").fetchone()
    db.close()
    return found


@pytest.mark.parametrize("masks_column", [True, False], ids=["0.1", "before-masks"])
def test_an_earlier_index_is_migrated_in_place_and_every_ref_resolves_as_before(tmp_path, donor, masks_column):
    donor_store, template = donor
    root = legacy_store(tmp_path / "legacy", donor_store, template, masks_column)
    store = DeltaStore(root)
    assert user_version(store.index_path) == SCHEMA_VERSION
    assert {"deltas_by_kind_name", "versions_by_tensors", "aliases_by_version"} <= index_names(store.index_path)
    here = template.base
    expected = {  # what sftstore 0.1 resolved each reference to
        ("lang/hau", here): 7, ("lang/hau@latest", here): 7, ("lang/hau@1", here): 1, ("lang/hau@5", here): 5,
        ("lang/hau@best", here): 2, ("lang/hau@stable", here): 5, ("lang/hau", XLMR): 3,
        ("lang/hau@2", XLMR_RENAMED): 2, ("task/ner", None): 2, ("task/ner@best", None): 1, ("task/ner@2", XLMR): 2,
    }
    for (ref, base), version in expected.items():
        resolved = store.resolve(ref, base)
        assert (resolved.ref, resolved.base) == (f"{ref.split('@')[0]}@{version}", canonical(base or XLMR)), ref
    for ref in ("lang/hau@3", "lang/hau@8", "lang/hau@gone", "lang/hau@nothing"):
        with pytest.raises(RefNotFoundError, match="known: 1-2, 4-5, 7, best, stable$"):
            store.resolve(ref, here)
    with pytest.raises(RefNotFoundError, match="no delta lang/en"):
        store.resolve("lang/en", here)
    with pytest.raises(StoreError, match=re.escape(f"several bases ({here}, {XLMR})")):
        store.resolve("lang/hau")
    assert [(v.base, v.ref, v.aliases) for v in store.list()] == [
        (here, "lang/hau@1", ()), (here, "lang/hau@2", ("best",)), (here, "lang/hau@4", ()),
        (here, "lang/hau@5", ("stable",)), (here, "lang/hau@7", ()),
        (XLMR, "lang/hau@1", ()), (XLMR, "lang/hau@2", ()), (XLMR, "lang/hau@3", ()),
        (XLMR, "task/ner@1", ("best",)), (XLMR, "task/ner@2", ()),
    ]
    assert store.resolve("lang/hau@1", here) == StoredVersion(**{**vars(template), "version": 1})
    assert store.load("lang/hau@1", here).nnz == template.nnz
    assert store.add(another_delta(donor_store, template))[0].version == 9  # numbers never reused
    assert DeltaStore(root).resolve("lang/hau@9", here).version == 9  # reopening changes nothing


def canonical(base: str) -> str:
    return XLMR if base == XLMR_RENAMED else base


def another_delta(donor: DeltaStore, template: StoredVersion):
    """The template's delta with other values: a new version of lang/hau."""
    delta = donor.load(template)
    for entry in delta.params.values():
        entry.values.add_(1.0)
    return delta


def test_a_failed_migration_leaves_the_earlier_index_as_it_was(tmp_path, donor):
    root = legacy_store(tmp_path / "legacy", *donor, masks_column=False)
    with sqlite3.connect(root / "index.sqlite") as db:  # a name the migration needs is taken
        db.execute("CREATE VIEW versions_by_tensors AS SELECT 1")
    db.close()
    with pytest.raises(StoreError, match=re.escape(f"{root / 'index.sqlite'}: the store's index cannot be used")):
        DeltaStore(root)
    with sqlite3.connect(root / "index.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (0,)
        assert "masks_sha256" not in {row[1] for row in db.execute("PRAGMA table_info(versions)")}
        assert db.execute("SELECT base FROM deltas WHERE id=2").fetchone() == (XLMR_RENAMED,)
        db.execute("DROP VIEW versions_by_tensors")
    db.close()
    assert DeltaStore(root).resolve("lang/hau", XLMR).version == 3


def test_an_index_of_a_newer_sftstore_is_refused_untouched(tmp_path, donor):
    root = legacy_store(tmp_path / "legacy", *donor)
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, written by a newer sftstore"):
        DeltaStore(root)
    assert index_names(root / "index.sqlite") == {"sqlite_autoindex_deltas_1", "sqlite_autoindex_versions_1",
                                                  "sqlite_autoindex_remotes_1", "sqlite_autoindex_aliases_1"}


OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sftstore.store import DeltaStore
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.01)
    print(DeltaStore(sys.argv[2]).resolve("task/ner").ref)
    """
)


def test_processes_opening_an_earlier_index_at_once_all_get_it_migrated(tmp_path, donor):
    root = legacy_store(tmp_path / "legacy", *donor)
    go = tmp_path / "go"
    openers = [subprocess.Popen([sys.executable, "-c", OPENER, str(go), str(root)], stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    go.touch()
    outputs = [opener.communicate(timeout=120)[0] for opener in openers]
    assert [opener.returncode for opener in openers] == [0, 0, 0]
    assert outputs == ["task/ner@2\n"] * 3
    assert user_version(root / "index.sqlite") == SCHEMA_VERSION


# ---- lookups use the indexes -------------------------------------------------------------------------


@pytest.fixture
def traced(monkeypatch):
    """Every SQL statement the store runs, as SQLite expanded it (parameters bound)."""
    statements: list[str] = []
    connect = sqlite3.connect

    def tracing_connect(*args, **kwargs):
        db = connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(store_module.sqlite3, "connect", tracing_connect)
    return statements


def full_scans(index: Path, statements: list[str]) -> list[str]:
    """The query-plan steps of `statements` that read a whole versions or aliases table."""
    scans = []
    with sqlite3.connect(index) as db:
        for statement in statements:
            if statement.lstrip().upper().startswith(("SELECT", "INSERT", "UPDATE", "DELETE")):
                for *_, step in db.execute(f"EXPLAIN QUERY PLAN {statement}"):
                    if step.startswith("SCAN") and any(table in step.split() for table in ("versions", "aliases", "v", "a")):
                        scans.append(f"{step}: {statement}")
    db.close()
    return scans


def test_resolve_list_add_and_tag_never_scan_the_versions(tmp_path, donor, traced):
    root = legacy_store(tmp_path / "legacy", *donor)
    store = DeltaStore(root)
    here = donor[1].base
    traced.clear()
    for ref in ("lang/hau", "lang/hau@latest", "lang/hau@5", "lang/hau@best"):
        store.resolve(ref, here)
    store.resolve("task/ner")
    store.list(base=here, kind="language", name="hau")
    store.list(kind="task", name="ner")
    store.tag("lang/hau@4", "best", here)
    store.add(another_delta(*donor))
    store.remove("lang/hau@2", here)
    statements = list(traced)  # explaining them runs more statements
    assert len(statements) > 20
    assert full_scans(store.index_path, statements) == []


@pytest.fixture
def vm_steps(monkeypatch):
    """Counts the SQLite virtual-machine instructions (in tens) the store's connections run: a measure of the
    work a lookup does that, unlike time, is the same on every run."""
    count = [0]
    connect = sqlite3.connect

    def counting_connect(*args, **kwargs):
        db = connect(*args, **kwargs)
        db.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1), 10)
        return db

    monkeypatch.setattr(store_module.sqlite3, "connect", counting_connect)
    return count


def test_lookups_adds_and_tags_cost_the_same_with_ten_or_thousands_of_versions(tmp_path, donor, vm_steps):
    store = DeltaStore(legacy_store(tmp_path / "legacy", *donor))
    here, shown = donor[1].base, []
    for size in (10, 3000):  # the versions looked up are the newest: a walk from the oldest would show
        with sqlite3.connect(store.index_path) as db:
            (last,) = db.execute("SELECT last_version FROM deltas WHERE id=1").fetchone()
            insert_versions(db, 1, list(range(last + 1, size + 1)), donor[1])
            db.execute("UPDATE deltas SET last_version=max(last_version, ?) WHERE id=1", (size,))
        db.close()
        operations = {
            "resolve latest": lambda: store.resolve("lang/hau", here),
            "resolve number": lambda: store.resolve(f"lang/hau@{size}", here),  # noqa: B023  (called at once)
            "tag": lambda: store.tag(f"lang/hau@{size - 1}", "best", here),  # noqa: B023
            "resolve alias": lambda: store.resolve("lang/hau@best", here),
            "add": lambda: store.add(another_delta(*donor)),
            "list": lambda: store.list(base=here, kind="language", name="hau"),
        }
        steps = {}
        for name, operation in operations.items():
            vm_steps[0] = 0
            operation()
            steps[name] = vm_steps[0]
        shown.append(steps)
    small, large = shown
    assert large["list"] > 100 * small["list"]  # the counter measures work: listing 300 times the rows
    for name in operations.keys() - {"list"}:
        assert large[name] <= 1.5 * small[name] + 20, (name, small[name], large[name])


# ---- resolve agrees with its definition on a large store --------------------------------------------


def reference_resolve(store: DeltaStore, ref: DeltaRef, base: str) -> int | None:
    """Resolution as sftstore defines it, on the full list: the newest version for `latest`, else the first
    version (lowest number) whose number or one of whose aliases is the selector."""
    versions = store.list(base=base, kind=ref.kind, name=ref.name)
    if ref.selector in (None, LATEST):
        return versions[-1].version if versions else None
    return next((v.version for v in versions if v.version == ref.version or ref.selector in v.aliases), None)


def test_resolve_agrees_with_its_definition_on_hundreds_of_versions(tmp_path, donor):
    donor_store, template = donor
    root = legacy_store(tmp_path / "legacy", donor_store, template)
    store = DeltaStore(root)
    here, rng = template.base, random.Random(0)
    with sqlite3.connect(store.index_path) as db:
        db.execute("UPDATE deltas SET last_version=400 WHERE id=1")
        insert_versions(db, 1, list(range(9, 401)), template)
    db.close()
    removed = rng.sample(range(1, 401), 60)
    for number in removed:
        with contextlib.suppress(RefNotFoundError):  # 3, 6 and 8 were never there
            store.remove(f"lang/hau@{number}", here)
    aliases = ["best", "stable", "rc", "v1.0", "x-2"]
    for alias in aliases:
        store.tag(f"lang/hau@{rng.choice([v.version for v in store.list(base=here, name='hau')])}", alias, here)
    assert {a for v in store.list(base=here, name="hau") for a in v.aliases} == set(aliases)
    for selector in [None, LATEST, *map(str, range(402)), *aliases, "gone", "nothing"]:
        ref = DeltaRef("language", "hau", selector)
        expected = reference_resolve(store, ref, here)
        if expected is None:
            with pytest.raises(RefNotFoundError):
                store.resolve(ref, here)
        else:
            assert store.resolve(ref, here) == next(v for v in store.list(base=here, name="hau") if v.version == expected)


# ---- without torch -----------------------------------------------------------------------------------

NO_TORCH = textwrap.dedent(
    """
    import sys
    import sftstore, sftstore.errors, sftstore.naming, sftstore.settings, sftstore.store
    from sftstore.store import DeltaStore
    store = DeltaStore(sys.argv[1])
    listed = [v.ref for v in store.list(kind="language")]
    resolved = store.resolve("lang/hau@best", sys.argv[2]).ref
    tagged = store.tag("lang/hau@4", "candidate", sys.argv[2]).aliases
    heavy = sorted(m for m in ("torch", "transformers", "safetensors", "huggingface_hub", "numpy") if m in sys.modules)
    print(listed, resolved, tagged, heavy)
    """
)


def test_listing_resolving_and_tagging_import_neither_torch_nor_transformers(tmp_path, donor):
    root = legacy_store(tmp_path / "legacy", *donor)
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(root), donor[1].base], check=False, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected_refs = ["lang/hau@1", "lang/hau@2", "lang/hau@4", "lang/hau@5", "lang/hau@7"] + [
        "lang/hau@1", "lang/hau@2", "lang/hau@3"]
    assert result.stdout.strip() == f"{expected_refs} lang/hau@2 ('candidate',) []"
