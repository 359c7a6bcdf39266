"""TEST-ONLY in-memory stand-in for the Hugging Face Hub HTTP API, on 127.0.0.1 (stdlib only).

Not a Hub: it speaks just enough of the protocol for the real `huggingface_hub` client to create a repo, upload a
folder, and for `from_pretrained` / `snapshot_download` to read it back. Never expose it beyond a test.

    POST /api/repos/create                          409 when the repo exists (the client's exist_ok handles it)
    POST /api/validate-yaml                         always valid
    GET  /api/whoami-v2
    GET  /api/agent-harnesses                       empty registry (huggingface_hub 2.x fetches it for its user agent)
    POST /api/models/{repo}/preupload/{rev}         every file "regular" (no LFS / Xet: fine for tiny test models)
    POST /api/models/{repo}/commit/{rev}            NDJSON: header line, then file / deletedFile / deletedFolder lines
    GET  /api/models/{repo}[/revision/{rev}]        model info with siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     (?recursive=true)
    POST /api/models/{repo}/paths-info/{rev}
    HEAD/GET /{repo}/resolve/{rev}/{path}           X-Repo-Commit, ETag; 404 + X-Error-Code for missing entries

Auth: writes need `Authorization: Bearer <token>` with the token the server was made with; a wrong token is answered
401 everywhere; private repos are readable only with the token. Files live in memory per repo and commit; each commit
has a sha. Bounded: request bodies (`max_body`), socket timeouts, and a lifetime after which the server stops by itself.
The log (`server.log`) holds "METHOD /path -> status" lines only, never headers; requests that match no route are
answered 404 and recorded in `server.unknown`.
"""

