"""A Hub-shaped HTTP server on 127.0.0.1, for tests that must not reach the network.

It answers the routes huggingface_hub 2.4.0 calls for what the tools do: model info (with
file sizes), file download (`resolve/{rev}/{file}`, HEAD and GET, with Range), and pushing
(create repo, validate-yaml, preupload, commit). Every request is recorded in ``requests``
as ``(method, path, range header or None)``, so a test can assert what was (not) fetched.

Usage::

    with HubServer() as hub:
        hub.add_repo("org/tiny", model_dir)          # main -> a commit of that directory
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> path -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    private: bool = False


def _commit_sha(files: dict[str, bytes], parent: str = "") -> str:
    digest = hashlib.sha1(parent.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
    return digest.hexdigest()


def directory_files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by its repo path (``sub/dir/name``)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-request (a killed or cancelled download) is normal here: the
    base class would print its traceback into the output the tests inspect."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HubServer:
    """A threaded HTTP server holding repositories in memory."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        # (method, path) -> number of 503 answers still to give before serving it (provokes retries)
        self.fail_next: dict[tuple[str, str], int] = {}
        self.refuse_writes = False  # answer every POST with 403 (a token without write access)
        # path -> event a GET of that file waits for (at most gate_timeout seconds) before it is served;
        # gate_timed_out lists the paths served because the wait ran out instead.
        self.gates: dict[str, threading.Event] = {}
        self.gate_timeout = 60.0
        self.gate_timed_out: list[str] = []
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_repo(
        self, repo_id: str, source: Path | dict[str, bytes], *, branch: str = "main", private: bool = False
    ) -> str:
        """Commit ``source`` (a directory or path -> bytes) as the head of ``branch``; returns the sha."""
        files = directory_files(source) if isinstance(source, Path) else dict(source)
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        sha = _commit_sha(files, repo.refs.get(branch, ""))
        repo.commits[sha] = files
        repo.refs[branch] = sha
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]

    def gets(self, suffix: str = "") -> list[tuple[str, str | None]]:
        """(path, range) of every GET of a file whose path ends with ``suffix``."""
        return [(p, r) for m, p, r in self.requests if m == "GET" and "/resolve/" in p and p.endswith(suffix)]

    def full_downloads(self, suffix: str = ".safetensors") -> list[str]:
        """Paths of GETs that fetched a whole file (no Range header) ending with ``suffix``."""
        return [p for p, r in self.gets(suffix) if r is None]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _record(self) -> str:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((self.command, path, self.headers.get("Range")))
            left = self.hub.fail_next.get((self.command, path), 0)
            if left:
                self.hub.fail_next[(self.command, path)] = left - 1
        if left:
            self._json(503, {"error": "try again"})
            return ""
        return path

    def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status >= 400:
            self.send_header("X-Error-Message", str(body.get("error", "")) if isinstance(body, dict) else "")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_found(self, what: str, code: str = "RepoNotFound") -> None:
        self._json(404, {"error": what}, {"X-Error-Code": code})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _commit_of(self, repo_id: str, rev: str | None) -> tuple[Repo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._not_found(f"Repository {repo_id} not found")
            return None
        rev = unquote(rev or "main")
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            self._not_found(f"Invalid rev id: {rev}", "RevisionNotFound")
            return None
        return repo, sha

    # -- reading --------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self._record()
        if not path:
            return
        if match := _INFO.match(path):
            found = self._commit_of(match["repo"], match["rev"])
            if found:
                repo, sha = found
                files = repo.commits[sha]
                siblings = [
                    {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()
                ]
                body = {"id": match["repo"], "modelId": match["repo"], "sha": sha, "private": repo.private}
                self._json(200, {**body, "siblings": siblings})
            return
        if match := _RESOLVE.match(path):
            gate = self.hub.gates.get(path) if self.command == "GET" and not self.headers.get("Range") else None
            if gate is not None and not gate.wait(self.hub.gate_timeout):
                self.hub.gate_timed_out.append(path)
            found = self._commit_of(match["repo"], match["rev"])
            if found:
                self._serve_file(found[0].commits[found[1]], found[1], match["file"])
            return
        self._not_found(f"no route {path}", "EntryNotFound")

    def _serve_file(self, files: dict[str, bytes], sha: str, name: str) -> None:
        data = files.get(name)
        if data is None:
            self._json(404, {"error": f"{name} not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
            return
        etag = hashlib.sha256(data).hexdigest()
        start, stop = 0, len(data)
        status = 200
        if wanted := self.headers.get("Range"):
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if match:
                start = int(match[1])
                stop = min(len(data), int(match[2]) + 1) if match[2] else len(data)
                status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", sha)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data[start:stop])

    # -- pushing --------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = self._record()
        if not path:
            return
        body = self._body()
        if self.hub.refuse_writes:
            self._json(403, {"error": "You don't have the rights to create a model under this namespace"})
            return
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = "/".join(filter(None, [request.get("organization"), request["name"]]))
            if repo_id in self.hub.repos:
                self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
                return
            private = request.get("visibility") == "private" or bool(request.get("private"))
            self.hub.repos[repo_id] = Repo(private=private)
            self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
            return
        if path == "/api/validate-yaml":
            self._json(200, {"errors": [], "warnings": []})
            return
        if match := _PREUPLOAD.match(path):
            if match["repo"] not in self.hub.repos:
                self._not_found(f"Repository {match['repo']} not found")
                return
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            self._json(200, {"files": modes})
            return
        if match := _COMMIT.match(path):
            self._commit(match["repo"], unquote(match["rev"]), body)
            return
        self._not_found(f"no route {path}", "EntryNotFound")

    def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._not_found(f"Repository {repo_id} not found")
            return
        parent = repo.refs.get(branch)
        files = dict(repo.commits[parent]) if parent else {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                self._json(400, {"error": f"unsupported commit operation {item['key']}"})
                return
        sha = _commit_sha(files, parent or "")
        repo.commits[sha] = files
        repo.refs[branch] = sha
        self._json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})
