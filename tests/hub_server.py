"""A real local HTTP server that speaks the slice of the Hugging Face hub protocol huggingface_hub 2.4 uses
for `snapshot_download`: repo info (`/api/models/{repo}/revision/{rev}`), the tree listing
(`/api/models/{repo}/tree/{rev}`), and HEAD/GET on `/{repo}/resolve/{rev}/{file}` with ETag, X-Repo-Commit,
X-Linked-Size and Range → 206. It serves folders from disk, knows nothing about adapmoe, and records every
request so tests can assert what was fetched and how many bytes went out."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None
    bytes_sent: int = 0


@dataclass
class Repo:
    folder: Path
    token: str | None = None  # gated: this bearer token is required


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_off: set[str] = field(default_factory=set)  # "repo/file": first GET sends half the bytes, then closes
    broken: set[str] = field(default_factory=set)  # "repo/file": every GET sends half the bytes, then closes
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def files(self, repo_id: str) -> list[str]:
        """Paths of every HEAD or GET on a file of `repo_id`."""
        return [r.path for r in self.requests if "/resolve/" in r.path and r.path.startswith(f"/{repo_id}/")]


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    # -- helpers
    def _record(self) -> Request:
        req = Request(self.command, unquote(urlsplit(self.path).path), self.headers.get("Range"),
                      self.headers.get("Authorization"))
        with self.server.state.lock:
            self.server.state.requests.append(req)
        return req

    def _error(self, status: int, code: str | None, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj: object, head: bool) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _authorize(self, repo_id: str, head: bool) -> Repo | None:
        state = self.server.state
        auth = self.headers.get("Authorization")
        if auth is not None and auth != "Bearer " + "good-token":
            self._error(401, None, "Invalid credentials in Authorization header", head)
            return None
        repo = state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head)
            return None
        if repo.token is not None and auth != f"Bearer {repo.token}":
            # What the hub sends for a gated repo without (accepted) access.
            self._error(401, "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                        head)
            return None
        return repo

    def _handle(self, head: bool) -> None:
        req = self._record()
        parts = req.path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id = "/".join(parts[2:4])
            repo = self._authorize(repo_id, head)
            if repo is None:
                return
            files = sorted(p.relative_to(repo.folder).as_posix() for p in repo.folder.rglob("*") if p.is_file())
            if parts[4] == "revision":
                self._json({"id": repo_id, "sha": COMMIT, "private": False,
                            "gated": "manual" if repo.token else False,
                            "siblings": [{"rfilename": f} for f in files]}, head)
            else:
                self._json([{"type": "file", "path": f, "size": (repo.folder / f).stat().st_size,
                             "oid": _etag(repo.folder / f)[:40]} for f in files], head)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
            repo = self._authorize(repo_id, head)
            if repo is None:
                return
            self._file(repo, repo_id, filename, req, head)
            return
        self._error(404, None, "not found", head)

    def _file(self, repo: Repo, repo_id: str, filename: str, req: Request, head: bool) -> None:
        path = repo.folder / filename
        if not path.is_file():
            self._error(404, "EntryNotFound", f"{filename} does not exist", head)
            return
        data = path.read_bytes()
        start = 0
        status = 200
        if req.range and req.range.startswith("bytes="):
            start = int(req.range[len("bytes="):].split("-")[0])
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{_etag(path)}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        key = f"{repo_id}/{filename}"
        cut = not head and (key in self.server.state.cut_off or key in self.server.state.broken)
        if cut:
            self.server.state.cut_off.discard(key)
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        if cut:
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()
        req.bytes_sent = len(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """`with HubServer() as hub: hub.add(repo_id, folder); env HF_ENDPOINT=hub.url`."""

    def __init__(self) -> None:
        self.state = HubState()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo_id: str, folder: Path, token: str | None = None) -> None:
        self.state.repos[repo_id] = Repo(folder, token)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
