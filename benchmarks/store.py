"""Benchmark: the store at scale, 10,000 versions of one delta.

What it measures, in a store in a temporary folder holding `lang/x` and 200 other language deltas
of 5 versions each (1,000 rows that every filter has to skip):

* add: `DeltaStore.add` of a new tiny delta (a 2-layer BERT of hidden size 32, 5% density; distinct
  tensors each time), through the public API: blobs written and fsynced, one write transaction.
  At each size N the next `--adds` versions are added and the best per-version time is reported.
* resolve: `DeltaStore.resolve` of `lang/x@<N/2>` (a number), `lang/x@latest` and `lang/x@best`
  (an alias tagged at N/2), each call opening its own connection as the CLI does; best of `--repeats`.
* list: `DeltaStore.list(name="x")`, every version of `lang/x` as `StoredVersion`s; best of `--repeats`.
* open: `DeltaStore(root)` on an existing index (what every command pays first).

The baseline, measured in the same run on the same index, is the way sftstore 0.1 resolved and listed:
read every version row of the delta (and every alias of the store) into `StoredVersion`s, decoding each
row's JSON, then filter and pick in Python. To keep the run short, the versions between the sizes are
written straight into the index in one transaction (rows like those `add` writes, without blob files:
resolve, list and add read only the index); every version that is timed goes through `add`.

Run:

    python benchmarks/store.py              # about a minute
    python benchmarks/store.py --markdown   # the table as GitHub markdown
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from table import render_table  # benchmarks/table.py, beside this script

from sftstore.demo import build_tiny_base, synthetic_delta
from sftstore.modeling import load_model
from sftstore.naming import LATEST, DeltaRef
from sftstore.store import DeltaStore, StoredVersion

SIZES = (0, 1_000, 5_000, 10_000)
TARGETS = {"add": 0.020, "resolve": 0.005, "list": 0.100, "open": None}
OTHER_DELTAS, OTHER_VERSIONS = 200, 5


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start

# ---- the baseline: sftstore 0.1's Python-side filtering --------------------------------------------


def python_side_versions(index: Path, kind: str, name: str) -> list[StoredVersion]:
    """Every version of (kind, name) as sftstore 0.1 read them: all rows, all aliases, JSON decoded."""
    with sqlite3.connect(index) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT d.id, d.base, d.kind, d.name, v.* FROM versions v JOIN deltas d ON d.id = v.delta_id "
            "WHERE d.kind=? AND d.name=? ORDER BY d.base, d.kind, d.name, v.version", (kind, name),
        ).fetchall()
        aliases: dict[tuple[int, int], list[str]] = {}
        for row in db.execute("SELECT delta_id, version, alias FROM aliases ORDER BY alias"):
            aliases.setdefault((row[0], row[1]), []).append(row[2])
    db.close()
    return [
        StoredVersion(
            base=row["base"], kind=row["kind"], name=row["name"], version=row["version"],
            aliases=tuple(aliases.get((row["id"], row["version"]), ())), tensors_sha256=row["tensors_sha256"],
            config_sha256=row["config_sha256"], card_sha256=row["card_sha256"], masks_sha256=row["masks_sha256"],
            nnz=row["nnz"], density=row["density"], size=row["size"], created_at=row["created_at"],
            added_at=row["added_at"], source=json.loads(row["source"]),
        )
        for row in rows
    ]


def python_side_resolve(index: Path, ref: DeltaRef) -> StoredVersion:
    candidates = python_side_versions(index, ref.kind, ref.name)
    if ref.selector in (None, LATEST):
        return candidates[-1]
    return next(v for v in candidates if v.version == ref.version or ref.selector in v.aliases)


# ---- building the store ----------------------------------------------------------------------------


def fill(store: DeltaStore, template: StoredVersion, name: str, count: int) -> None:
    """Add `count` versions of `lang/<name>` as index rows (no blobs), in one transaction."""
    with sqlite3.connect(store.index_path, isolation_level=None) as db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR IGNORE INTO deltas (base, kind, name) VALUES (?, 'language', ?)", (template.base, name))
        delta_id, last = db.execute("SELECT id, last_version FROM deltas WHERE base=? AND kind='language' AND name=?",
                                    (template.base, name)).fetchone()
        rows = []
        for version in range(last + 1, last + count + 1):
            fake = hashlib.sha256(f"{name}@{version}".encode()).hexdigest()
            rows.append((delta_id, version, fake, fake[::-1], template.card_sha256, template.nnz, template.density,
                         template.size, template.created_at, template.added_at, json.dumps(template.source)))
        db.executemany(
            "INSERT INTO versions (delta_id, version, tensors_sha256, config_sha256, card_sha256, nnz, density, size, "
            "created_at, added_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows,
        )
        db.execute("UPDATE deltas SET last_version=? WHERE id=?", (last + count, delta_id))
        db.execute("COMMIT")
    db.close()


def build_stores(workdir: Path, template: StoredVersion) -> dict[int, DeltaStore]:
    """One store per size: lang/x with that many versions (aliased `best` at half), and the other deltas."""
    stores = {}
    for size in SIZES:
        store = stores[size] = DeltaStore(workdir / f"store-{size}")
        for other in range(OTHER_DELTAS):
            fill(store, template, f"other{other}", OTHER_VERSIONS)
        if size:
            fill(store, template, "x", size)
            store.tag(f"lang/x@{size // 2}", "best")
    return stores


def measure(args: argparse.Namespace, workdir: Path) -> dict[tuple[str, int], tuple[float, float | None]]:
    """Best times (sftstore, baseline) per (operation, size). The sizes take turns in every round, so a
    machine that gets busier or quieter during the run weighs on all of them alike."""
    base = load_model(build_tiny_base(workdir / "base"), "masked-lm")
    deltas = iter([synthetic_delta(base, density=0.05, seed=seed, kind="language", language="x")
                   for seed in range(args.adds * len(SIZES) + 1)])
    template, _ = DeltaStore(workdir / "template").add(next(deltas))
    stores = build_stores(workdir, template)
    adds: dict[int, list[float]] = {size: [] for size in SIZES}
    for _ in range(args.adds):
        for size, store in stores.items():
            adds[size].append(timed(lambda: store.add(next(deltas))))  # noqa: B023  (called at once)
    stores[0].tag(f"lang/x@{args.adds // 2}", "best")
    calls: dict[tuple[str, int], tuple[Callable[[], Any], Callable[[], Any] | None]] = {}
    for size, store in stores.items():
        half = str(store.resolve("lang/x@best").version)
        for label, selector in (("number", half), ("latest", LATEST), ("alias", "best")):
            ref = DeltaRef("language", "x", selector)
            assert store.resolve(ref) == python_side_resolve(store.index_path, ref)
            calls[f"resolve {label}", size] = (partial(store.resolve, ref),
                                               partial(python_side_resolve, store.index_path, ref))
        assert store.list(name="x") == python_side_versions(store.index_path, "language", "x")
        calls["list", size] = (partial(store.list, name="x"),
                               partial(python_side_versions, store.index_path, "language", "x"))
        calls["open", size] = (partial(DeltaStore, store.root), None)
    times: dict[tuple[str, int], tuple[list[float], list[float]]] = {key: ([], []) for key in calls}
    for round_ in range(args.repeats):
        for key, (ours, baseline) in calls.items():
            times[key][0].append(timed(ours))
            if baseline is not None and round_ < args.baseline_repeats:
                times[key][1].append(timed(baseline))
    for size in SIZES:
        print(f"  lang/x with {size:,} versions: add best {min(adds[size]) * 1e3:.1f} ms, "
              f"median {statistics.median(adds[size]) * 1e3:.1f} ms", flush=True)
    results = {("add", size): (min(adds[size]), None) for size in SIZES}
    for operation in dict.fromkeys(operation for operation, _ in calls):
        for size in SIZES:
            ours, baseline = times[operation, size]
            results[operation, size] = (min(ours), min(baseline) if baseline else None)
    return results


def table_rows(results: dict[tuple[str, int], tuple[float, float | None]]) -> list[list[str]]:
    """One row per operation and size; an add meets its target when it takes at most 20 ms and at most twice
    the add into the empty store (flat as the store grows)."""
    rows = []
    for operation in dict.fromkeys(operation for operation, _ in results):
        target = TARGETS[operation.split()[0]]
        for size in SIZES:
            ours, baseline = results[operation, size]
            flat = operation != "add" or ours <= 2 * results["add", 0][0]
            status = "—" if target is None else "met" if ours <= target and flat else "MISSED"
            rows.append([
                f"{operation} @ {size:,} versions", f"{ours * 1e3:.2f} ms",
                "—" if baseline is None else f"{baseline * 1e3:.2f} ms",
                "—" if baseline is None else f"{baseline / ours:.0f}×",
                "—" if target is None else f"≤ {target * 1e3:.0f} ms", status,
            ])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--adds", type=int, default=20, help="versions added (and timed) at each size")
    parser.add_argument("--repeats", type=int, default=30, help="timed resolves/lists; the best is reported")
    parser.add_argument("--baseline-repeats", type=int, default=3, help="timed baseline calls; the best is reported")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sftstore-bench-") as workdir:
        rows = table_rows(measure(args, Path(workdir)))
    header = ["operation", "sftstore", "baseline (Python-side, sftstore 0.1)", "baseline / sftstore", "target", "status"]
    print(render_table(header, rows, args.markdown))


if __name__ == "__main__":
    main()
