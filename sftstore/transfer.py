"""Moving artifacts to and from the Hugging Face Hub: downloads verified file by file, one commit per upload.

This module knows the artifact and the Hub protocol, never the store: `SparseDelta.from_pretrained`
and `SparseDelta.push_to_hub` use it directly, and `sftstore.hub` builds the store's push and pull
on it. The token comes from the usual places (`token=`, `HF_TOKEN`, `hf auth login`) and the
endpoint from `HF_ENDPOINT`, as in `huggingface_hub`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .base_ids import is_hub_id
from .bounded_json import load_json
from .delta import SparseDelta
from .errors import SftError
from .format import CARD_FILE, CONFIG_FILE, MASKS_FILE, TENSORS_FILE, load_delta
from .interop import COMPOSABLE_SFT_FILE
from .naming import validate_repo_id
from .network import bound_hub_waits, check_endpoint, hub_timeout, network_cause, network_error
from .redaction import redact

ARTIFACT_FILES = (TENSORS_FILE, CONFIG_FILE, CARD_FILE, MASKS_FILE)
OPTIONAL_FILES = (MASKS_FILE,)  # removed from the repository by a push of an artifact that has none
_HEX40, _HEX64 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class HubError(SftError):
    """A Hub operation failed; the message says which repository and revision, never the token."""


@dataclass(frozen=True)
class Download:
    """A verified download: the snapshot directory, its commit, and the sha256 of every file in it."""

    directory: Path
    commit: str
    sha256: dict[str, str]


@dataclass(frozen=True)
class _ExpectedHash:
    """What the Hub reports for one file: its LFS sha256, or the git blob id of a small file."""

    sha256: str | None = None
    git_blob: str | None = None
    size: int | None = None


def _translate(exc: Exception, where: str) -> SftError | None:
    """The `SftError` that explains a `huggingface_hub` or connection error, or None for anything else."""
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"{where}: this needs the Hub, and offline mode is on (HF_HUB_OFFLINE); unset it to go online")
    cause = network_cause(exc)
    if cause is not None:
        return network_error(where, cause)
    if isinstance(exc, GatedRepoError):
        return HubError(f"{where}: the repository is gated; request access on the Hub, then log in")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{where}: repository not found, or private and no valid token was given "
                        "(pass --token, set HF_TOKEN or run `hf auth login`)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{where}: no such revision (tag, branch or commit)")
    if isinstance(exc, LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: first
        return HubError(f"{where}: not in the local Hub cache, and offline mode forbids downloading it")
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"{where}: missing file ({type(exc).__name__})")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 412:
            return HubError(f"{where}: the repository changed while pushing (another push?); nothing was "
                            "committed; run the push again")
        return HubError(f"{where}: the Hub answered HTTP {status}: {redact(exc.server_message or 'no message')}")
    return None


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Check the repository id and `HF_ENDPOINT`, then turn `huggingface_hub` and connection errors into
    `SftError`s that say what to do (secrets redacted)."""
    validate_repo_id(repo_id)
    check_endpoint()
    bound_hub_waits()
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except SftError:
        raise
    except Exception as exc:
        translated = _translate(exc, where)
        if translated is None:
            raise
        raise translated from None


def looks_like_repo_id(text: str | os.PathLike) -> bool:
    """Whether `text` names a Hub repository (`org/name`) rather than a local directory."""
    text = os.fspath(text)
    return text.count("/") == 1 and is_hub_id(text)


# ---- downloading ---------------------------------------------------------------------------------


def _file_hashes(path: Path) -> tuple[str, str]:
    """The sha256 and the git blob id of a file, in one pass."""
    sha256, git_blob = hashlib.sha256(), hashlib.sha1()
    git_blob.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            git_blob.update(chunk)
    return sha256.hexdigest(), git_blob.hexdigest()


