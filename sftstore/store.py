"""The local store: content-addressed blobs plus a SQLite index of deltas, versions and aliases.

Layout under the root (`$SFTSTORE_HOME`, default `~/.cache/sftstore`):

    blobs/<sha256>     artifact files (tensors, manifest, model card, masks), written once, never changed
    tmp/               files being written; renamed into blobs/ when complete and durable
    index.sqlite       deltas (base, kind, name), versions, aliases, provenance (WAL mode)

A version is registered only after its blobs are durable, inside one `BEGIN IMMEDIATE` transaction,
so concurrent writers get distinct version numbers and a killed writer leaves at most orphan blobs
(which `gc` removes). Versions are immutable; numbers are never reused.

The index carries its schema version in `PRAGMA user_version` (`SCHEMA_VERSION`); opening an index an
earlier sftstore wrote upgrades it in place, in one transaction. Every lookup is a few indexed SQL
queries, so resolving a reference or adding a version costs the same with ten versions or ten thousand. This module imports neither
torch nor transformers: listing, resolving and tagging start without them; reading and writing
artifacts import the format on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import atomic_write_bytes, fsync_dir, remove_stale_temp_files
from .base_ids import base_id_aliases, canonical_base_id
from .errors import RefNotFoundError, StoreError
from .naming import LATEST, DeltaRef, kind_prefix, validate_alias
from .settings import store_home

if TYPE_CHECKING:
    import torch

    from .delta import SparseDelta

SCHEMA_VERSION = 1  # 0: an index written before schema versions (sftstore 0.1 and earlier)
_TABLES = (
    """CREATE TABLE IF NOT EXISTS deltas (
        id INTEGER PRIMARY KEY,
        base TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        last_version INTEGER NOT NULL DEFAULT 0,
        UNIQUE (base, kind, name)
    )""",
    """CREATE TABLE IF NOT EXISTS versions (
        delta_id INTEGER NOT NULL REFERENCES deltas(id),
        version INTEGER NOT NULL,
        tensors_sha256 TEXT NOT NULL,
        config_sha256 TEXT NOT NULL,
        card_sha256 TEXT NOT NULL,
        nnz INTEGER NOT NULL,
        density REAL NOT NULL,
        size INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        added_at TEXT NOT NULL,
        source TEXT NOT NULL,
        masks_sha256 TEXT,
        PRIMARY KEY (delta_id, version)
    )""",
    """CREATE TABLE IF NOT EXISTS remotes (
        delta_id INTEGER NOT NULL,
        version INTEGER NOT NULL,
        repo_id TEXT NOT NULL,
        revision_commit TEXT NOT NULL,
        tag TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        PRIMARY KEY (delta_id, version, repo_id),
        FOREIGN KEY (delta_id, version) REFERENCES versions(delta_id, version) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS results (
        id INTEGER PRIMARY KEY,
        base TEXT NOT NULL,
        deltas TEXT NOT NULL,
        data TEXT NOT NULL,
        data_sha256 TEXT NOT NULL,
        metrics TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS aliases (
        delta_id INTEGER NOT NULL,
        alias TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (delta_id, alias),
        FOREIGN KEY (delta_id, version) REFERENCES versions(delta_id, version) ON DELETE CASCADE
    )""",
)
# Schema 1: a reference without a base finds its delta by (kind, name); `add` finds a version with the same
# tensors without reading the others; a version's aliases (and the cascade when it is removed) by (delta, version).
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS deltas_by_kind_name ON deltas (kind, name, base)",
    "CREATE INDEX IF NOT EXISTS versions_by_tensors ON versions (delta_id, tensors_sha256)",
    "CREATE INDEX IF NOT EXISTS aliases_by_version ON aliases (delta_id, version, alias)",
)
# A StoredVersion's fields from `version` on, `aliases` left out (read separately), then the delta's id.
_COLUMNS = ("version, tensors_sha256, config_sha256, card_sha256, masks_sha256, nnz, density, size, created_at, "
            "added_at, source, delta_id")


@dataclass(frozen=True)
class StoredVersion:
    """One immutable version of a delta in the store."""

    base: str
    kind: str
    name: str
    version: int
    aliases: tuple[str, ...]
    tensors_sha256: str
    config_sha256: str
    card_sha256: str
    masks_sha256: str | None
    nnz: int
    density: float
    size: int
    created_at: str
    added_at: str
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{kind_prefix(self.kind)}/{self.name}@{self.version}"

    @property
    def blobs(self) -> dict[str, str]:
        """Artifact file name -> blob sha256."""
        from .format import CARD_FILE, CONFIG_FILE, MASKS_FILE, TENSORS_FILE

        blobs = {TENSORS_FILE: self.tensors_sha256, CONFIG_FILE: self.config_sha256, CARD_FILE: self.card_sha256}
        if self.masks_sha256 is not None:
            blobs[MASKS_FILE] = self.masks_sha256
        return blobs

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **asdict(self)}


_FIELDS = tuple(f.name for f in fields(StoredVersion))


def _stored_version(values: Iterable[Any]) -> StoredVersion:
    """A StoredVersion from its field values in order, without the frozen `__init__`'s `object.__setattr__` per
    field (a third of the time of listing 10,000 versions)."""
    version = object.__new__(StoredVersion)
    version.__dict__.update(zip(_FIELDS, values))
    return version


class _Sources:
    """`json.loads` of versions' `source` texts, each distinct text parsed once per listing; every version still
    gets a dict of its own (a copy of a flat one, a new parse of a nested one)."""

    def __init__(self) -> None:
        self._flat: dict[str, dict[str, Any] | None] = {}

    def __call__(self, text: str) -> dict[str, Any]:
        if text in self._flat:
            flat = self._flat[text]
            return dict(flat) if flat is not None else json.loads(text)
        parsed = json.loads(text)
        nested = not isinstance(parsed, dict) or any(isinstance(value, (dict, list)) for value in parsed.values())
        self._flat[text] = None if nested else parsed
        return parsed


@dataclass(frozen=True)
class Damage:
    """A problem `verify` found: which version, which file, what is wrong."""

    ref: str
    base: str
    file: str
    problem: str


@dataclass(frozen=True)
class GcReport:
    removed_blobs: int
    freed_bytes: int
    removed_temp_files: int


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[sqlite3.Connection]:
    """One transaction: `BEGIN` reads one snapshot; `BEGIN IMMEDIATE` also holds the write lock from the start."""
    db.execute(begin)
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _placeholders(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def _number_runs(numbers: Iterable[int]) -> list[str]:
    """Ascending numbers as runs: 1, 2, 3, 5 -> ['1-3', '5']."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return [str(first) if first == last else f"{first}-{last}" for first, last in runs]


class DeltaStore:
    """A versioned local store of sparse deltas. Safe to use from several processes at once."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else store_home()
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.index_path = self.root / "index.sqlite"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._open_index()

    def _open_index(self) -> None:
        """Create the index, or bring one an earlier sftstore wrote up to `SCHEMA_VERSION` in one transaction
        (a failure leaves it as it was); then file deltas stored under a renamed Hub id of their base
        (`FacebookAI/xlm-roberta-base`) under the canonical id, where that holds no delta of the kind and name."""
        with self._connect() as db:
            found = self._schema_version(db)
            if found < SCHEMA_VERSION:
                db.execute("PRAGMA journal_mode=WAL")  # cannot change inside a transaction
            elif not self._renamed_bases(db):
                return
            with _transaction(db, "BEGIN IMMEDIATE"):  # re-checked under the write lock: another process may have done it
                if self._schema_version(db) < SCHEMA_VERSION:
                    self._upgrade(db)
                for delta_id, base in self._renamed_bases(db):
                    db.execute("UPDATE OR IGNORE deltas SET base=? WHERE id=?", (canonical_base_id(base), delta_id))

    def _schema_version(self, db: sqlite3.Connection) -> int:
        (found,) = db.execute("PRAGMA user_version").fetchone()
        if found > SCHEMA_VERSION:
            raise StoreError(f"{self.index_path}: the store's index has schema version {found}, written by a newer "
                             f"sftstore; this one reads versions up to {SCHEMA_VERSION}: upgrade sftstore")
        return found

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        """Schema 0 (or nothing) -> `SCHEMA_VERSION`, inside the caller's transaction."""
        for statement in _TABLES:
            db.execute(statement)
        if "masks_sha256" not in {row[1] for row in db.execute("PRAGMA table_info(versions)")}:
            db.execute("ALTER TABLE versions ADD COLUMN masks_sha256 TEXT")
        for statement in _INDEXES:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @staticmethod
    def _renamed_bases(db: sqlite3.Connection) -> list[tuple[int, str]]:
        return [(delta_id, base) for delta_id, base in db.execute("SELECT id, base FROM deltas")
                if canonical_base_id(base) != base]

    # ---- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection to the index; an index SQLite cannot use is a `StoreError` naming it."""
        try:
            db = sqlite3.connect(self.index_path, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.index_path}: cannot open the store's index ({exc}); check SFTSTORE_HOME") from None
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=60000")
            yield db
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
            if isinstance(exc, sqlite3.IntegrityError):
                raise
            raise StoreError(f"{self.index_path}: the store's index cannot be used ({exc}); check SFTSTORE_HOME, "
                             "or move the file away to start an empty store") from None
        finally:
            db.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query in it sees the same snapshot of the index."""
        with self._connect() as db, _transaction(db):
            yield db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from its first statement."""
        with self._connect() as db, _transaction(db, "BEGIN IMMEDIATE"):
            yield db

    def blob_path(self, sha256: str) -> Path:
        return self.blobs_dir / sha256

    def _put_blob(self, data: bytes) -> str:
        """Store bytes under their sha256 (once: the same bytes never make a second blob)."""
        sha = _sha256(data)
        path = self.blob_path(sha)
        if not path.exists():
            atomic_write_bytes(path, data, tmp_dir=self.tmp_dir)
        return sha

    # ---- adding -------------------------------------------------------------------------------

    def add(
        self, delta: SparseDelta, source: dict[str, Any] | None = None, files: dict[str, bytes] | None = None
    ) -> tuple[StoredVersion, bool]:
        """Store `delta` as the next version of (base, kind, name); return it and whether it is new.

        `files` are the artifact's own bytes when `delta` was read from them (an import or a pull):
        they are kept as they are, so the store holds what was published. Adding a delta whose
        tensors and manifest equal a stored version's, but for `created_at`, returns that version.
        """
        from .format import (
            CARD_FILE,
            CONFIG_FILE,
            MASKS_FILE,
            TENSORS_FILE,
            artifact_files,
            complete_artifact,
        )

        remove_stale_temp_files(self.tmp_dir, only_ours=False)  # what killed writers left
        manifest = json.loads(files[CONFIG_FILE]) if files is not None else None
        files = complete_artifact(files, manifest) if files is not None else artifact_files(delta)
        manifest = manifest or json.loads(files[CONFIG_FILE])
        shas = {name: self._put_blob(data) for name, data in files.items()}
        base, kind, name = canonical_base_id(delta.config.base_model.id), delta.kind, delta.name
        with self._write() as db:
            for file_name, sha in shas.items():  # gc may have run between the writes and the lock
                if not self.blob_path(sha).exists():
                    atomic_write_bytes(self.blob_path(sha), files[file_name], tmp_dir=self.tmp_dir)
            db.execute("INSERT OR IGNORE INTO deltas (base, kind, name) VALUES (?, ?, ?)", (base, kind, name))
            delta_id, last = db.execute(
                "SELECT id, last_version FROM deltas WHERE base=? AND kind=? AND name=?", (base, kind, name)
            ).fetchone()
            version = self._same_content(db, delta_id, shas, manifest)
            created = version is None
            if created:
                version = last + 1
                db.execute("UPDATE deltas SET last_version=? WHERE id=?", (version, delta_id))
                db.execute(
                    "INSERT INTO versions (delta_id, version, tensors_sha256, config_sha256, card_sha256, masks_sha256, "
                    "nnz, density, size, created_at, added_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        delta_id, version, shas[TENSORS_FILE], shas[CONFIG_FILE], shas[CARD_FILE], shas.get(MASKS_FILE),
                        manifest["nnz"], manifest["density"], len(files[TENSORS_FILE]), manifest["created_at"],
                        _now(), json.dumps(source or {"type": "python"}),
                    ),
                )
            return self._version(db, delta_id, version), created

    def _same_content(self, db: sqlite3.Connection, delta_id: int, shas: dict[str, str], manifest: dict[str, Any]
                      ) -> int | None:
        """The stored version with these tensors and masks whose manifest has this one's identity, if any."""
        from .format import CONFIG_FILE, MASKS_FILE, TENSORS_FILE, artifact_identity

        rows = sorted(db.execute(  # sorted here: an ORDER BY would lead SQLite to walk every version in order
            "SELECT version, config_sha256 FROM versions WHERE delta_id=? AND tensors_sha256=? AND masks_sha256 IS ?",
            (delta_id, shas[TENSORS_FILE], shas.get(MASKS_FILE)),
        ))
        identity = artifact_identity(manifest) if rows else None
        for version, config_sha in rows:
            if config_sha == shas[CONFIG_FILE]:
                return version
            with contextlib.suppress(OSError, ValueError):
                if artifact_identity(json.loads(self.blob_path(config_sha).read_bytes())) == identity:
                    return version
        return None

    def import_directory(self, directory: str | os.PathLike) -> tuple[StoredVersion, bool]:
        """Validate an artifact directory and add it, its files byte for byte, recording where it came from."""
        from .format import delta_from_files, read_artifact

        files = read_artifact(directory)
        delta = delta_from_files(files, directory)
        return self.add(delta, source={"type": "import", "path": os.path.abspath(directory)}, files=files)

    # ---- reading ------------------------------------------------------------------------------

    @staticmethod
    def _select(db: sqlite3.Connection, where: str, params: Sequence[Any], version: int | None = None
                ) -> list[StoredVersion]:
        """The versions (or only `version`) of the deltas `where` selects (a condition on the deltas table `d`), ordered
        by base, kind, name and version, with their aliases: three indexed queries, whatever the number of rows."""
        deltas = {row[0]: row[1:] for row in db.execute(
            f"SELECT d.id, d.base, d.kind, d.name FROM deltas d WHERE {where} ORDER BY d.base, d.kind, d.name", params)}
        if not deltas:
            return []
        scope = f"delta_id IN (SELECT d.id FROM deltas d WHERE {where})"
        if version is not None:
            scope, params = f"{scope} AND version=?", (*params, version)
        aliases: dict[tuple[int, int], list[str]] = {}
        for delta_id, number, alias in db.execute(
                f"SELECT delta_id, version, alias FROM aliases WHERE {scope} ORDER BY alias", params):
            aliases.setdefault((delta_id, number), []).append(alias)
        rows = db.execute(f"SELECT {_COLUMNS} FROM versions WHERE {scope} ORDER BY delta_id, version", params).fetchall()
        rank = {delta_id: position for position, delta_id in enumerate(deltas)}
        rows.sort(key=lambda row: rank[row[-1]])  # deltas by base, kind and name; stable: versions stay in order
        sources = _Sources()
        return [
            _stored_version((*deltas[row[-1]], row[0], tuple(aliases.get((row[-1], row[0]), ())), *row[1:-2],
                             sources(row[-2])))
            for row in rows
        ]

    def _version(self, db: sqlite3.Connection, delta_id: int, version: int) -> StoredVersion:
        return self._select(db, "d.id=?", (delta_id,), version)[0]

    @staticmethod
    def _filter(base: str | None, kind: str | None, name: str | None) -> tuple[str, list[str]]:
        """A WHERE clause on the `d` deltas table, and its parameters."""
        clauses, params = [], []
        if base is not None:  # any Hub id of the base: deltas filed under a renamed id are still found
            aliases = base_id_aliases(base)
            clauses.append(f"d.base IN ({_placeholders(aliases)})")
            params += aliases
        for column, value in (("d.kind", kind), ("d.name", name)):
            if value is not None:
                clauses.append(f"{column}=?")
                params.append(value)
        return " AND ".join(clauses) or "1", params

    def list(self, base: str | None = None, kind: str | None = None, name: str | None = None) -> list[StoredVersion]:
        """Every stored version, optionally filtered by base, kind and name, ordered by base, kind, name, version."""
        with self._read() as db:
            return self._select(db, *self._filter(base, kind, name))

    def _locate(self, db: sqlite3.Connection, ref: DeltaRef, base: str | None) -> tuple[int, int]:
        """(delta id, version) of the version `ref` names under `base`: the newest for no selector or `latest`,
        else the lowest-numbered version whose number or alias is the selector."""
        where, params = self._filter(base, ref.kind, ref.name)
        deltas = db.execute(
            f"SELECT d.id, d.base FROM deltas d WHERE {where} "
            "AND EXISTS (SELECT 1 FROM versions v WHERE v.delta_id = d.id) ORDER BY d.base", params,
        ).fetchall()
        scope = f" for base {base!r}" if base else ""
        if not deltas:
            raise RefNotFoundError(f"no delta {DeltaRef(ref.kind, ref.name)} in the store{scope} ({self.root})")
        if len(deltas) > 1:
            raise StoreError(f"{ref} exists for several bases ({', '.join(b for _, b in deltas)}); name one with --base")
        ((delta_id, _),) = deltas
        if ref.selector in (None, LATEST):
            (version,) = db.execute("SELECT MAX(version) FROM versions WHERE delta_id=?", (delta_id,)).fetchone()
        else:
            (version,) = db.execute(
                "SELECT MIN(version) FROM versions WHERE delta_id=:id AND version IN "  # not `version=? OR`: a walk
                "(SELECT :number UNION ALL SELECT version FROM aliases WHERE delta_id=:id AND alias=:alias)",
                {"id": delta_id, "number": ref.version, "alias": ref.selector},
            ).fetchone()
        if version is None:
            numbers = (row[0] for row in db.execute("SELECT version FROM versions WHERE delta_id=? ORDER BY version",
                                                     (delta_id,)))
            aliases = [row[0] for row in db.execute(
                "SELECT a.alias FROM aliases a JOIN versions v ON v.delta_id = a.delta_id AND v.version = a.version "
                "WHERE a.delta_id=? ORDER BY a.version, a.alias", (delta_id,))]
            known = ", ".join(_number_runs(numbers) + aliases)
            raise RefNotFoundError(f"{ref}: no such version or alias{scope}; known: {known}")
        return delta_id, version

    def resolve(self, ref: str | DeltaRef, base: str | None = None) -> StoredVersion:
        """The version a reference names (`lang/hau`, `task/ner@2`, `lang/hau@best`) under `base`.

        Without `base`, the reference must be unambiguous across the bases in the store.
        """
        ref = ref if isinstance(ref, DeltaRef) else DeltaRef.parse(ref)
        with self._read() as db:
            return self._version(db, *self._locate(db, ref, base))

    def manifest(self, version: StoredVersion) -> dict[str, Any]:
        from .format import read_manifest

        raw, _ = read_manifest(self.blob_path(version.config_sha256))
        return raw

    def load(self, ref: str | DeltaRef | StoredVersion, base: str | None = None, device: torch.device | str = "cpu") -> SparseDelta:
        """Read and validate a stored version."""
        from .format import read_delta

        version = ref if isinstance(ref, StoredVersion) else self.resolve(ref, base)
        masks = self.blob_path(version.masks_sha256) if version.masks_sha256 is not None else None
        return read_delta(self.blob_path(version.tensors_sha256), self.blob_path(version.config_sha256), device=device,
                          masks_path=masks)

    def export(self, ref: str | DeltaRef | StoredVersion, directory: str | os.PathLike, base: str | None = None,
               format_version: int | None = None) -> Path:
        """Write a stored version out as an artifact directory: the files that were stored, or the artifact
        converted to `format_version` (validated first) when it is stored in another."""
        from .format import CONFIG_FILE, artifact_files, check_format_version, delta_from_files, write_artifact

        version = ref if isinstance(ref, StoredVersion) else self.resolve(ref, base)
        files = {name: self.blob_path(sha).read_bytes() for name, sha in version.blobs.items()}
        if format_version is not None and json.loads(files[CONFIG_FILE])["format_version"] != format_version:
            files = artifact_files(delta_from_files(files, directory), check_format_version(format_version))
        return write_artifact(files, directory)

    # ---- changing -----------------------------------------------------------------------------

    def tag(self, ref: str | DeltaRef, alias: str, base: str | None = None) -> StoredVersion:
        """Point `alias` (e.g. `best`) at the version `ref` names; an existing alias moves."""
        validate_alias(alias)
        ref = ref if isinstance(ref, DeltaRef) else DeltaRef.parse(ref)
        with self._write() as db:
            delta_id, version = self._locate(db, ref, base)
            db.execute(
                "INSERT INTO aliases VALUES (?, ?, ?) ON CONFLICT (delta_id, alias) DO UPDATE SET version=excluded.version",
                (delta_id, alias, version),
            )
            return self._version(db, delta_id, version)

    def record_remote(self, version: StoredVersion, repo_id: str, commit: str, tag: str) -> None:
        """Remember that `version` is on the Hub as `repo_id` at `commit`, tagged `tag`."""
        with self._write() as db:
            db.execute(
                "INSERT INTO remotes SELECT id, ?, ?, ?, ?, ? FROM deltas WHERE base=? AND kind=? AND name=? "
                "ON CONFLICT (delta_id, version, repo_id) DO UPDATE SET revision_commit=excluded.revision_commit, "
                "tag=excluded.tag, recorded_at=excluded.recorded_at",
                (version.version, repo_id, commit, tag, _now(), version.base, version.kind, version.name),
            )

    def remotes(self, version: StoredVersion) -> list[dict[str, str]]:
        """Where `version` was pushed: repo id, commit sha and tag per repository."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT r.repo_id, r.revision_commit, r.tag, r.recorded_at FROM remotes r JOIN deltas d ON d.id = r.delta_id "
                "WHERE d.base=? AND d.kind=? AND d.name=? AND r.version=? ORDER BY r.repo_id",
                (version.base, version.kind, version.name, version.version),
            ).fetchall()
        return [{"repo_id": r[0], "commit": r[1], "tag": r[2], "recorded_at": r[3]} for r in rows]

    def record_result(self, versions: list[StoredVersion], data: str, data_sha256: str, metrics: dict[str, Any]) -> None:
        """Remember an evaluation: which exact versions were composed, on which data, with what scores."""
        with self._write() as db:
            db.execute(
                "INSERT INTO results (base, deltas, data, data_sha256, metrics, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
                (versions[0].base, json.dumps([v.ref for v in versions]), data, data_sha256, json.dumps(metrics), _now()),
            )

    def results(self, base: str | None = None) -> list[dict[str, Any]]:
        """Recorded evaluations, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT base, deltas, data, data_sha256, metrics, recorded_at FROM results "
                + ("WHERE base=? " if base else "") + "ORDER BY id", (base,) if base else (),
            ).fetchall()
        return [{"base": r[0], "deltas": json.loads(r[1]), "data": r[2], "data_sha256": r[3],
                 "metrics": json.loads(r[4]), "recorded_at": r[5]} for r in rows]

    def remove(self, ref: str | DeltaRef, base: str | None = None) -> list[StoredVersion]:
        """Remove the version `ref` names, or every version when it names none (`lang/hau`).

        Blobs stay until `gc`; version numbers are not reused.
        """
        ref = ref if isinstance(ref, DeltaRef) else DeltaRef.parse(ref)
        with self._write() as db:
            delta_id, version = self._locate(db, ref, base)
            only = None if ref.selector is None else version  # None: every version
            targets = self._select(db, "d.id=?", (delta_id,), only)
            for table in ("aliases", "remotes", "versions"):
                db.execute(f"DELETE FROM {table} WHERE delta_id=? AND version=coalesce(?, version)", (delta_id, only))
        return targets

    # ---- maintenance --------------------------------------------------------------------------

    def verify(self, progress: bool = False) -> list[Damage]:
        """Re-hash every referenced blob (the manifest's too: `config_sha256` is its own sha256); report missing
        or damaged files, manifests that disagree with the index, and pulled files that differ from what the
        Hub published."""
        from tqdm.auto import tqdm

        from .format import CONFIG_FILE

        damage = []
        for version in tqdm(self.list(), desc="verifying", unit="version", disable=not progress):
            for file_name, sha in version.blobs.items():
                path = self.blob_path(sha)
                if not path.is_file():
                    damage.append(Damage(version.ref, version.base, file_name, f"missing blob {sha}"))
                    continue
                with path.open("rb") as handle:
                    actual = hashlib.file_digest(handle, "sha256").hexdigest()
                if actual != sha:
                    damage.append(Damage(version.ref, version.base, file_name, f"content hashes to {actual}, not {sha}"))
            for file_name, published in (version.source.get("files_sha256") or {}).items():
                if file_name in version.blobs and version.blobs[file_name] != published:
                    damage.append(Damage(version.ref, version.base, file_name,
                                         f"the index records {version.blobs[file_name]}, not the published {published}"))
            try:
                manifest = self.manifest(version)
                for field_name, indexed in (("tensors_sha256", version.tensors_sha256), ("masks_sha256", version.masks_sha256)):
                    if manifest.get(field_name) != indexed:
                        damage.append(Damage(version.ref, version.base, CONFIG_FILE, f"{field_name} disagrees with the index"))
            except Exception as exc:  # any unreadable manifest is damage to report, not to raise
                if not any(d.ref == version.ref and d.file == CONFIG_FILE for d in damage):
                    damage.append(Damage(version.ref, version.base, CONFIG_FILE, str(exc)))
        return damage

    def gc(self) -> GcReport:
        """Delete blobs no version references, and temp files abandoned by killed writers."""
        removed = freed = 0
        with self._write() as db:  # holds the write lock: no add can register a blob meanwhile
            referenced = set()
            for row in db.execute("SELECT tensors_sha256, config_sha256, card_sha256, masks_sha256 FROM versions"):
                referenced.update(sha for sha in row if sha is not None)
            for path in self.blobs_dir.iterdir():
                if path.name not in referenced:
                    freed += path.stat().st_size
                    path.unlink()
                    removed += 1
            stale = len(remove_stale_temp_files(self.tmp_dir, only_ours=False))
        if removed:
            fsync_dir(self.blobs_dir)
        return GcReport(removed, freed, stale)
