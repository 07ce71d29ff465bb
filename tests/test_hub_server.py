"""The test Hub (tests/hub_server.py) driven by the real `huggingface_hub` client.

These tests pin down the wire protocol the project's push/pull code relies on, so that a change in
`huggingface_hub` (or in the test server) shows up here first, not as a puzzling failure elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from hub_server import DEFAULT_TOKEN, HubServer, git_blob_sha1, hub_environment

REPO = "tester/demo"
README = b"---\nlicense: apache-2.0\ntags:\n- sft\n---\n# Demo\n\nA test repository.\n"
BINARY_V1 = bytes(range(256)) * 4 + b"\x00\xff\x00"
BINARY_V2 = bytes(reversed(range(256))) * 3
CONFIG_V1 = b'{"version": 1}\n'
CONFIG_V2 = b'{"version": 2, "note": "second"}\n'

# Every request the client may make in these tests; anything else (e.g. /api/agent-harnesses) fails a test.
EXPECTED_PATH = re.compile(
    r"^(POST /api/repos/create|POST /api/validate-yaml"
    r"|(GET|POST|DELETE|PUT) /api/(models|datasets)/[^/]+/[^/]+(/(revision|refs|commits|tree|preupload|commit|tag"
    r"|branch|settings)(/.*)?)?"
    r"|(GET|HEAD) /(datasets/)?[^/]+/[^/]+/resolve/[^/]+/.+)$"
)


@pytest.fixture(autouse=True)
def _server_saw_only_expected_requests(hub_server):
    """After each test: no server-side error, no unrouted request, nothing outside the known endpoints."""
    yield
    assert hub_server.errors == []
    assert hub_server.unhandled == []
    unexpected = [p for p in hub_server.paths() if not EXPECTED_PATH.match(p)]
    assert unexpected == []


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def _read_tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


V1_FILES = {"README.md": README, "config.json": CONFIG_V1, "weights.bin": BINARY_V1}
V2_FILES = {"README.md": README, "config.json": CONFIG_V2, "weights.bin": BINARY_V2, "extra/notes.txt": b"notes\n"}


def _publish_two_versions(env, tmp_path: Path) -> dict[str, str]:
    """create_repo (twice), upload_folder v1 + tag v1, upload_folder v2 + tag v2; returns {"v1": sha, "v2": sha}."""
    api = env.api()
    url = api.create_repo(REPO)
    assert url == f"{env.endpoint}/{REPO}" and url.repo_id == REPO
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # 409 with `url`, swallowed by exist_ok

    v1 = api.upload_folder(repo_id=REPO, folder_path=_write(tmp_path / "v1", V1_FILES), commit_message="v1")
    api.create_tag(REPO, tag="v1", revision=v1.oid, tag_message="version 1")
    v2 = api.upload_folder(repo_id=REPO, folder_path=_write(tmp_path / "v2", V2_FILES), commit_message="v2",
                           commit_description="second version")
    api.create_tag(REPO, tag="v2", revision=v2.oid)
    assert re.fullmatch(r"[0-9a-f]{40}", v1.oid) and re.fullmatch(r"[0-9a-f]{40}", v2.oid) and v1.oid != v2.oid
    assert v2.commit_url == f"{env.endpoint}/{REPO}/commit/{v2.oid}"
    return {"v1": v1.oid, "v2": v2.oid}


# ------------------------------------------------------------------------------------- environment


def test_fixture_points_the_client_at_the_server(hub_env, hub_server):
    assert hub_env.server is hub_server and hub_env.endpoint == hub_server.endpoint
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", hub_env.endpoint)
    assert constants.ENDPOINT == hub_env.endpoint and os.environ["HF_ENDPOINT"] == hub_env.endpoint
    assert constants.HF_HUB_OFFLINE is False  # conftest.py switches it on for the other tests
    assert constants.HF_HUB_DISABLE_TELEMETRY is True
    assert Path(constants.HF_HUB_CACHE) == hub_env.hf_home / "hub" == hub_env.cache_dir
    assert Path(constants.HF_TOKEN_PATH).parent == hub_env.hf_home
    assert os.environ["HF_TOKEN"] == hub_env.token == DEFAULT_TOKEN
    assert HfApi().endpoint == hub_env.endpoint  # no endpoint= needed
    # The module-level functions (`huggingface_hub.create_repo`, ...) are bound to an HfApi built at import.
    import huggingface_hub

    assert huggingface_hub.create_repo(REPO).repo_id == REPO
    assert hub_server.repo_exists(REPO)


def test_hub_environment_context_manager_restores_everything(hub_server, tmp_path):
    def state():
        return (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, os.environ.get("HF_ENDPOINT"),
                os.environ.get("HF_TOKEN"), socket.create_connection)

    before = state()
    with hub_environment(hub_server, tmp_path / "home", offline=True, token=None) as env:
        assert constants.ENDPOINT == env.endpoint and constants.HF_HUB_OFFLINE is True
        assert "HF_TOKEN" not in os.environ and socket.create_connection is not before[-1]
    assert state() == before


def test_only_loopback_connections_are_allowed(hub_env):
    with pytest.raises(OSError, match="127.0.0.1 only"):
        socket.create_connection(("huggingface.co", 443), timeout=1)


# --------------------------------------------------------------------------------------- push side


def test_create_repo_exist_ok_and_conflict(hub_env, hub_server):
    api = hub_env.api()
    api.create_repo(REPO)
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(REPO)
    assert info.value.response.status_code == 409 and info.value.response.json()["url"].endswith(REPO)
    assert [c.title for c in hub_server.commits(REPO)] == ["initial commit"]  # as on the Hub: .gitattributes
    assert list(hub_server.files(REPO)) == [".gitattributes"]


def test_upload_tags_refs_and_commits(hub_env, hub_server, tmp_path):
    shas = _publish_two_versions(hub_env, tmp_path)
    api = hub_env.api()

    refs = api.list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags} == shas
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [("main", "refs/heads/main", shas["v2"])]
    assert {t.ref for t in refs.tags} == {"refs/tags/v1", "refs/tags/v2"} and refs.converts == []

    commits = api.list_repo_commits(REPO)  # newest first
    assert [c.commit_id for c in commits][:2] == [shas["v2"], shas["v1"]]
    assert [c.title for c in commits] == ["v2", "v1", "initial commit"]
    assert commits[0].message == "second version" and commits[0].authors == ["tester"]
    assert [c.commit_id for c in api.list_repo_commits(REPO, revision="v1")] == [shas["v1"], commits[2].commit_id]
    assert [c.id for c in hub_server.commits(REPO)] == [c.commit_id for c in commits]

    assert hub_server.files(REPO, "v1") == {".gitattributes": hub_server.files(REPO)[".gitattributes"], **V1_FILES}
    assert hub_server.refs(REPO)["tags"] == shas
    # v2 re-uploaded an unchanged README: preupload returned its oid, so the client left it out of the commit.
    commit_bodies = [b for p, b in zip(hub_server.paths(), hub_server.request_bodies) if p.endswith("/commit/main")]
    assert len(commit_bodies) == 2 and b'"README.md"' in commit_bodies[0] and b'"README.md"' not in commit_bodies[1]


def test_tags_conflict_and_delete(hub_env, tmp_path):
    shas = _publish_two_versions(hub_env, tmp_path)
    api = hub_env.api()
    with pytest.raises(HfHubHTTPError) as info:
        api.create_tag(REPO, tag="v1", revision=shas["v2"])
    assert info.value.response.status_code == 409
    api.create_tag(REPO, tag="v1", revision=shas["v2"], exist_ok=True)  # no-op
    assert {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}["v1"] == shas["v1"]
    api.delete_tag(REPO, tag="v1")
    assert [t.name for t in api.list_repo_refs(REPO).tags] == ["v2"]
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(REPO, tag="v1")
    with pytest.raises(RevisionNotFoundError):
        api.create_tag(REPO, tag="v3", revision="no-such-branch")


def test_create_commit_validates_readme_and_deletes(hub_env, hub_server):
    """`create_commit` posts README.md to /api/validate-yaml before the preupload."""
    api = hub_env.api()
    api.create_repo(REPO)
    info = api.create_commit(REPO, [CommitOperationAdd("README.md", README),
                                    CommitOperationAdd("a/b.bin", b"\x00\x01"),
                                    CommitOperationAdd("a/c.txt", b"c")], commit_message="add")
    assert "POST /api/validate-yaml" in hub_server.paths()
    assert hub_server.paths().index("POST /api/validate-yaml") < hub_server.paths().index(
        f"POST /api/models/{REPO}/preupload/main")
    info2 = api.create_commit(REPO, [CommitOperationDelete("a/b.bin")], commit_message="rm file",
                              parent_commit=info.oid)
    assert sorted(hub_server.files(REPO)) == [".gitattributes", "README.md", "a/c.txt"]
    api.create_commit(REPO, [CommitOperationDelete("a/")], commit_message="rm folder")
    assert sorted(hub_server.files(REPO)) == [".gitattributes", "README.md"]
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("missing.txt")], commit_message="rm nothing")
    with pytest.raises(HfHubHTTPError) as stale:  # parentCommit is no longer the head of main
        api.create_commit(REPO, [CommitOperationAdd("x", b"x")], commit_message="stale", parent_commit=info2.oid)
    assert stale.value.response.status_code == 412


@pytest.mark.parametrize("xet", [True, False], ids=["hf_xet-pipeline", "no-xet"])
def test_upload_folder_request_sequence(hub_env, hub_server, tmp_path, monkeypatch, xet):
    """With hf_xet installed, upload_folder runs the streamed pipeline (validate-yaml once, while listing the
    folder); with HF_HUB_DISABLE_XET it calls create_commit, which validates README.md a second time."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    api = hub_env.api()
    api.create_repo(REPO)
    hub_server.clear_requests()
    api.upload_folder(repo_id=REPO, folder_path=_write(tmp_path / "f", V1_FILES))
    validations = ["POST /api/validate-yaml"] * (1 if xet else 2)
    assert hub_server.paths() == [*validations, f"POST /api/models/{REPO}/preupload/main",
                                  f"POST /api/models/{REPO}/commit/main"]
    assert json.loads(hub_server.request_bodies[0]) == {"content": README.decode(), "repoType": "model"}
    assert {k: v for k, v in hub_server.files(REPO).items() if k != ".gitattributes"} == V1_FILES


