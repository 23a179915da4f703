"""A local HTTP server that speaks the Hugging Face Hub's file-resolve protocol, for tests.

Serves ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{filename}`` from in-memory repos with the
headers huggingface_hub needs (``X-Repo-Commit``, ``ETag``, ``Content-Length``; errors carry
``X-Error-Code`` as the Hub does), counts requests, and can serve a truncated body.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    commit: str
    files: dict[str, bytes] = field(default_factory=dict)
    branches: tuple[str, ...] = ("main",)


class HubServer:
    """Start with :meth:`start`; ``url`` is the endpoint to give huggingface_hub (``HF_ENDPOINT``)."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, filename) -> count
        self.truncate: dict[str, int] = {}  # filename -> bytes actually sent on GET
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- content ------------------------------------------------------------------------------
    def add_file(self, repo_id: str, filename: str, data: bytes, commit: str | None = None) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
            repo = self.repos[repo_id] = FakeRepo(commit=commit)
        repo.files[filename] = data

    def gets(self, filename: str | None = None) -> int:
        """Number of GET requests (for one file, or all)."""
        return sum(
            n for (m, f), n in self.requests.items() if m == "GET" and (filename is None or f == filename)
        )

    # ---- server -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _error(self, code: int, error_code: str, message: str, commit: str | None = None) -> None:
                body = message.encode()
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", message)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _serve(self) -> None:
                path = unquote(urlsplit(self.path).path)
                parts = path.strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound", f"unknown path {path}")
                repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                hub.requests[(self.command, filename)] += 1
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                if revision not in repo.branches and revision != repo.commit:
                    return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
                data = repo.files.get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", f"Entry {filename} not found", repo.commit)
                body = data
                if self.command == "GET" and filename in hub.truncate:
                    body = data[: hub.truncate[filename]]
                self.send_response(200)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) if self.command == "HEAD" else len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            do_GET = _serve
            do_HEAD = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