def _reported_hashes(siblings: list[Any]) -> dict[str, _ExpectedHash]:
    """What the Hub reports for each file of a commit (`model_info(files_metadata=True)`)."""
    return {
        s.rfilename: _ExpectedHash(s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id,
                                   s.lfs.size if s.lfs else s.size)
        for s in siblings or []
    }


def _cached_hash(path: Path) -> _ExpectedHash | None:
    """What the Hub reported when a cached file was downloaded: the cache names its blob by the ETag
    (the sha256 of an LFS file, the git blob id of a small one). None where the cache copies files."""
    if not path.is_symlink():
        return None
    etag = path.resolve().name
    if _HEX64.fullmatch(etag):
        return _ExpectedHash(sha256=etag)
    return _ExpectedHash(git_blob=etag) if _HEX40.fullmatch(etag) else None


def _mismatch(expected: _ExpectedHash, sha256: str, git_blob: str, size: int) -> bool:
    return bool((expected.sha256 and sha256 != expected.sha256) or (expected.git_blob and git_blob != expected.git_blob)
                or (expected.size is not None and size != expected.size))


def _evict(path: Path) -> None:
    """Remove a damaged file from the Hugging Face cache (its blob and its snapshot entry), so the next
    pull downloads it again instead of failing on the same bytes."""
    for doomed in (path.resolve(), path):
        doomed.unlink(missing_ok=True)


def _verify(directory: Path, where: str, reported: dict[str, _ExpectedHash] | None) -> dict[str, str]:
    """Hash every downloaded file and compare it with what the Hub reports (offline: with what the cache
    recorded); return name -> sha256. A file that cannot be verified or does not match is refused."""
    hashes = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        expected = reported.get(path.name) if reported is not None else _cached_hash(path)
        if expected is None or not (expected.sha256 or expected.git_blob):
            why = ("the Hub reports no hash for it" if reported is not None else
                   "the Hugging Face cache keeps a copy without its hash (no symlinks here); pull online")
            raise HubError(f"{where}: {path.name} cannot be verified: {why}; nothing stored")
        sha256, git_blob = _file_hashes(path)
        if _mismatch(expected, sha256, git_blob, path.stat().st_size):
            _evict(path)
            wanted = f"sha256 {expected.sha256}" if expected.sha256 else f"git blob {expected.git_blob}"
            raise HubError(
                f"{where}: {path.name} does not match the hash the Hub reports ({wanted}; got sha256 {sha256}); "
                "the download or the file on the server is damaged; nothing stored (the damaged copy was "
                "removed from the cache: pull again)"
            )
        hashes[path.name] = sha256
    return hashes


def download_artifact(
    repo_id: str,
    revision: str | None = None,
    *,
    offline: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Download:
    """Download an artifact (or a composable-sft `pytorch_diff.bin`) through the Hub cache, verified.

    Online, the revision is first resolved to a commit together with the hash the Hub reports for
    every file (LFS sha256, or git blob id), so a missing token or repository is reported rather
    than hidden by a cached copy; the files downloaded must come from that commit, and each is
    checked against its hash. Offline (`offline=True` or `HF_HUB_OFFLINE=1`) only the cache is used, and
    each file is checked against the hash the cache recorded when it was downloaded.
    """
    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    where = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
    info = None
    with hub_errors(repo_id, revision):
        if not offline:
            info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True,
                                                                    timeout=hub_timeout())
        directory = Path(snapshot_download(
            repo_id, revision=revision, allow_patterns=[*ARTIFACT_FILES, COMPOSABLE_SFT_FILE], token=token,
            endpoint=endpoint, local_files_only=offline,
        ))
    if info is not None and directory.name != info.sha:
        raise HubError(f"{where} moved from commit {info.sha} to {directory.name} while downloading; pull again")
    reported = _reported_hashes(info.siblings) if info is not None else None
    return Download(directory, directory.name, _verify(directory, where, reported))


def load_from_hub(repo_id: str, revision: str | None = None, **kwargs) -> SparseDelta:
    """`SparseDelta.from_pretrained` for a Hub repository id."""
    return load_delta(download_artifact(repo_id, revision, **kwargs).directory)


