"""Sharing through the Hugging Face Hub: push a stored version, pull a repository into the store.

One Hub repository holds one delta (base, kind, name); each stored version becomes one commit
(its artifact files: tensors, manifest, model card, and the masks file if it has one) tagged
`v<N>`. The token comes from the usual places (`token=`, `HF_TOKEN`, `hf auth login`) and the
endpoint from `HF_ENDPOINT`, as in `huggingface_hub`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .delta import SparseDelta
from .errors import BaseModelMismatchError, RefNotFoundError, SftError
from .format import CARD_FILE, CONFIG_FILE, MASKS_FILE, TENSORS_FILE, load_delta
from .interop import COMPOSABLE_SFT_FILE, from_composable_sft
from .modeling import load_model
from .naming import DeltaRef
from .registry import Registry, RegistryEntry, load_registry
from .settings import base_key
from .store import DeltaStore, StoredVersion

ARTIFACT_FILES = (TENSORS_FILE, CONFIG_FILE, CARD_FILE, MASKS_FILE)
OPTIONAL_FILES = (MASKS_FILE,)  # removed from the repository by a push of a version that has none


class HubError(SftError):
    """A Hub operation failed; the message says which repository and revision, never the token."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit: str
    tag: str
    created: bool


@dataclass(frozen=True)
class PullResult:
    version: StoredVersion
    created: bool
    repo_id: str
    commit: str


def version_tag(version: int) -> str:
    return f"v{version}"


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn `huggingface_hub` exceptions into `HubError`s that say what to do."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except GatedRepoError:
        raise HubError(f"{where}: the repository is gated; request access on the Hub, then log in") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{where}: repository not found, or private and no valid token was given "
            "(pass --token, set HF_TOKEN or run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: no such revision (tag, branch or commit)") from None
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        raise HubError(f"{where}: not in the local Hub cache, and offline mode forbids downloading it") from None
    except EntryNotFoundError as exc:
        raise HubError(f"{where}: missing file ({type(exc).__name__})") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(f"{where}: the Hub answered HTTP {status}: {exc.server_message or 'no message'}") from None


def _upload(api: HfApi, repo_id: str, files: dict[str, Path], message: str, description: str, tag: str | None) -> str:
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    stale = [name for name in OPTIONAL_FILES if name not in files]
    if stale:
        present = set(api.list_repo_files(repo_id))
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale if name in present]
    info = api.create_commit(repo_id, operations, commit_message=message, commit_description=description)
    if tag is not None:
        api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=message)
    return info.oid


def _remote_manifest(api: HfApi, repo_id: str, revision: str) -> dict | None:
    """The manifest at `revision`, or None when the repository has none there (new or empty)."""
    try:
        path = hf_hub_download(repo_id, CONFIG_FILE, revision=revision, token=api.token, endpoint=api.endpoint)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _commit_message(manifest: dict, version: int | None = None) -> tuple[str, str]:
    kind = manifest["kind"]
    name = manifest["language"] if kind == "language" else manifest["task"]
    label = f"{'lang' if kind == 'language' else 'task'}/{name}" + (f" v{version}" if version is not None else "")
    message = f"Add {label}: {manifest['nnz']:,} non-zeros ({manifest['density']:.2%}) of {manifest['base_model']['id']}"
    description = f"method: {json.dumps(manifest['method'])}\ntensors_sha256: {manifest['tensors_sha256']}"
    return message, description


