"""A small Hugging Face Hub on loopback, for tests: huggingface.co is unreachable from CI.

Standard library only. It speaks the part of the Hub's HTTP API that huggingface_hub 2.x and transformers 5.x
call for `create_repo`, `upload_folder` / `create_commit` (regular and classic-LFS uploads), `create_branch`,
`push_to_hub`, `hf_hub_download` / `from_pretrained` and `ModelCard.load` (endpoints listed in
../shared/docs/hf-stack-notes.md). Repositories live in memory: each commit stores the full file set, branches
point at commits, so `revision=` (branch or commit id) reads exactly what was pushed there.

- Uploads: `upload_mode="regular"` answers every preupload with "regular" (contents travel base64 inside the
  commit); `upload_mode="lfs"` sends binary files (weights, images) through the LFS batch API + PUT, as the Hub
  does for files its .gitattributes marks as LFS. Clients must run with `HF_HUB_DISABLE_XET=1` for LFS: this
  server speaks no xet.
- Auth: requests carrying a wrong token get 401; writes without a token get 401.
- Failure injection: `server.fail_next["commit"] = 1` makes the next commit answer HTTP 500 (also "preupload",
  "lfs_batch", "lfs_put", "resolve").

Usage:
    with HubServer(upload_mode="lfs") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, ...}   # set BEFORE huggingface_hub is imported
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".npy", ".parquet", ".arrow")
COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: its bytes, and whether it is stored as an LFS object."""

    content: bytes
    lfs: bool

    @property
    def sha1(self) -> str:
        return git_blob_sha1(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.sha1

    @property
    def oid(self) -> str:
        """The oid preupload compares with the client's (sha256 for LFS files, git sha1 otherwise)."""
        return self.sha256 if self.lfs else self.sha1


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a commit id -> the commit (None if unknown)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision) if COMMIT_ID.match(revision) else None