# --------------------------------------------------------------------------------------- pull side


def test_model_info_tree_and_files(hub_env, tmp_path):
    shas = _publish_two_versions(hub_env, tmp_path)
    api = hub_env.api()
    assert api.model_info(REPO).sha == shas["v2"]
    info = api.model_info(REPO, revision="v1")
    assert info.sha == shas["v1"] and info.id == REPO and info.private is False
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", *sorted(V1_FILES)]
    assert api.model_info(REPO, revision=shas["v1"]).sha == shas["v1"]
    assert api.repo_info(REPO, revision="v2").sha == shas["v2"]

    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", *sorted(V2_FILES)]
    tree = {e.path: e for e in api.list_repo_tree(REPO, revision="v1", recursive=True)}
    assert tree["weights.bin"].size == len(BINARY_V1) and tree["weights.bin"].blob_id == git_blob_sha1(BINARY_V1)
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert top["extra"] == "RepoFolder" and top["config.json"] == "RepoFile" and "extra/notes.txt" not in top
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="extra")] == ["extra/notes.txt"]
    assert api.file_exists(REPO, "extra/notes.txt") and not api.file_exists(REPO, "extra/notes.txt", revision="v1")


def test_snapshot_download_by_tag_branch_and_sha(hub_env, tmp_path):
    shas = _publish_two_versions(hub_env, tmp_path)
    gitattributes = {".gitattributes"}

    v1 = snapshot_download(REPO, revision="v1")
    assert Path(v1) == hub_env.cache_dir / "models--tester--demo" / "snapshots" / shas["v1"]
    assert {k: v for k, v in _read_tree(v1).items() if k not in gitattributes} == V1_FILES
    v2 = snapshot_download(REPO, revision="v2")
    assert {k: v for k, v in _read_tree(v2).items() if k not in gitattributes} == V2_FILES
    assert snapshot_download(REPO) == v2  # main
    assert snapshot_download(REPO, revision=shas["v1"]) == v1
    refs = hub_env.cache_dir / "models--tester--demo" / "refs"
    assert {p.name: p.read_text() for p in refs.iterdir()} == {"v1": shas["v1"], "v2": shas["v2"], "main": shas["v2"]}

    # Into a plain folder, as `local_dir` (metadata under local_dir/.cache/huggingface)
    out = snapshot_download(REPO, revision="v1", local_dir=tmp_path / "out", allow_patterns=["*.bin", "*.json"])
    assert {k: v for k, v in _read_tree(out).items() if not k.startswith(".cache/")} == {
        "config.json": CONFIG_V1, "weights.bin": BINARY_V1}


