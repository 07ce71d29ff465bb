"""A small Hugging Face Hub for tests: the real `huggingface_hub` client talks to it over HTTP on 127.0.0.1.

It implements the part of the Hub protocol that `huggingface_hub` (checked against 2.4.0) speaks for
creating repositories, committing regular (non-LFS) files, tags and branches, listing refs, commits and
trees, repository info and downloads (`hf_hub_download`, `snapshot_download`). Nothing is written to disk:
every repository lives in memory as a list of commits, each a full snapshot `{path: bytes}`.

    server = HubServer()                 # started; server.endpoint == "http://127.0.0.1:<port>"
    ...
    server.stop()

In tests, use the fixtures at the bottom of this module from any test module:

    # tests/conftest.py imports the fixtures, so every test module can ask for them

    def test_push(hub_env):
        api = hub_env.api()              # HfApi(endpoint=..., token=...)
        ...

`hub_env` points `huggingface_hub` at the server (environment variables *and* the already-imported
`huggingface_hub.constants`, which the client reads at import time), with a temporary `HF_HOME`,
telemetry off and `HF_TOKEN` set to the server's test token.

Auth model (kept close to the Hub's): a token maps to a user name. A repository is readable by anyone
when public, and only by its members (its creator, anyone whose user name is its namespace, and users
given `grant()`) when private; writing needs membership. Requests without a valid token that cannot be
served get 401 with `X-Error-Code: RepoNotFound`, authenticated ones 404, as the Hub does (the client turns
both into `RepositoryNotFoundError`). The server never answers 5xx or 429: the client retries those with
back-off. A bug in the server itself is answered 400 and recorded in `server.errors`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

DEFAULT_TOKEN = "hf_sftstoreTestToken0000000000000000"
DEFAULT_USER = "tester"
# What the Hub puts in the first commit of every new repository (abridged).
INITIAL_GITATTRIBUTES = (b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
                         b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub sends as ETag / oid for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------- data


@dataclass
class Commit:
    id: str  # 40 lowercase hex
    title: str
    message: str  # the commit description
    parents: list[str]
    files: dict[str, bytes]  # full snapshot of the tree at this commit
    author: str
    date: str


@dataclass
class Repo:
    repo_type: str  # "model" | "dataset" | "space"
    repo_id: str  # "namespace/name"
    private: bool
    members: set[str]
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)  # id -> commit, in creation order
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit id
    tags: dict[str, str] = field(default_factory=dict)  # name -> commit id

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


class Request(NamedTuple):
    """One request the server saw. `headers` has lower-case names; the body is in `server.request_bodies`."""

    method: str
    path: str  # as sent: still URL-quoted, with the query string
    headers: dict[str, str]


class _Response(NamedTuple):
    status: int
    body: bytes = b""
    headers: dict[str, str] = {}
    head_length: int | None = None  # Content-Length to advertise on HEAD when it differs from len(body)


class _HubError(Exception):
    """Raised inside a handler; becomes an error response with the Hub's `X-Error-Code` header."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.body = body


# ------------------------------------------------------------------------------------------- server