def push_to_hub(
    store: DeltaStore,
    ref: str,
    repo_id: str,
    *,
    base: str | None = None,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Push a stored version to `repo_id` as one commit tagged `v<N>`; a version already there is not pushed again."""
    version = store.resolve(ref, base)
    manifest = store.manifest(version)
    tag = version_tag(version.version)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}
        remote = _remote_manifest(api, repo_id, tags.get(tag, constants.DEFAULT_REVISION))
        if remote is not None:
            remote_name = remote.get("language") if remote.get("kind") == "language" else remote.get("task")
            if (remote.get("kind"), remote_name, remote["base_model"]["id"]) != (version.kind, version.name, version.base):
                raise HubError(
                    f"{repo_id} holds {remote.get('kind')} delta {remote_name!r} for {remote['base_model']['id']!r}; "
                    f"push {version.ref} to a repository of its own"
                )
        if tag in tags:
            if remote is None or (remote.get("tensors_sha256"), remote.get("masks_sha256")) != (
                    version.tensors_sha256, version.masks_sha256):
                raise HubError(f"{repo_id}: tag {tag} already holds other tensors than {version.ref}; nothing pushed")
            store.record_remote(version, repo_id, tags[tag], tag)
            return PushResult(repo_id, tags[tag], tag, created=False)
        message, description = _commit_message(manifest, version.version)
        files = {name: store.blob_path(sha) for name, sha in version.blobs.items()}
        commit = _upload(api, repo_id, files, message, description, tag)
    store.record_remote(version, repo_id, commit, tag)
    return PushResult(repo_id, commit, tag, created=True)


def download_artifact(
    repo_id: str,
    revision: str | None = None,
    *,
    offline: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> tuple[Path, str]:
    """Download an artifact through the Hub cache; return its snapshot directory and commit sha.

    Online, the repository is queried first, so a missing token or repository is reported rather
    than hidden by a cached copy. Offline (`offline=True` or `HF_HUB_OFFLINE=1`), only the cache is used.
    """
    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    with hub_errors(repo_id, revision):
        if not offline:
            HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=[*ARTIFACT_FILES, COMPOSABLE_SFT_FILE], token=token,
            endpoint=endpoint, local_files_only=offline,
        )
    return Path(path), Path(path).name


def _read_downloaded(directory: Path, repo_id: str, entry: RegistryEntry | None) -> SparseDelta:
    """Validate an sftstore artifact, or convert a composable-sft one the registry describes."""
    if (directory / TENSORS_FILE).is_file():
        return load_delta(directory)
    if not (directory / COMPOSABLE_SFT_FILE).is_file():
        raise HubError(f"{repo_id}: the repository holds neither {TENSORS_FILE} nor {COMPOSABLE_SFT_FILE}")
    if entry is None:
        raise HubError(f"{repo_id} holds a composable-sft delta; the registry has no entry that says which base, kind and name")
    task_type = entry.task_type if entry.kind == "task" else None
    base_model = load_model(entry.base_model, task_type, entry.labels)
    return from_composable_sft(
        directory / COMPOSABLE_SFT_FILE, base_model, kind=entry.kind, name=entry.name, base_id=entry.base_model,
        task_type=task_type, labels=entry.labels, license=entry.license,
    )


def pull_from_hub(
    store: DeltaStore,
    repo_id: str,
    revision: str | None = None,
    *,
    base: str | None = None,
    entry: RegistryEntry | None = None,
    offline: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PullResult:
    """Download, validate fully and store a delta; refuse one made for another base than `base`.

    A composable-sft repository (`pytorch_diff.bin`) is converted using its registry `entry`
    (looked up by repository id when not given).
    """
    directory, commit = download_artifact(repo_id, revision, offline=offline, token=token, endpoint=endpoint)
    delta = _read_downloaded(directory, repo_id, entry or load_registry().find_repo(repo_id))
    if base is not None and delta.config.base_model.id != base_key(base):
        raise BaseModelMismatchError(
            f"{repo_id}@{revision or 'main'} is a delta for base {delta.config.base_model.id!r}, not {base_key(base)!r}"
        )
    source = {"type": "hub", "repo_id": repo_id, "revision": revision or constants.DEFAULT_REVISION, "commit": commit}
    version, created = store.add(delta, source=source)
    return PullResult(version, created, repo_id, commit)


def load_from_hub(repo_id: str, revision: str | None = None, **kwargs) -> SparseDelta:
    """`SparseDelta.from_pretrained` for a Hub repository id."""
    directory, _ = download_artifact(repo_id, revision, **kwargs)
    return load_delta(directory)


def push_delta(delta: SparseDelta, repo_id: str, *, private: bool = False, token: str | None = None,
               endpoint: str | None = None, tag: str | None = None) -> PushResult:
    """`SparseDelta.push_to_hub`: push an in-memory delta (no store involved) as one commit."""
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="sft-push-") as tmp, hub_errors(repo_id):
        directory = delta.save_pretrained(tmp)
        manifest = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        message, description = _commit_message(manifest)
        api.create_repo(repo_id, private=private, exist_ok=True)
        files = {name: directory / name for name in ARTIFACT_FILES if (directory / name).is_file()}
        commit = _upload(api, repo_id, files, message, description, tag)
    return PushResult(repo_id, commit, tag or "", created=True)


def looks_like_repo_id(text: str | os.PathLike) -> bool:
    text = os.fspath(text)
    return text.count("/") == 1 and not os.path.exists(text) and not text.startswith((".", "/", "~"))


def resolve_or_pull(
    store: DeltaStore, ref: DeltaRef, base: str, *, pull: bool = True, registry: Registry | None = None, **hub_kwargs
) -> StoredVersion:
    """Resolve `ref` in the store; if it is missing, pull the published delta the registry names for it."""
    try:
        return store.resolve(ref, base)
    except RefNotFoundError as missing:
        if not pull:
            raise RefNotFoundError(f"{missing}; pulling from the Hub is switched off (--no-pull)") from None
        entry = (registry or load_registry()).find(base, ref.kind, ref.name)
        if entry is None:
            raise RefNotFoundError(f"{missing}, and the registry names no published delta for it") from None
    pulled = pull_from_hub(store, entry.repo_id, entry.revision, base=base, entry=entry, **hub_kwargs)
    if ref.selector is None:
        return pulled.version
    return store.resolve(DeltaRef(pulled.version.kind, pulled.version.name, ref.selector), base)