class HttpError(Exception):
    """Raised inside a handler: becomes a JSON error response with the Hub's X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """The in-memory Hub and its HTTP server (a daemon thread on 127.0.0.1, port chosen by the OS)."""

    def __init__(self, token: str = "hf_loopbackTestToken0123456789", upload_mode: str = "regular"):
        if upload_mode not in ("regular", "lfs"):
            raise ValueError("upload_mode must be 'regular' or 'lfs'")
        self.token = token
        self.upload_mode = upload_mode
        self.user = "tester"
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.fail_next: dict[str, int] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # --- state helpers (also used by tests to inspect what was pushed) -----------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        """The files of a repository at a branch or commit."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}: no such revision")
        return dict(commit.files)

    def head(self, repo_id: str, revision: str = "main") -> str:
        """The commit id a branch points at."""
        return self.repos[repo_id].branches[revision]

    def history(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """Commits reachable from a revision, newest first."""
        repo = self.repos[repo_id]
        commit, out = repo.resolve(revision), []
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, StoredFile]) -> Commit:
        self._counter += 1
        seed = f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}\n" + "\n".join(
            f"{path}:{stored.etag}" for path, stored in sorted(files.items())
        )
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, message, files)
        repo.commits[commit.oid] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """A new repository whose `main` holds `.gitattributes`, as on the Hub."""
        repo = Repo(repo_id, private)
        first = self._new_commit(repo, None, "initial commit", {".gitattributes": StoredFile(GITATTRIBUTES, False)})
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return repo

    def take_failure(self, name: str) -> bool:
        """True (and one fewer left) when a failure is armed for this endpoint."""
        with self.lock:
            left = self.fail_next.get(name, 0)
            if left > 0:
                self.fail_next[name] = left - 1
                return True
            return False


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes requests to the Hub endpoints; one instance per request."""

    hub: HubServer  # set on the subclass bound to a server
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response carries Content-Length

    # --- plumbing ----------------------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # noqa: A002  (BaseHTTPRequestHandler's signature)
        pass  # the record of requests is `hub.requests`; nothing is printed (tokens never reach a log)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        # Split before unquoting: a revision such as "refs%2Fpr%2F1" is one segment.
        self.segments = [unquote(part) for part in split.path.split("/")[1:]]
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        self.body = self._read_body()
        status = 500
        try:
            status = self._route(method)
        except HttpError as err:
            status = err.status
            self._send_json({"error": err.message}, err.status, error_code=err.code, error_message=err.message)
        finally:
            with self.hub.lock:
                self.hub.requests.append((method, split.path, status))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, content_type: str = "") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, error_code: str | None = None, error_message: str | None = None):
        headers = {}
        if error_code:
            headers["X-Error-Code"] = error_code
        if error_message:
            headers["X-Error-Message"] = error_message
        self._send(status, json.dumps(payload).encode(), headers, "application/json")
        return status

    def _json_body(self):
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError:
            raise HttpError(400, "request body is not JSON") from None

    # --- auth --------------------------------------------------------------------------------------------
    def _token(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[7:] if header.startswith("Bearer ") else None

    def _check_auth(self, required: bool) -> bool:
        """A wrong token is always refused; `required` refuses a missing one. True when authenticated."""
        token = self._token()
        if token is not None and token != self.hub.token:
            raise HttpError(401, "Invalid credentials in Authorization header")
        if token is None and required:
            raise HttpError(401, "You must be authenticated to access this endpoint")
        return token is not None

    def _repo(self, namespace: str, name: str, write: bool = False) -> Repo:
        authenticated = self._check_auth(required=write)
        repo = self.hub.repos.get(f"{namespace}/{name}")
        if repo is None or (repo.private and not authenticated):
            raise HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _fail_if_armed(self, name: str) -> None:
        if self.hub.take_failure(name):
            raise HttpError(500, f"Internal Error - injected failure on {name}")

    # --- routing -----------------------------------------------------------------------------------------
    def _route(self, method: str) -> int:
        s = self.segments
        if s[:1] == ["api"]:
            return self._route_api(method, s[1:])
        if len(s) >= 2 and s[0] == "_lfs" and method == "PUT":
            return self._lfs_put(s[1])
        if len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(s[0], s[1][: -len(".git")])
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(s[0], s[1], s[3], "/".join(s[4:]))
        raise HttpError(404, f"no route for {method} {self.path}")

    def _route_api(self, method: str, s: list[str]) -> int:
        if s == ["whoami-v2"] and method == "GET":
            self._check_auth(required=True)
            user = {"type": "user", "name": self.hub.user, "fullname": "Loopback Tester", "orgs": []}
            user["auth"] = {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}
            return self._send_json(user)
        if s == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if s == ["validate-yaml"] and method == "POST":
            self._check_auth(required=False)
            return self._send_json({"errors": [], "warnings": []})
        if len(s) < 3 or s[0] != "models":
            raise HttpError(404, f"no route for {method} /api/{'/'.join(s)}")
        namespace, name, rest = s[1], s[2], s[3:]
        if method == "GET" and (not rest or rest[0] == "revision"):
            return self._model_info(namespace, name, "/".join(rest[1:]) or "main")
        if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            return self._tree(namespace, name, rest[1], "/".join(rest[2:]))
        if method == "GET" and rest == ["refs"]:
            repo = self._repo(namespace, name)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
            return self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "GET" and rest[:1] == ["commits"] and len(rest) == 2:
            repo = self._repo(namespace, name)
            self._commit(repo, rest[1])
            commits = [
                {"id": c.oid, "title": c.message, "message": "", "authors": [{"user": self.hub.user}], "date": ""}
                for c in self.hub.history(repo.repo_id, rest[1])
            ]
            return self._send_json(commits)
        if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
            return self._preupload(namespace, name, rest[1])
        if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
            return self._commit_files(namespace, name, rest[1])
        if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
            return self._create_branch(namespace, name, rest[1])
        raise HttpError(404, f"no route for {method} /api/{'/'.join(s)}")

    # --- repositories ------------------------------------------------------------------------------------
    def _create_repo(self) -> int:
        self._check_auth(required=True)
        payload = self._json_body()
        if payload.get("type", "model") not in (None, "model"):
            raise HttpError(400, "this loopback Hub stores model repositories only")
        name = payload.get("name") or ""
        namespace = payload.get("organization") or self.hub.user
        repo_id = f"{namespace}/{name}"
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise HttpError(400, f"invalid repo id {repo_id!r}")
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send_json({"error": "You already created this model repo", "url": url}, 409)
            self.hub.create_repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        return self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _model_info(self, namespace: str, name: str, revision: str) -> int:
        repo = self._repo(namespace, name)
        commit = self._commit(repo, revision)
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": len(stored.content), "blobId": stored.sha1}
            if stored.lfs:
                sibling["lfs"] = {"size": len(stored.content), "sha256": stored.sha256, "pointerSize": 134}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": None,
            "siblings": siblings,
        }
        return self._send_json(info)

    def _tree(self, namespace: str, name: str, revision: str, folder: str) -> int:
        repo = self._repo(namespace, name)
        commit = self._commit(repo, revision)
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, stored in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                sub = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(sub, {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest()})
                    entries[sub].update(path=sub, size=0)
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": stored.sha1, "size": len(stored.content), "path": path}
                if stored.lfs:
                    entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": 134}
                entries[path] = entry
        if prefix and not entries:
            raise HttpError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        return self._send_json(list(entries.values()))

    def _create_branch(self, namespace: str, name: str, branch: str) -> int:
        repo = self._repo(namespace, name, write=True)
        start = self._json_body().get("startingPoint") or "main"
        with self.hub.lock:
            if branch in repo.branches:
                raise HttpError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = self._commit(repo, start).oid
        return self._send_json({})

    # --- uploads -----------------------------------------------------------------------------------------
    def _upload_mode(self, path: str, size: int) -> str:
        if self.hub.upload_mode == "lfs" and (path.endswith(LFS_SUFFIXES) or size > 10 * 2**20):
            return "lfs"
        return "regular"

    def _preupload(self, namespace: str, name: str, revision: str) -> int:
        repo = self._repo(namespace, name, write=True)
        self._fail_if_armed("preupload")
        commit = self._commit(repo, revision)  # as on the Hub: a branch must exist before pushing to it
        files = commit.files
        answer = []
        for entry in self._json_body().get("files", []):
            mode = self._upload_mode(entry["path"], int(entry.get("size", 0)))
            existing = files.get(entry["path"])
            oid = existing.oid if existing is not None and existing.lfs == (mode == "lfs") else None
            answer.append({"path": entry["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._send_json({"files": answer, "commitOid": commit.oid})

    def _lfs_batch(self, namespace: str, name: str) -> int:
        self._repo(namespace, name, write=True)
        self._fail_if_armed("lfs_batch")
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HttpError(400, "this loopback Hub accepts LFS uploads only (downloads go through /resolve)")
        objects = []
        for obj in payload.get("objects", []):
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:  # already stored: no action, the client skips the upload
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}", "expires_in": 3600}}
            objects.append(answer)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, content_type="application/vnd.git-lfs+json")
        return 200

    def _lfs_put(self, oid: str) -> int:
        # Like a presigned storage URL: no Authorization header is sent or needed.
        self._fail_if_armed("lfs_put")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HttpError(400, f"uploaded content does not match sha256 {oid}")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = self.body
        self._send(200, b"")
        return 200

    def _commit_files(self, namespace: str, name: str, revision: str) -> int:
        repo = self._repo(namespace, name, write=True)
        self._fail_if_armed("commit")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "a commit starts with a header line")
        header = lines[0]["value"]
        with self.hub.lock:
            if revision not in repo.branches:
                raise HttpError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            parent = repo.commits[repo.branches[revision]]
            if header.get("parentCommit") and header["parentCommit"] != parent.oid:
                raise HttpError(412, "parentCommit is not the head of the branch")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HttpError(400, "file content must be base64")
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    content = self.hub.lfs_objects.get(value["oid"])
                    if content is None:
                        raise HttpError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = StoredFile(content, True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(folder)}
                else:
                    raise HttpError(400, f"unsupported commit operation {key!r}")
            commit = self.hub._new_commit(repo, parent.oid, header.get("summary") or "", files)
            repo.branches[revision] = commit.oid
        url = f"{self.hub.url}/{repo.repo_id}/commit/{commit.oid}"
        return self._send_json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    # --- downloads ---------------------------------------------------------------------------------------
    def _resolve(self, namespace: str, name: str, revision: str, path: str) -> int:
        repo = self._repo(namespace, name)
        commit = self._commit(repo, revision)
        stored = commit.files.get(path)
        if stored is None:
            raise HttpError(404, "Entry not found", "EntryNotFound")
        self._fail_if_armed("resolve")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.etag}"', "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.content))})
        content, status = stored.content, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and (match.group(1) or match.group(2)):
            total = len(content)
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            else:  # suffix range: the last N bytes
                start, end = max(0, total - int(match.group(2))), total - 1
            if start >= total or start > end:
                headers["Content-Range"] = f"bytes */{total}"
                self._send(416, b"", headers)
                return 416
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            content, status = content[start : end + 1], 206
        self._send(status, content, headers, "application/octet-stream")
        return status


__all__ = ["HubServer", "StoredFile", "git_blob_sha1"]