class HubServer:
    """An in-memory Hub on 127.0.0.1, on a free port, served by a daemon thread.

    Options:
      tokens: {token: user name} accepted as `Authorization: Bearer <token>`
              (default {DEFAULT_TOKEN: DEFAULT_USER}); `add_token()` adds more.
      require_auth: when true, every request without a valid token gets 401 `RepoNotFound`
              (also settable later: `server.require_auth = True`).
      initial_commit: when true (default, as on the Hub), a new repository starts with one commit
              holding `.gitattributes` on branch `main`; otherwise with one empty commit.
      echo_headers: when true, every error message repeats the request's Authorization header (as a
              careless server or proxy does), to test that clients never print it.
      lfs_suffixes: files whose path ends with one of these are served as the Hub serves LFS files
              (also settable later): their sha256 as ETag, and `lfs` {sha256/oid, size, pointerSize}
              with the pointer file's git blob id in repository info and tree listings.

    Test hooks: `requests`, `request_bodies`, `paths()`, `clear_requests()`, `find(text)`,
    `commits(repo_id)`, `files(repo_id)`, `refs(repo_id)`, `create_repo()`, `set_private()`, `grant()`,
    `tamper()`, `errors`, `unhandled`, `reset()`, `stop()`.
    """

    def __init__(self, *, tokens: dict[str, str] | None = None, require_auth: bool = False,
                 initial_commit: bool = True, lfs_suffixes: tuple[str, ...] = (), echo_headers: bool = False,
                 start: bool = True):
        self.tokens: dict[str, str] = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.require_auth = require_auth
        self.initial_commit = initial_commit
        self.lfs_suffixes = lfs_suffixes
        self.echo_headers = echo_headers
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.reset()
        if start:
            self.start()

    # ---- lifecycle

    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        httpd.handle_error = self._record_server_error  # type: ignore[method-assign]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hub-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open (keep-alive) connections and join the server thread."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()  # stops serve_forever (returns within poll_interval)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wake handler threads blocked on an idle keep-alive connection
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The first configured token (the default test token unless `tokens=` said otherwise)."""
        return next(iter(self.tokens))

    def reset(self) -> None:
        """Forget every repository, recorded request, error and tampering (tokens and options stay)."""
        with self._lock:
            self._repos: dict[tuple[str, str], Repo] = {}
            self._tampered: dict[tuple[str, str, str], bytes] = {}
            self._counter = 0
            self.requests: list[Request] = []
            self.request_bodies: list[bytes] = []
            self.errors: list[str] = []  # exceptions raised by the server's own code
            self.unhandled: list[Request] = []  # requests no route matched (answered 404)

    # ---- hooks for tests

    def add_token(self, token: str, user: str) -> None:
        self.tokens[token] = user

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_bodies.clear()

    def paths(self) -> list[str]:
        """`"METHOD /path"` (query string dropped) for every request seen, in order."""
        with self._lock:
            return [f"{r.method} {urlsplit(r.path).path}" for r in self.requests]

    def find(self, text: str) -> list[str]:
        """Where `text` appeared in requests: `"#i path"`, `"#i header <name>"`, `"#i body"`."""
        needle = text.encode()
        hits = []
        with self._lock:
            for i, (req, body) in enumerate(zip(self.requests, self.request_bodies)):
                if text in req.path or text in unquote(req.path):
                    hits.append(f"#{i} path")
                hits += [f"#{i} header {name}" for name, value in req.headers.items() if text in value]
                if needle in body:
                    hits.append(f"#{i} body")
        return hits

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model",
                    owner: str = DEFAULT_USER) -> Repo:
        """Create a repository directly (no HTTP), as `owner`."""
        with self._lock:
            return self._new_repo(repo_type, repo_id, private=private, user=owner)

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        with self._lock:
            self._repo(repo_type, repo_id).private = private

    def grant(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Give `user` read and write access to the repository."""
        with self._lock:
            self._repo(repo_type, repo_id).members.add(user)

    def tamper(self, repo_id: str, path: str, new_bytes: bytes | None, *, repo_type: str = "model") -> None:
        """Serve `new_bytes` for `path` at every commit, keeping commit ids, ETag, advertised size and tree oids.

        Simulates corruption in transit or in storage. `new_bytes=None` undoes it.
        """
        key = (repo_type, repo_id, path)
        with self._lock:
            self._repo(repo_type, repo_id)
            if new_bytes is None:
                self._tampered.pop(key, None)
            else:
                self._tampered[key] = bytes(new_bytes)

    def commits(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[Commit]:
        """The history reachable from `revision`, newest first (as `list_repo_commits`)."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return self._history(repo, self._resolve(repo, revision))

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """The stored (untampered) tree at `revision`."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return dict(repo.commits[self._resolve(repo, revision)].files)

    def refs(self, repo_id: str, *, repo_type: str = "model") -> dict[str, dict[str, str]]:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return {"branches": dict(repo.branches), "tags": dict(repo.tags)}

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    # ---- repository model

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repository {repo_id!r} on the test hub") from None

    def _new_repo(self, repo_type: str, repo_id: str, *, private: bool, user: str) -> Repo:
        if (repo_type, repo_id) in self._repos:
            raise ValueError(f"{repo_type} repository {repo_id!r} exists")
        repo = Repo(repo_type, repo_id, private, {user}, _now())
        files = {".gitattributes": INITIAL_GITATTRIBUTES} if self.initial_commit else {}
        self._add_commit(repo, "main", None, files, "initial commit", "", user)
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _add_commit(self, repo: Repo, branch: str, parent: str | None, files: dict[str, bytes], title: str,
                    message: str, author: str) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_type, repo.repo_id, self._counter, parent, title,
                           sorted((p, git_blob_sha1(d)) for p, d in files.items())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), title, message,
                        [parent] if parent else [], dict(files), author, _now())
        repo.commits[commit.id] = commit
        repo.branches[branch] = commit.id
        return commit

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> str:
        """Branch, tag, `refs/heads/..`, `refs/tags/..` or a full commit id -> commit id; else RevisionNotFound."""
        for prefix, table in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if revision.startswith(prefix) and revision[len(prefix):] in table:
                return table[revision[len(prefix):]]
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    @staticmethod
    def _history(repo: Repo, commit_id: str) -> list[Commit]:
        history = []
        current: str | None = commit_id
        while current:
            commit = repo.commits[current]
            history.append(commit)
            current = commit.parents[0] if commit.parents else None
        return history

    # ---- auth

    def _who(self, headers: dict[str, str]) -> tuple[str, str | None]:
        """("anonymous" | "invalid" | "valid", user name)."""
        value = headers.get("authorization")
        if not value:
            return "anonymous", None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            return "invalid", None
        return "valid", self.tokens[token.strip()]

    def _readable(self, repo_type: str, repo_id: str, who: tuple[str, str | None]) -> Repo:
        state, user = who
        if state == "invalid":
            raise _HubError(401, "RepoNotFound", "Invalid credentials in Authorization header")
        if self.require_auth and state != "valid":
            raise _HubError(401, "RepoNotFound", "Repository not found")
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._is_member(repo, user)):
            raise _HubError(404 if state == "valid" else 401, "RepoNotFound", "Repository not found")
        return repo

    def _writable(self, repo_type: str, repo_id: str, who: tuple[str, str | None]) -> Repo:
        repo = self._readable(repo_type, repo_id, who)
        state, user = who
        if state != "valid":
            raise _HubError(401, "RepoNotFound", "You must be authenticated to write to this repository")
        if not self._is_member(repo, user):
            raise _HubError(403, None, f"You don't have the rights to write to {repo_id}")
        return repo

    def _authenticated(self, who: tuple[str, str | None]) -> str:
        state, user = who
        if state != "valid":
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        return user  # type: ignore[return-value]

    @staticmethod
    def _is_member(repo: Repo, user: str | None) -> bool:
        return user is not None and (user in repo.members or user == repo.namespace)

    # ---- HTTP entry point (called by the handler thread)

    def _record_server_error(self, request, client_address) -> None:  # replaces ThreadingHTTPServer.handle_error
        with self._lock:
            self.errors.append(traceback.format_exc())

    def _handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> _Response:
        with self._lock:
            request = Request(method, raw_path, headers)
            self.requests.append(request)
            self.request_bodies.append(body)
            try:
                return self._route(method, raw_path, headers, body, request)
            except _HubError as err:
                if self.echo_headers:  # as a careless proxy or server does: secrets in the error text
                    err.message += f" (you sent Authorization: {headers.get('authorization', 'nothing')})"
                return self._error(err)
            except Exception:  # a bug here: never 5xx (the client would retry with back-off)
                self.errors.append(traceback.format_exc())
                return self._error(_HubError(400, None, "test hub internal error (see server.errors)"))

    def _error(self, err: _HubError) -> _Response:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        return _json(err.body or {"error": err.message}, err.status, headers)

    def _route(self, method: str, raw_path: str, headers: dict[str, str], body: bytes,
               request: Request) -> _Response:
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = split.path.split("/")[1:]  # still quoted: a revision "a/b" arrives as one segment "a%2Fb"
        who = self._who(headers)

        if segments[:1] == ["api"]:
            rest = segments[1:]
            if rest == ["whoami-v2"] and method == "GET":
                user = self._authenticated(who)
                return _json({"type": "user", "name": user, "orgs": [],
                              "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(_load_json(body), who)
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(_load_json(body), who)
            if rest == ["validate-yaml"] and method == "POST":
                if self.require_auth:
                    self._authenticated(who)
                return _json({"errors": [], "warnings": []})
            if len(rest) >= 3 and rest[0] in REPO_TYPES:
                repo_type, repo_id = REPO_TYPES[rest[0]], f"{unquote(rest[1])}/{unquote(rest[2])}"
                response = self._repo_api(method, repo_type, repo_id, rest[3:], query, body, who)
                if response is not None:
                    return response
        else:
            # /{ns}/{name}/resolve/{rev}/{path}, /datasets/{ns}/{name}/resolve/..., /spaces/...
            repo_type = "model"
            if segments and segments[0] in REPO_TYPES and segments[0] != "models":
                repo_type, segments = REPO_TYPES[segments[0]], segments[1:]
            if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
                repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
                filename = "/".join(unquote(s) for s in segments[4:])
                return self._resolve_file(method, repo_type, repo_id, unquote(segments[3]), filename, headers, who)

        self.unhandled.append(request)
        return self._error(_HubError(404, None, f"test hub: no route for {method} {split.path}"))

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict[str, str],
                  body: bytes, who) -> _Response | None:
        action = rest[0] if rest else ""
        arg = "/".join(unquote(s) for s in rest[1:])  # revision, tag or branch name
        if method == "GET" and not rest:
            return self._info(repo_type, repo_id, None, query, who)
        if method == "GET" and action == "revision" and arg:
            return self._info(repo_type, repo_id, arg, query, who)
        if method == "GET" and rest == ["refs"]:
            return self._list_refs(repo_type, repo_id, who)
        if method == "GET" and action == "commits":
            return self._list_commits(repo_type, repo_id, arg or "main", who)
        if method == "GET" and action == "tree" and len(rest) >= 2:
            path = "/".join(unquote(s) for s in rest[2:])
            return self._tree(repo_type, repo_id, unquote(rest[1]), path, query, who)
        if method == "POST" and action == "preupload" and arg:
            return self._preupload(repo_type, repo_id, arg, _load_json(body), who)
        if method == "POST" and action == "commit" and arg:
            return self._commit(repo_type, repo_id, arg, query, body, who)
        if action == "tag" and arg and method in ("POST", "DELETE"):
            return self._tag(method, repo_type, repo_id, arg, _load_json(body) if method == "POST" else {}, who)
        if action == "branch" and arg and method in ("POST", "DELETE"):
            return self._branch(method, repo_type, repo_id, arg, _load_json(body) if body else {}, who)
        if method == "PUT" and rest == ["settings"]:
            return self._settings(repo_type, repo_id, _load_json(body), who)
        return None

    # ---- endpoints

    def _repo_url(self, repo: Repo | tuple[str, str]) -> str:
        repo_type, repo_id = (repo.repo_type, repo.repo_id) if isinstance(repo, Repo) else repo
        return f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"

    def _create_repo(self, payload: dict, who) -> _Response:
        user = self._authenticated(who)
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise _HubError(400, None, f"unsupported repo type {repo_type!r}")
        name, namespace = payload.get("name"), payload.get("organization") or user
        if not name or "/" in name:
            raise _HubError(400, None, f"invalid repository name {name!r}")
        repo_id = f"{namespace}/{name}"
        if (repo_type, repo_id) in self._repos:
            raise _HubError(409, None, f"You already created this {repo_type} repo",
                            body={"error": f"You already created this {repo_type} repo",
                                  "url": self._repo_url((repo_type, repo_id))})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self._new_repo(repo_type, repo_id, private=private, user=user)
        return _json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, payload: dict, who) -> _Response:
        repo_type = payload.get("type") or "model"
        _, user = who
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        self._writable(repo_type, repo_id, who)
        del self._repos[(repo_type, repo_id)]
        for key in [k for k in self._tampered if k[:2] == (repo_type, repo_id)]:
            del self._tampered[key]
        return _json({})

    def _settings(self, repo_type: str, repo_id: str, payload: dict, who) -> _Response:
        repo = self._writable(repo_type, repo_id, who)
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        elif "private" in payload:
            repo.private = bool(payload["private"])
        return _json({})

    def _info(self, repo_type: str, repo_id: str, revision: str | None, query: dict[str, str], who) -> _Response:
        repo = self._readable(repo_type, repo_id, who)
        commit = repo.commits[self._resolve(repo, revision or "main")]
        with_blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict = {"rfilename": path}
            if with_blobs:
                sibling.update(self._file_ids(path, commit.files[path], lfs_key="sha256"))
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id, "author": repo.namespace, "sha": commit.id, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "createdAt": repo.created_at, "lastModified": commit.date, "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _json(info)

    def _list_refs(self, repo_type: str, repo_id: str, who) -> _Response:
        repo = self._readable(repo_type, repo_id, who)

        def refs(table: dict[str, str], kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(table.items())]

        return _json({"branches": refs(repo.branches, "heads"), "converts": [], "tags": refs(repo.tags, "tags"),
                      "pullRequests": []})

    def _list_commits(self, repo_type: str, repo_id: str, revision: str, who) -> _Response:
        repo = self._readable(repo_type, repo_id, who)
        return _json([
            {"id": c.id, "title": c.title, "message": c.message, "date": c.date,
             "authors": [{"user": c.author, "avatar": ""}]}
            for c in self._history(repo, self._resolve(repo, revision))
        ])

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, query: dict[str, str],
              who) -> _Response:
        repo = self._readable(repo_type, repo_id, who)
        commit_id = self._resolve(repo, revision)
        files = repo.commits[commit_id].files
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        below = {p: d for p, d in files.items() if p.startswith(prefix)}
        if prefix and not below:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {revision}",
                            headers={"X-Repo-Commit": commit_id})
        entries: dict[str, dict] = {}
        for file_path, data in below.items():
            parts = file_path[len(prefix):].split("/")
            # the folders between `path` and the file (only the first one unless recursive)
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "path": folder,
                                   "oid": hashlib.sha1(f"tree {commit_id} {folder}".encode()).hexdigest()}
            if recursive or len(parts) == 1:
                ids = self._file_ids(file_path, data, lfs_key="oid")
                entries[file_path] = {"type": "file", "path": file_path, "oid": ids.pop("blobId"), **ids}
        return _json([entries[p] for p in sorted(entries)])

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict, who) -> _Response:
        repo = self._writable(repo_type, repo_id, who)
        if revision not in repo.branches:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        head = repo.commits[repo.branches[revision]].files
        return _json({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha1(head[f["path"]]) if f["path"] in head else None}
            for f in payload.get("files", [])
        ]})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict[str, str], body: bytes,
                who) -> _Response:
        repo = self._writable(repo_type, repo_id, who)
        if query.get("create_pr") in ("1", "true"):
            raise _HubError(400, None, "the test hub does not support pull requests (create_pr)")
        if revision not in repo.branches:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (commits go to a branch)")
        head = repo.branches[revision]
        files = dict(repo.commits[head].files)
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"]
                files[value["path"]] = (base64.b64decode(content) if value.get("encoding") == "base64"
                                        else content.encode())
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}",
                                    headers={"X-Repo-Commit": head})
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(folder)]
                if not doomed:
                    raise _HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}",
                                    headers={"X-Repo-Commit": head})
                for p in doomed:
                    del files[p]
            else:  # lfsFile: never asked for, since preupload answers "regular"
                raise _HubError(400, None, f"test hub: unsupported commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent and parent != head:
            raise _HubError(412, None, "A commit has happened since. Please refresh and try again.")
        if not header.get("summary"):
            raise _HubError(400, None, "commit summary is required")
        _, user = who
        commit = self._add_commit(repo, revision, head, files, header["summary"], header.get("description", ""),
                                  user)
        return _json({"success": True, "commitOid": commit.id, "commitMessage": commit.title,
                      "commitUrl": f"{self._repo_url(repo)}/commit/{commit.id}", "hookOutput": ""})

    def _tag(self, method: str, repo_type: str, repo_id: str, arg: str, payload: dict, who) -> _Response:
        repo = self._writable(repo_type, repo_id, who)
        if method == "DELETE":
            if arg not in repo.tags:
                raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {arg}")
            del repo.tags[arg]
            return _json({})
        tag = payload.get("tag")
        if not tag:
            raise _HubError(400, None, "missing tag name")
        target = self._resolve(repo, arg)
        if tag in repo.tags:
            raise _HubError(409, None, f"Tag {tag} already exists")
        repo.tags[tag] = target
        return _json({})

    def _branch(self, method: str, repo_type: str, repo_id: str, name: str, payload: dict, who) -> _Response:
        repo = self._writable(repo_type, repo_id, who)
        if method == "DELETE":
            if name not in repo.branches:
                raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {name}")
            if name == "main":
                raise _HubError(403, None, "Cannot delete the default branch")
            del repo.branches[name]
            return _json({})
        if name in repo.branches:
            raise _HubError(409, None, f"Branch {name} already exists")
        repo.branches[name] = self._resolve(repo, payload.get("startingPoint") or "main")
        return _json({})

    def _is_lfs(self, path: str) -> bool:
        return bool(self.lfs_suffixes) and path.endswith(tuple(self.lfs_suffixes))

    def _file_ids(self, path: str, data: bytes, *, lfs_key: str) -> dict:
        """`size` and `blobId` of a file; for an LFS file the pointer's blob id and `lfs` (sha256 under `lfs_key`)."""
        if not self._is_lfs(path):
            return {"size": len(data), "blobId": git_blob_sha1(data)}
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return {"size": len(data), "blobId": git_blob_sha1(pointer),
                "lfs": {lfs_key: sha256, "size": len(data), "pointerSize": len(pointer)}}

    def _resolve_file(self, method: str, repo_type: str, repo_id: str, revision: str, filename: str,
                      headers: dict[str, str], who) -> _Response:
        repo = self._readable(repo_type, repo_id, who)
        commit_id = self._resolve(repo, revision)
        files = repo.commits[commit_id].files
        if filename not in files:
            raise _HubError(404, "EntryNotFound", f"{filename} does not exist on {revision}",
                            headers={"X-Repo-Commit": commit_id})
        original = files[filename]
        served = self._tampered.get((repo_type, repo_id, filename), original)
        etag = hashlib.sha256(original).hexdigest() if self._is_lfs(filename) else git_blob_sha1(original)
        out = {"X-Repo-Commit": commit_id, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
        if method == "HEAD":
            return _Response(200, served, out, head_length=len(original))
        range_header = headers.get("range")
        if range_header:
            span = _parse_range(range_header, len(served))
            if span is None:
                out["Content-Range"] = f"bytes */{len(served)}"
                return _Response(416, b"", out)
            start, end = span
            out["Content-Range"] = f"bytes {start}-{end}/{len(served)}"
            return _Response(206, served[start:end + 1], out)
        return _Response(200, served, out)


# ----------------------------------------------------------------------------------------- helpers


def _json(obj, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


def _load_json(body: bytes) -> dict:
    try:
        return json.loads(body or b"{}")
    except ValueError:
        raise _HubError(400, None, "request body is not JSON") from None


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """`bytes=N-`, `bytes=N-M` or `bytes=-K` -> inclusive (start, end); None when unsatisfiable."""
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if first == "":
        if not last.isdigit() or int(last) == 0:
            return None
        return max(size - int(last), 0), size - 1
    if not first.isdigit() or int(first) >= size:
        return None
    end = min(int(last), size - 1) if last.isdigit() else size - 1
    return (int(first), end) if end >= int(first) else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 30  # an idle connection is dropped after this many seconds

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms a request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        with hub._lock:
            hub._connections.add(self.connection)

    def finish(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        with hub._lock:
            hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence the default stderr log
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._read_body()  # always read it, or the next request on this connection is garbage
        headers = {name.lower(): value for name, value in self.headers.items()}
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        response = hub._handle(self.command, self.path, headers, body)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        length = response.head_length if self.command == "HEAD" and response.head_length is not None \
            else len(response.body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve


# ------------------------------------------------------------------------- client-side environment


class HubEnv:
    """What `hub_env` / `hub_environment` give a test: the server and how the client is pointed at it."""

    def __init__(self, server: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch):
        self.server = server
        self.endpoint = server.endpoint
        self.token = server.token
        self.hf_home = Path(hf_home)
        self.cache_dir = self.hf_home / "hub"  # HF_HUB_CACHE: models--ns--name/{refs,snapshots,blobs}
        self._mp = monkeypatch

    def api(self, token: str | bool | None = None):
        """An `HfApi` on the server; `token=None` uses the test token, `token=False` sends none."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token if token is None else token)

    def set_offline(self, offline: bool = True) -> None:
        """Switch `HF_HUB_OFFLINE` (environment and `huggingface_hub.constants`) for the rest of the test."""
        from huggingface_hub import constants

        self._mp.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        self._mp.setattr(constants, "HF_HUB_OFFLINE", offline)

    def set_token(self, token: str | None) -> None:
        """Set `HF_TOKEN` (None: no token at all, as for an anonymous user)."""
        if token is None:
            self._mp.delenv("HF_TOKEN", raising=False)
        else:
            self._mp.setenv("HF_TOKEN", token)
        self.token = token


def apply_hub_environment(monkeypatch: pytest.MonkeyPatch, server: HubServer, hf_home: str | os.PathLike, *,
                          offline: bool = False, token: str | None = "default",
                          block_network: bool = True) -> HubEnv:
    """Point `huggingface_hub` at `server`, with `hf_home` as HF_HOME, via `monkeypatch` (undone after the test).

    `huggingface_hub` reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, HF_HUB_DISABLE_TELEMETRY... once, when
    `huggingface_hub.constants` is imported, and a few modules copy values at import. So this sets the
    environment variables (for subprocesses and a first import) and patches every copy already in memory.
    `token="default"` sets HF_TOKEN to the server's token; None leaves no token anywhere.
    `block_network` makes `socket.create_connection` (what the client's HTTP stack uses) refuse any
    host but 127.0.0.1, so a request that escaped to the public Hub fails at once instead of hanging.
    """
    hf_home = Path(hf_home)
    hub_cache, assets_cache, xet_cache = hf_home / "hub", hf_home / "assets", hf_home / "xet"
    token_path = hf_home / "token"
    env = {
        "HF_ENDPOINT": server.endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets_cache), "HF_XET_CACHE": str(xet_cache), "HF_TOKEN_PATH": str(token_path),
        "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                 "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", server.token if token == "default" else token)

    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._detect_agent as detect_agent
    import huggingface_hub.utils._http as http
    from huggingface_hub import constants

    patches = {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HOME": str(hf_home),
        "default_cache_path": str(hub_cache), "default_assets_cache_path": str(assets_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache), "HUGGINGFACE_ASSETS_CACHE": str(assets_cache),
        "HF_HUB_CACHE": str(hub_cache), "HF_ASSETS_CACHE": str(assets_cache), "HF_XET_CACHE": str(xet_cache),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_TOKEN_PATH": str(token_path), "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value, raising=False)  # raising=False: names vary across versions
    # Copies taken at import time elsewhere in huggingface_hub:
    monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)  # module-level HfApi behind `create_repo` etc.
    if hasattr(http, "_HUB_ORIGINS") and hasattr(http, "_url_origin"):  # origins trusted with the auth header
        monkeypatch.setattr(http, "_HUB_ORIGINS", frozenset(http._HUB_ORIGINS | {http._url_origin(server.endpoint)}))
    for module_name, attr, value in (("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(hub_cache)),
                                     ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(assets_cache)),
                                     ("huggingface_hub.utils._git_credential", "ENDPOINT", server.endpoint)):
        module = __import__(module_name, fromlist=[attr])
        if hasattr(module, attr):
            monkeypatch.setattr(module, attr, value)
    # Never fetch the agent registry from the public Hub, whatever the telemetry setting.
    if hasattr(detect_agent, "_registry") and hasattr(detect_agent, "_EMPTY_REGISTRY"):
        monkeypatch.setattr(detect_agent, "_registry", detect_agent._EMPTY_REGISTRY)
    if block_network:  # any connection but to 127.0.0.1 fails fast, as on a machine without internet
        monkeypatch.setattr(socket, "create_connection", _loopback_only(socket.create_connection))
    # The client keeps one pooled HTTP session per process: drop connections made for another server.
    http.close_session()
    assert urlsplit(constants.ENDPOINT).hostname == "127.0.0.1"
    return HubEnv(server, hf_home, monkeypatch)


def _loopback_only(create_connection):
    def guarded(address, *args, **kwargs):
        if address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test hub environment: no connection to {address[0]}:{address[1]} (127.0.0.1 only)")
        return create_connection(address, *args, **kwargs)

    return guarded


@contextlib.contextmanager
def hub_environment(server: HubServer, hf_home: str | os.PathLike, *, offline: bool = False,
                    token: str | None = "default", block_network: bool = True):
    """`apply_hub_environment` as a context manager, for code that has no `monkeypatch` fixture."""
    with pytest.MonkeyPatch.context() as mp:
        try:
            yield apply_hub_environment(mp, server, hf_home, offline=offline, token=token,
                                        block_network=block_network)
        finally:
            from huggingface_hub.utils._http import close_session

            close_session()


# -------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def hub_server():
    """A fresh, started `HubServer` for one test; stopped (and its thread joined) afterwards."""
    server = HubServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_env(hub_server, tmp_path, monkeypatch):
    """`huggingface_hub` pointed at `hub_server`, with HF_HOME in tmp_path and HF_TOKEN = the test token."""
    env = apply_hub_environment(monkeypatch, hub_server, tmp_path / "hf-home")
    yield env
    from huggingface_hub.utils._http import close_session

    close_session()