def test_snapshot_download_by_sha_skips_repo_info(hub_env, hub_server, tmp_path):
    shas = _publish_two_versions(hub_env, tmp_path)
    hub_server.clear_requests()
    snapshot_download(REPO, revision=shas["v1"])
    paths = hub_server.paths()
    assert not any(p.startswith(f"GET /api/models/{REPO}/revision") for p in paths)
    assert paths[0] == f"GET /api/models/{REPO}/tree/{shas['v1']}"  # snapshot lists the tree, not siblings
    assert sorted(p for p in paths if p.startswith("HEAD")) == sorted(
        f"HEAD /{REPO}/resolve/{shas['v1']}/{name}" for name in [".gitattributes", *V1_FILES])


def test_hf_hub_download_one_file_and_range(hub_env, hub_server, tmp_path):
    shas = _publish_two_versions(hub_env, tmp_path)
    path = hf_hub_download(REPO, "weights.bin", revision="v1", endpoint=hub_env.endpoint, token=hub_env.token)
    assert Path(path).read_bytes() == BINARY_V1
    assert Path(path).parent.name == shas["v1"]
    blob = Path(path).resolve()
    assert blob.parent.name == "blobs" and blob.name == git_blob_sha1(BINARY_V1)  # the ETag names the blob
    assert Path(hf_hub_download(REPO, "extra/notes.txt")).read_bytes() == b"notes\n"

    url = f"{hub_env.endpoint}/{REPO}/resolve/v1/weights.bin"
    part = get_session().get(url, headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == BINARY_V1[1000:]
    assert part.headers["Content-Range"] == f"bytes 1000-{len(BINARY_V1) - 1}/{len(BINARY_V1)}"
    head = get_session().head(url)
    assert head.headers["X-Repo-Commit"] == shas["v1"] and head.headers["ETag"] == f'"{git_blob_sha1(BINARY_V1)}"'
    assert int(head.headers["Content-Length"]) == len(BINARY_V1) and "X-Xet-Hash" not in head.headers


# ------------------------------------------------------------------------------------------- errors


def test_unknown_repo_revision_and_file(hub_env, tmp_path):
    _publish_two_versions(hub_env, tmp_path)
    api = hub_env.api()
    with pytest.raises(RepositoryNotFoundError) as missing:
        api.model_info("tester/nope")
    assert missing.value.response.status_code == 404  # authenticated: 404
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("tester/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/nope", "config.json")
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        api.model_info("tester/nope", token=False)
    assert anonymous.value.response.status_code == 401  # anonymous: 401, as on the Hub

    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="v9")

    with pytest.raises(EntryNotFoundError) as entry:  # RemoteEntryNotFoundError in 2.x
        hf_hub_download(REPO, "missing.json", revision="v1")
    assert entry.value.response.headers["X-Error-Code"] == "EntryNotFound"
    # the client remembers the miss for this commit (HEAD answered X-Repo-Commit)
    assert list((hub_env.cache_dir / "models--tester--demo" / ".no_exist").glob("*/missing.json"))