import base64
import gzip
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> sha

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)

    def commit(self, branch: str, files: dict[str, bytes], summary: str) -> str:
        parent = self.branches.get(branch, "")
        digest = hashlib.sha1(parent.encode() + summary.encode() + str(time.time_ns()).encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_sha(files[path]).encode())
        sha = digest.hexdigest()
        self.commits[sha], self.branches[branch] = files, sha
        return sha


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str, *, user: str = "user", max_body: int = 64 << 20, lifetime_s: float = 300.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token, self.user, self.max_body, self.lifetime_s = token, user, max_body, lifetime_s
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.unknown: list[str] = []
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None and self._thread.is_alive():
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds per socket read: a stuck client cannot hold a thread forever

    ROUTES = [
        ("POST", re.compile(r"/api/repos/create"), "create_repo"),
        ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
        ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
        ("GET", re.compile(r"/api/agent-harnesses"), "agent_harnesses"),
        ("POST", re.compile(rf"/api/models/{REPO}/preupload/{REV}"), "preupload"),
        ("POST", re.compile(rf"/api/models/{REPO}/commit/{REV}"), "commit"),
        ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/{REV})?"), "model_info"),
        ("GET", re.compile(rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?"), "tree"),
        ("POST", re.compile(rf"/api/models/{REPO}/paths-info/{REV}"), "paths_info"),
        ("GET", re.compile(rf"/{REPO}/resolve/{REV}/(?P<path>.+)"), "resolve"),
        ("HEAD", re.compile(rf"/{REPO}/resolve/{REV}/(?P<path>.+)"), "resolve"),
    ]

    # --- plumbing ---------------------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # quiet; `server.log` has one line per request instead
        pass

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.route_path = url.path
        auth = self.headers.get("Authorization")
        self.authorized = auth == f"Bearer {self.server.token}"
        try:
            self.body = self._read_body()
            if auth is not None and not self.authorized:
                return self._error(401, "Invalid credentials in Authorization header")
            for route_method, pattern, name in self.ROUTES:
                match = pattern.fullmatch(url.path)
                if route_method == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, name)(**args)
            self.server.unknown.append(f"{method} {url.path}")
            self._error(404, f"test hub server: no route for {method} {url.path}")
        except _BodyTooLarge:
            self.close_connection = True
            self._error(413, "request body too large for the test hub server")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                total += size
                if total > self.server.max_body:
                    raise _BodyTooLarge
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > self.server.max_body:
                raise _BodyTooLarge
            body = self.rfile.read(length)
        return gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.server.log.append(f"{self.command} {self.route_path} -> {status}")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo | None:
        """The repo if this request may see it (and write to it); otherwise answers the error and returns None."""
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and not self.authorized):
            self._error(404 if self.authorized else 401, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if write and not self.authorized:
            self._error(401, "You must be authenticated to write to this repository")
            return None
        return repo

    def _snapshot(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        if (repo := self._repo(repo_id)) is None:
            return None
        if (sha := repo.resolve(rev)) is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return None
        return sha, repo.commits[sha]

    @staticmethod
    def _entries(files: dict[str, bytes], prefix: str = "", recursive: bool = False) -> list[dict]:
        entries, folders = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add("/".join(([prefix] if prefix else []) + parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_sha(files[path])})
        folders_entries = [{"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
                           for f in sorted(folders)]
        return folders_entries + entries

    # --- endpoints --------------------------------------------------------------------------------------------------
    def create_repo(self):
        if not self.authorized:
            return self._error(401, "You must be authenticated to create a repository")
        payload = json.loads(self.body or b"{}")
        if payload.get("type", "model") != "model":
            return self._error(400, "the test hub server only hosts model repos")
        repo_id = f"{payload.get('organization') or self.server.user}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        with self.server.lock:
            if repo_id in self.server.repos:
                return self._json({"error": "You already created this model repo", "url": url}, 409)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = self.server.repos[repo_id] = Repo(private=private)
            repo.commit("main", {".gitattributes": b""}, "initial commit")
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        self._json({"errors": [], "warnings": []})

    def whoami(self):
        if not self.authorized:
            return self._error(401, "Invalid credentials in Authorization header")
        self._json({"type": "user", "name": self.server.user, "orgs": [], "auth": {"type": "access_token"}})

    def agent_harnesses(self):
        self._json({"standardEnvVars": [], "harnesses": {}})

    def preupload(self, repo, rev):
        if (found := self._repo(repo, write=True)) is None:
            return
        current = found.commits.get(found.resolve(rev) or "", {})
        files = json.loads(self.body)["files"]
        self._json({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha(current[f["path"]]) if f["path"] in current else None}
            for f in files
        ]})

    def commit(self, repo, rev):
        if (found := self._repo(repo, write=True)) is None:
            return
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self.server.lock:
            head = found.branches.get(rev)
            if head is None:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            if header.get("parentCommit") not in (None, head):
                return self._error(412, "A commit has happened since the parent commit")
            files = dict(found.commits[head])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:  # lfsFile and anything newer: the preupload never asks for them
                    return self._error(400, f"test hub server: unsupported commit operation {key!r}")
            sha = found.commit(rev, files, header.get("summary", ""))
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo}/commit/{sha}"})

    def model_info(self, repo, rev="main"):
        if (snap := self._snapshot(repo, rev)) is None:
            return
        sha, files = snap
        self._json({
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "sha": sha,
            "private": self.server.repos[repo].private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p, "size": len(c), "blobId": git_blob_sha(c)} for p, c in sorted(files.items())],
        })

    def tree(self, repo, rev, path=""):
        if (snap := self._snapshot(repo, rev)) is None:
            return
        path = path.strip("/")
        if path and not any(p.startswith(path + "/") for p in snap[1]):
            return self._error(404, f"{path} does not exist on {rev}", "EntryNotFound")
        self._json(self._entries(snap[1], path, recursive=self.query.get("recursive", "").lower() in ("1", "true")))

    def paths_info(self, repo, rev):
        if (snap := self._snapshot(repo, rev)) is None:
            return
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(self.body).get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        entries = self._entries(snap[1], recursive=True)
        self._json([e for e in entries if e["path"] in set(paths)])

    def resolve(self, repo, rev, path):
        if (snap := self._snapshot(repo, rev)) is None:
            return
        sha, files = snap
        if path not in files:
            return self._error(404, "Entry not found", "EntryNotFound")
        data, status = files[path], 200
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes"}
        if (match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))) is not None:
            start, end = int(match[1]), int(match[2] or len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


class _BodyTooLarge(Exception):
    pass