def remote_manifest(api: HfApi, repo_id: str, revision: str | None) -> dict | None:
    """The manifest at `revision`, or None when the repository has none there (new or empty)."""
    try:
        path = hf_hub_download(repo_id, CONFIG_FILE, revision=revision or constants.DEFAULT_REVISION, token=api.token,
                               endpoint=api.endpoint)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    manifest = load_json(Path(path).read_bytes(), f"{repo_id}: {CONFIG_FILE} on the Hub", "readable JSON", HubError)
    return manifest if isinstance(manifest, dict) else {}


# ---- uploading -----------------------------------------------------------------------------------


def main_head(api: HfApi, repo_id: str) -> tuple[str | None, dict[str, str]]:
    """The commit `main` points at (None in a repository without one) and the tags, name -> commit."""
    refs = api.list_repo_refs(repo_id)
    head = next((b.target_commit for b in refs.branches if b.name == constants.DEFAULT_REVISION), None)
    return head, {t.name: t.target_commit for t in refs.tags}


def commit_artifact(
    api: HfApi,
    repo_id: str,
    files: Mapping[str, Path],
    message: str,
    description: str,
    *,
    head: str | None,
    tag: str | None = None,
    on_main: bool = True,
) -> str:
    """Commit `files` on top of `head` (the commit `main` pointed at when read) and tag the commit.

    `parent_commit=head` makes the commit fail, rather than race, when someone pushed meanwhile.
    With `on_main=False` (a version older than main's) the commit goes on a short-lived branch
    that is deleted once the tag holds it, so `main` keeps pointing at the newest version.
    """
    present = set(api.list_repo_files(repo_id, revision=head)) if head else set()
    operations: list = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    operations += [CommitOperationDelete(path_in_repo=name) for name in OPTIONAL_FILES
                   if name not in files and name in present]
    branch = constants.DEFAULT_REVISION if on_main else f"sftstore-push-{uuid.uuid4().hex[:12]}"
    if not on_main:
        api.create_branch(repo_id, branch=branch, revision=head)
    try:
        info = api.create_commit(repo_id, operations, commit_message=message, commit_description=description,
                                 revision=branch, parent_commit=head)
        if tag is not None:
            api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=message)
    finally:
        if not on_main:
            api.delete_branch(repo_id, branch=branch)
    return info.oid


def commit_message(manifest: dict, version: int | None = None) -> tuple[str, str]:
    """A commit's title and description for an artifact with `manifest` (stored as `version`)."""
    kind = manifest["kind"]
    name = manifest["language"] if kind == "language" else manifest["task"]
    label = f"{'lang' if kind == 'language' else 'task'}/{name}" + (f" v{version}" if version is not None else "")
    base = manifest["base_model"]["id"]
    of = f" of {base}" if is_hub_id(base) else ""
    message = f"Add {label}: {manifest['nnz']:,} non-zeros ({manifest['density']:.2%}){of}"
    description = f"method: {json.dumps(manifest['method'])}\ntensors_sha256: {manifest['tensors_sha256']}"
    return message, description


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit: str
    tag: str
    created: bool


def push_delta(delta: SparseDelta, repo_id: str, *, private: bool = False, token: str | None = None,
               endpoint: str | None = None, tag: str | None = None) -> PushResult:
    """`SparseDelta.push_to_hub`: push an in-memory delta (no store involved) as one commit on main."""
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="sft-push-") as tmp, hub_errors(repo_id):
        directory = delta.save_pretrained(tmp)
        manifest = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        api.create_repo(repo_id, private=private, exist_ok=True)
        head, _ = main_head(api, repo_id)
        files = {name: directory / name for name in ARTIFACT_FILES if (directory / name).is_file()}
        commit = commit_artifact(api, repo_id, files, *commit_message(manifest), head=head, tag=tag)
    return PushResult(repo_id, commit, tag or "", created=True)