def test_private_repo_needs_a_member_token(hub_env, hub_server, tmp_path):
    api = hub_env.api()
    api.create_repo(REPO, private=True)
    api.upload_folder(repo_id=REPO, folder_path=_write(tmp_path / "p", V1_FILES))
    assert api.model_info(REPO).private is True
    assert Path(snapshot_download(REPO)).joinpath("config.json").read_bytes() == CONFIG_V1

    hub_env.set_token(None)  # anonymous: 401 RepoNotFound
    anonymous = HfApi(endpoint=hub_env.endpoint)
    with pytest.raises(RepositoryNotFoundError) as info:
        anonymous.model_info(REPO)
    assert info.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, revision="v0-not-cached")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.list_repo_refs(REPO)

    hub_server.add_token("hf_otherUserToken", "mallory")  # authenticated without access: 404 RepoNotFound
    with pytest.raises(RepositoryNotFoundError) as info:
        HfApi(endpoint=hub_env.endpoint, token="hf_otherUserToken").model_info(REPO)
    assert info.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):  # an invalid token is refused too
        HfApi(endpoint=hub_env.endpoint, token="hf_wrong").model_info(REPO)
    hub_server.grant(REPO, "mallory")
    assert HfApi(endpoint=hub_env.endpoint, token="hf_otherUserToken").model_info(REPO).private is True


def test_warm_cache_hides_auth_errors(hub_env, hub_server, tmp_path):
    """snapshot_download falls back to the cached snapshot when the Hub refuses the request (see HUB-TESTING.md)."""
    api = hub_env.api()
    api.create_repo(REPO, private=True)
    api.upload_folder(repo_id=REPO, folder_path=_write(tmp_path / "p", V1_FILES))
    cached = snapshot_download(REPO)
    hub_env.set_token(None)
    hub_server.clear_requests()
    assert snapshot_download(REPO) == cached  # 401 swallowed: served from cache
    assert hub_server.paths() == [f"GET /api/models/{REPO}/revision/main"]


