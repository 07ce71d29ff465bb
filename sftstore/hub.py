"""The store and the Hugging Face Hub: push a stored version, pull a repository into the store.

One Hub repository holds one delta (base, kind, name); each stored version becomes one commit
(its artifact files: tensors, manifest, model card, and the masks file if it has one) tagged
`v<N>`, and `main` points at the highest version pushed. Pulls are verified file by file against
the hashes the Hub reports and keep the published bytes. The transfer itself is `sftstore.transfer`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants

from .base_ids import canonical_base_id
from .delta import SparseDelta
from .errors import BaseModelMismatchError, RefNotFoundError, StoreError
from .format import TENSORS_FILE, read_artifact, delta_from_files
from .interop import COMPOSABLE_SFT_FILE, from_composable_sft
from .languages import equivalent_codes
from .modeling import load_model
from .naming import DeltaRef
from .registry import Registry, RegistryEntry, load_registry
from .settings import base_key
from .store import DeltaStore, StoredVersion
from .transfer import (
    Download, HubError, PushResult, commit_artifact, commit_message, download_artifact, hub_errors, main_head,
    remote_manifest,
)

_VERSION_TAG_RE = re.compile(r"v([1-9][0-9]*)")


@dataclass(frozen=True)
class PullResult:
    version: StoredVersion
    created: bool
    repo_id: str
    commit: str


def version_tag(version: int) -> str:
    return f"v{version}"


def _check_same_delta(remote: dict | None, version: StoredVersion, repo_id: str) -> None:
    """Refuse to push `version` into a repository that holds another delta."""
    if remote is None:
        return
    kind = remote.get("kind")
    name = remote.get("language") if kind == "language" else remote.get("task")
    base = remote["base_model"].get("id") if isinstance(remote.get("base_model"), dict) else None
    if (kind, name, canonical_base_id(str(base))) != (version.kind, version.name, version.base):
        raise HubError(f"{repo_id} holds {kind} delta {name!r} for {base!r}; push {version.ref} to a repository of its own")


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
    """Push a stored version to `repo_id` as one commit tagged `v<N>`; a version already there is not pushed again.

    `main` moves only to a version higher than every version tag in the repository; an older
    version's commit is reachable through its tag alone.
    """
    version = store.resolve(ref, base_key(base) if base else None)
    manifest = store.manifest(version)
    tag = version_tag(version.version)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        head, tags = main_head(api, repo_id)
        remote = remote_manifest(api, repo_id, tags.get(tag, head))  # the tag's manifest, else main's
        _check_same_delta(remote, version, repo_id)
        if tag in tags:
            remote = remote or {}
            if (remote.get("tensors_sha256"), remote.get("masks_sha256")) != (version.tensors_sha256, version.masks_sha256):
                raise HubError(f"{repo_id}: tag {tag} already holds other tensors than {version.ref}; nothing pushed")
            store.record_remote(version, repo_id, tags[tag], tag)
            return PushResult(repo_id, tags[tag], tag, created=False)
        message, description = commit_message(manifest, version.version)
        if head is not None and remote == manifest:  # main holds this version: a push cut off before its tag
            api.create_tag(repo_id, tag=tag, revision=head, tag_message=message)
            commit = head
        else:
            newest = max((int(m.group(1)) for t in tags if (m := _VERSION_TAG_RE.fullmatch(t))), default=0)
            files = {name: store.blob_path(sha) for name, sha in version.blobs.items()}
            commit = commit_artifact(api, repo_id, files, message, description, head=head, tag=tag,
                                     on_main=version.version > newest)
    store.record_remote(version, repo_id, commit, tag)
    return PushResult(repo_id, commit, tag, created=True)


def _convert_composable_sft(directory: Path, repo_id: str, entry: RegistryEntry | None,
                            labels: Sequence[str] | None, offline: bool | None) -> SparseDelta:
    """Convert the composable-sft delta of a registry `entry` (its labels, or `labels`)."""
    if entry is None:
        raise HubError(f"{repo_id} holds a composable-sft delta; the registry has no entry that says which base, kind and name")
    task_type = entry.task_type if entry.kind == "task" else None
    head_labels = list(labels or entry.labels) if entry.kind == "task" else []
    base_model = load_model(entry.base_model, task_type, head_labels, offline=offline)
    lineage = {"source_languages": list(entry.source_languages)} if entry.source_languages else {}
    return from_composable_sft(
        directory / COMPOSABLE_SFT_FILE, base_model, kind=entry.kind, name=entry.name, base_id=entry.base_model,
        task_type=task_type, labels=head_labels, license=entry.license, lineage=lineage,
    )


def pull_from_hub(
    store: DeltaStore,
    repo_id: str,
    revision: str | None = None,
    *,
    base: str | None = None,
    entry: RegistryEntry | None = None,
    labels: Sequence[str] | None = None,
    offline: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PullResult:
    """Download, verify, validate fully and store a delta; refuse one made for another base than `base`.

    Every file is checked against the hash the Hub reports before anything is stored, and an
    sftstore artifact is stored byte for byte. A composable-sft repository (`pytorch_diff.bin`) is
    converted using its registry `entry` (looked up by repository id when not given; `labels`
    overrides its head's labels); an entry `sft compose` cannot use is refused before downloading.
    Pulling what is already stored (the same tensors and manifest, whenever converted) adds nothing.
    """
    entry = entry or load_registry().find_repo(repo_id)
    if entry is not None and entry.unsupported_with(labels):
        raise HubError(f"{repo_id}: {entry.unsupported_with(labels)}; nothing downloaded")
    if labels and entry is not None and entry.format == "sftstore":
        raise HubError(_OWN_LABELS.format(repo_id=repo_id))
    download = download_artifact(repo_id, revision, offline=offline, token=token, endpoint=endpoint)
    files = None
    if (download.directory / TENSORS_FILE).is_file():
        if labels:
            raise HubError(_OWN_LABELS.format(repo_id=repo_id))
        files = _verified_bytes(download)
        delta = delta_from_files(files, download.directory)
    elif (download.directory / COMPOSABLE_SFT_FILE).is_file():
        delta = _convert_composable_sft(download.directory, repo_id, entry, labels, offline)
    else:
        raise HubError(f"{repo_id}: the repository holds neither {TENSORS_FILE} nor {COMPOSABLE_SFT_FILE}")
    made_for = canonical_base_id(delta.config.base_model.id)
    if base is not None and made_for != base_key(base):
        raise BaseModelMismatchError(f"{repo_id}@{revision or 'main'} is a delta for base {made_for!r}, not {base_key(base)!r}")
    published = {name: download.sha256[name] for name in (files or [COMPOSABLE_SFT_FILE])}
    source = {"type": "hub", "repo_id": repo_id, "revision": revision or constants.DEFAULT_REVISION,
              "commit": download.commit, "files_sha256": published}
    version, created = store.add(delta, source=source, files=files)
    return PullResult(version, created, repo_id, download.commit)


_OWN_LABELS = "{repo_id}: --labels applies to composable-sft deltas only; an sftstore delta carries its own labels"


def _verified_bytes(download: Download) -> dict[str, bytes]:
    """The artifact's files as read for storing, each checked against the hash verified at download."""
    files = read_artifact(download.directory)
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != download.sha256.get(name):
            raise HubError(f"{download.directory / name} changed after it was verified; nothing stored")
    return files


def stored_names(ref: DeltaRef, entry: RegistryEntry | None) -> list[str]:
    """The names `ref` may be stored under: as given, the registry's name for it, and (languages) its
    other ISO 639 codes."""
    names = [ref.name] + ([entry.name] if entry is not None else [])
    if ref.kind == "language":
        names += list(equivalent_codes(ref.name))
    return list(dict.fromkeys(names))


def resolve_or_pull(
    store: DeltaStore,
    ref: DeltaRef,
    base: str,
    *,
    pull: bool = True,
    registry: Registry | None = None,
    labels: Sequence[str] | None = None,
    **hub_kwargs,
) -> StoredVersion:
    """Resolve `ref` in the store, under any name it may be stored under (registry aliases, ISO 639
    codes); if no such delta is stored, pull the published delta the registry names for it."""
    base = base_key(base)
    entry = (registry or load_registry()).find(base, ref.kind, ref.name)
    if labels and entry is not None and entry.format == "sftstore":
        raise RefNotFoundError(_OWN_LABELS.format(repo_id=entry.repo_id))
    for name in stored_names(ref, entry):
        if store.list(base=base, kind=ref.kind, name=name):
            version = store.resolve(DeltaRef(ref.kind, name, ref.selector), base)
            if labels:  # the manifest is read only to compare labels
                stored_labels = store.manifest(version).get("labels") or []
                if list(labels) != stored_labels:
                    raise StoreError(f"{version.ref} is stored with labels {stored_labels}, not {list(labels)}; drop "
                                     f"--labels, or `sft rm {version.ref}` to pull it again with these labels")
            return version
    missing = f"no delta {DeltaRef(ref.kind, ref.name)} in the store for base {base!r}"
    if entry is None:
        raise RefNotFoundError(f"{missing}, and the registry names no published delta for it")
    if entry.unsupported_with(labels):
        raise RefNotFoundError(f"{missing}; the registry's {entry.repo_id} cannot be used: {entry.unsupported_with(labels)}")
    if not pull:
        raise RefNotFoundError(f"{missing}; pulling {entry.repo_id} from the Hub is switched off here "
                               "(sft compose --no-pull; sft serve without --allow-pull)")
    pulled = pull_from_hub(store, entry.repo_id, entry.revision, base=base, entry=entry, labels=labels, **hub_kwargs)
    if ref.selector is None:
        return pulled.version
    return store.resolve(DeltaRef(pulled.version.kind, pulled.version.name, ref.selector), base)
