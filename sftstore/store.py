"""The local store: content-addressed blobs plus a SQLite index of deltas, versions and aliases.

Layout under the root (`$SFTSTORE_HOME`, default `~/.cache/sftstore`):

    blobs/<sha256>     artifact files (tensors, manifest, model card, masks), written once, never changed
    tmp/               files being written; renamed into blobs/ when complete and durable
    index.sqlite       deltas (base, kind, name), versions, aliases, provenance (WAL mode)

A version is registered only after its blobs are durable, inside one `BEGIN IMMEDIATE` transaction,
so concurrent writers get distinct version numbers and a killed writer leaves at most orphan blobs
(which `gc` removes). Versions are immutable; numbers are never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._io import atomic_write_bytes, fsync_dir, remove_stale_temp_files
from .base_ids import base_id_aliases, canonical_base_id
from .delta import SparseDelta
from .errors import RefNotFoundError, StoreError
from .format import (
    CARD_FILE, CONFIG_FILE, MASKS_FILE, TENSORS_FILE, artifact_files, artifact_identity, complete_artifact,
    delta_from_files, read_artifact, read_delta, read_manifest, write_artifact,
)
from .naming import LATEST, DeltaRef, kind_prefix, validate_alias
from .settings import store_home

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deltas (
    id INTEGER PRIMARY KEY,
    base TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    last_version INTEGER NOT NULL DEFAULT 0,
    UNIQUE (base, kind, name)
);
CREATE TABLE IF NOT EXISTS versions (
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
);
CREATE TABLE IF NOT EXISTS remotes (
    delta_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    repo_id TEXT NOT NULL,
    revision_commit TEXT NOT NULL,
    tag TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (delta_id, version, repo_id),
    FOREIGN KEY (delta_id, version) REFERENCES versions(delta_id, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    base TEXT NOT NULL,
    deltas TEXT NOT NULL,
    data TEXT NOT NULL,
    data_sha256 TEXT NOT NULL,
    metrics TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    delta_id INTEGER NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (delta_id, alias),
    FOREIGN KEY (delta_id, version) REFERENCES versions(delta_id, version) ON DELETE CASCADE
);
"""


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
        blobs = {TENSORS_FILE: self.tensors_sha256, CONFIG_FILE: self.config_sha256, CARD_FILE: self.card_sha256}
        if self.masks_sha256 is not None:
            blobs[MASKS_FILE] = self.masks_sha256
        return blobs

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **asdict(self)}


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