def test_require_auth_everywhere(hub_env, hub_server, tmp_path):
    _publish_two_versions(hub_env, tmp_path)
    hub_server.require_auth = True
    with pytest.raises(RepositoryNotFoundError) as info:
        hub_env.api(token=False).model_info(REPO)
    assert info.value.response.status_code == 401
    assert info.value.response.headers["X-Error-Code"] == "RepoNotFound"
    assert hub_env.api().model_info(REPO).id == REPO


def test_anonymous_cannot_write(hub_env, hub_server, tmp_path):
    _publish_two_versions(hub_env, tmp_path)
    with pytest.raises(HfHubHTTPError) as info:
        hub_env.api(token=False).create_repo("tester/other")
    assert info.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hub_env.api(token=False).create_tag(REPO, tag="v3")
    hub_server.add_token("hf_otherUserToken", "mallory")
    with pytest.raises(HfHubHTTPError) as info:
        hub_env.api(token="hf_otherUserToken").create_tag(REPO, tag="v3")
    assert info.value.response.status_code == 403


# ------------------------------------------------------------------------------------------ offline


def test_offline_is_served_from_cache_without_requests(hub_env, hub_server, tmp_path):
    shas = _publish_two_versions(hub_env, tmp_path)
    v1 = snapshot_download(REPO, revision="v1")
    main = snapshot_download(REPO)
    hub_server.clear_requests()

    hub_env.set_offline()
    assert snapshot_download(REPO, revision="v1") == v1
    assert snapshot_download(REPO, revision=shas["v1"]) == v1
    assert snapshot_download(REPO) == main
    assert Path(hf_hub_download(REPO, "weights.bin", revision="v1")).read_bytes() == BINARY_V1
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, revision="v9")
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "weights.bin", revision="v9")
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("tester/never-downloaded")
    assert hub_server.requests == []  # not one request reached the server


# ------------------------------------------------------------------------------------------- tamper


def test_tamper_changes_served_bytes_but_not_metadata(hub_env, hub_server, tmp_path):
    shas = _publish_two_versions(hub_env, tmp_path)
    corrupted = bytes([BINARY_V1[0] ^ 0xFF]) + BINARY_V1[1:]  # same length, one byte flipped
    hub_server.tamper(REPO, "weights.bin", corrupted)
    assert hub_server.commits(REPO)[0].id == shas["v2"] and hub_server.files(REPO, "v1")["weights.bin"] == BINARY_V1

    # huggingface_hub 2.4.0 does NOT notice a same-length corruption of a regular file: it only checks the
    # size against the HEAD's Content-Length, never the bytes against the ETag (git blob sha1).
    path = Path(hf_hub_download(REPO, "weights.bin", revision="v1"))
    assert path.read_bytes() == corrupted != BINARY_V1
    assert path.resolve().name == git_blob_sha1(BINARY_V1)  # cached under the advertised (untampered) ETag
    # ... but HfApi.verify_repo_checksums compares the cache with the tree's oids and finds it.
    snapshot_download(REPO, revision="v1")
    report = hub_env.api().verify_repo_checksums(REPO, revision="v1")
    assert [m["path"] for m in report.mismatches] == ["weights.bin"]

    # A corruption that changes the size is caught by the client ("Consistency check failed").
    hub_server.tamper(REPO, "config.json", CONFIG_V2 + b"trailing garbage")
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(REPO, "config.json", revision="v2")
    hub_server.tamper(REPO, "config.json", None)
    assert Path(hf_hub_download(REPO, "config.json", revision="v2")).read_bytes() == CONFIG_V2


# ----------------------------------------------------------------------------------- token hygiene


def test_token_only_travels_in_the_authorization_header(hub_env, hub_server, tmp_path):
    _publish_two_versions(hub_env, tmp_path)
    snapshot_download(REPO, revision="v1")
    hits = hub_server.find(hub_env.token)
    assert hits and all(h.endswith("header authorization") for h in hits)
    assert all(r.headers.get("authorization") == f"Bearer {hub_env.token}" for r in hub_server.requests)
    leaked = [p for p in hub_env.hf_home.rglob("*") if p.is_file() and hub_env.token.encode() in p.read_bytes()]
    assert leaked == []  # nothing in HF_HOME (cache, refs, tree listings) holds the token


def test_server_stops_cleanly_with_open_connections(tmp_path):
    server = HubServer()
    with hub_environment(server, tmp_path / "home"):
        HfApi().create_repo("tester/x")  # leaves a keep-alive connection in the client's pool
        server.stop()  # must not hang on it
        assert server._thread is not None and not server._thread.is_alive()
    server.stop()  # idempotent