class DeltaStore:
    """A versioned local store of sparse deltas. Safe to use from several processes at once."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else store_home()
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.index_path = self.root / "index.sqlite"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring an index written by an earlier sftstore up to this one: add `versions.masks_sha256`, and file
        deltas stored under a renamed Hub id of their base (`FacebookAI/xlm-roberta-base`) under the canonical id
        (where the canonical id holds no delta of that kind and name already)."""
        with self._connect() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(versions)")}
            renamed = [row for row in db.execute("SELECT id, base FROM deltas") if canonical_base_id(row[1]) != row[1]]
        if "masks_sha256" not in columns or renamed:
            with self._write() as db:  # re-checked under the write lock: another process may have done it
                if "masks_sha256" not in {row[1] for row in db.execute("PRAGMA table_info(versions)")}:
                    db.execute("ALTER TABLE versions ADD COLUMN masks_sha256 TEXT")
                for delta_id, base in renamed:
                    db.execute("UPDATE OR IGNORE deltas SET base=? WHERE id=?", (canonical_base_id(base), delta_id))

    # ---- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection to the index; an index SQLite cannot use is a `StoreError` naming it."""
        try:
            db = sqlite3.connect(self.index_path, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.index_path}: cannot open the store's index ({exc}); check SFTSTORE_HOME") from None
        try:
            db.row_factory = sqlite3.Row
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
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from its first statement."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

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
            version = self._same_content(db, delta_id, shas, artifact_identity(manifest))
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
        return self._get(base, kind, name, version), created

    def _same_content(self, db: sqlite3.Connection, delta_id: int, shas: dict[str, str], identity: str) -> int | None:
        """The stored version with these tensors and masks whose manifest has this identity, if any."""
        rows = db.execute(
            "SELECT version, config_sha256 FROM versions WHERE delta_id=? AND tensors_sha256=? AND masks_sha256 IS ?",
            (delta_id, shas[TENSORS_FILE], shas.get(MASKS_FILE)),
        ).fetchall()
        for version, config_sha in rows:
            if config_sha == shas[CONFIG_FILE]:
                return version
            with contextlib.suppress(OSError, ValueError):
                if artifact_identity(json.loads(self.blob_path(config_sha).read_bytes())) == identity:
                    return version
        return None

    def import_directory(self, directory: str | os.PathLike) -> tuple[StoredVersion, bool]:
        """Validate an artifact directory and add it, its files byte for byte, recording where it came from."""
        files = read_artifact(directory)
        delta = delta_from_files(files, directory)
        return self.add(delta, source={"type": "import", "path": os.path.abspath(directory)}, files=files)

    # ---- reading ------------------------------------------------------------------------------

    def _rows(self, where: str = "", params: tuple = ()) -> list[StoredVersion]:
        query = (
            "SELECT d.id, d.base, d.kind, d.name, v.* FROM versions v JOIN deltas d ON d.id = v.delta_id "
            f"{where} ORDER BY d.base, d.kind, d.name, v.version"
        )
        with self._connect() as db:
            rows = db.execute(query, params).fetchall()
            aliases: dict[tuple[int, int], list[str]] = {}
            for row in db.execute("SELECT delta_id, version, alias FROM aliases ORDER BY alias"):
                aliases.setdefault((row[0], row[1]), []).append(row[2])
        return [
            StoredVersion(
                base=row["base"], kind=row["kind"], name=row["name"], version=row["version"],
                aliases=tuple(aliases.get((row["id"], row["version"]), ())),
                tensors_sha256=row["tensors_sha256"], config_sha256=row["config_sha256"],
                card_sha256=row["card_sha256"], masks_sha256=row["masks_sha256"], nnz=row["nnz"],
                density=row["density"], size=row["size"],
                created_at=row["created_at"], added_at=row["added_at"], source=json.loads(row["source"]),
            )
            for row in rows
        ]

    def _get(self, base: str, kind: str, name: str, version: int) -> StoredVersion:
        return self._rows("WHERE d.base=? AND d.kind=? AND d.name=? AND v.version=?", (base, kind, name, version))[0]

    def list(self, base: str | None = None, kind: str | None = None, name: str | None = None) -> list[StoredVersion]:
        """Every stored version, optionally filtered by base, kind and name."""
        clauses, params = [], []
        if base is not None:  # any Hub id of the base: deltas filed under a renamed id are still found
            aliases = base_id_aliases(base)
            clauses.append(f"d.base IN ({', '.join('?' * len(aliases))})")
            params += aliases
        for column, value in (("d.kind", kind), ("d.name", name)):
            if value is not None:
                clauses.append(f"{column}=?")
                params.append(value)
        return self._rows(("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params))

    def resolve(self, ref: str | DeltaRef, base: str | None = None) -> StoredVersion:
        """The version a reference names (`lang/hau`, `task/ner@2`, `lang/hau@best`) under `base`.

        Without `base`, the reference must be unambiguous across the bases in the store.
        """
        ref = ref if isinstance(ref, DeltaRef) else DeltaRef.parse(ref)
        candidates = self.list(base=base, kind=ref.kind, name=ref.name)
        bases = sorted({v.base for v in candidates})
        where = f" for base {base!r}" if base else ""
        if not candidates:
            raise RefNotFoundError(f"no delta {DeltaRef(ref.kind, ref.name)} in the store{where} ({self.root})")
        if len(bases) > 1:
            raise StoreError(f"{ref} exists for several bases ({', '.join(bases)}); name one with --base")
        if ref.selector in (None, LATEST):
            return candidates[-1]
        for version in candidates:
            if version.version == ref.version or ref.selector in version.aliases:
                return version
        known = ", ".join([str(v.version) for v in candidates] + [a for v in candidates for a in v.aliases])
        raise RefNotFoundError(f"{ref}: no such version or alias{where}; known: {known}")

    def manifest(self, version: StoredVersion) -> dict[str, Any]:
        raw, _ = read_manifest(self.blob_path(version.config_sha256))
        return raw

    def load(self, ref: str | DeltaRef | StoredVersion, base: str | None = None, device: torch.device | str = "cpu") -> SparseDelta:
        """Read and validate a stored version."""
        version = ref if isinstance(ref, StoredVersion) else self.resolve(ref, base)
        masks = self.blob_path(version.masks_sha256) if version.masks_sha256 is not None else None
        return read_delta(self.blob_path(version.tensors_sha256), self.blob_path(version.config_sha256), device=device,
                          masks_path=masks)

    def export(self, ref: str | DeltaRef, directory: str | os.PathLike, base: str | None = None) -> Path:
        """Write a stored version out as an artifact directory (the same files that were stored)."""
        version = self.resolve(ref, base)
        return write_artifact({name: self.blob_path(sha).read_bytes() for name, sha in version.blobs.items()}, directory)

    # ---- changing -----------------------------------------------------------------------------

    def tag(self, ref: str | DeltaRef, alias: str, base: str | None = None) -> StoredVersion:
        """Point `alias` (e.g. `best`) at the version `ref` names; an existing alias moves."""
        validate_alias(alias)
        version = self.resolve(ref, base)
        with self._write() as db:
            (delta_id,) = db.execute(
                "SELECT id FROM deltas WHERE base=? AND kind=? AND name=?", (version.base, version.kind, version.name)
            ).fetchone()
            db.execute(
                "INSERT INTO aliases VALUES (?, ?, ?) ON CONFLICT (delta_id, alias) DO UPDATE SET version=excluded.version",
                (delta_id, alias, version.version),
            )
        return self._get(version.base, version.kind, version.name, version.version)

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
        if ref.selector is None:
            first = self.resolve(ref, base)
            targets = self.list(base=first.base, kind=ref.kind, name=ref.name)
        else:
            targets = [self.resolve(ref, base)]
        with self._write() as db:
            for version in targets:
                (delta_id,) = db.execute(
                    "SELECT id FROM deltas WHERE base=? AND kind=? AND name=?", (version.base, version.kind, version.name)
                ).fetchone()
                db.execute("DELETE FROM aliases WHERE delta_id=? AND version=?", (delta_id, version.version))
                db.execute("DELETE FROM remotes WHERE delta_id=? AND version=?", (delta_id, version.version))
                db.execute("DELETE FROM versions WHERE delta_id=? AND version=?", (delta_id, version.version))
        return targets

    # ---- maintenance --------------------------------------------------------------------------

    def verify(self, progress: bool = False) -> list[Damage]:
        """Re-hash every referenced blob (the manifest's too: `config_sha256` is its own sha256); report missing
        or damaged files, manifests that disagree with the index, and pulled files that differ from what the
        Hub published."""
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
