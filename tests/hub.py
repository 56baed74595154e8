"""A stand-in for the Hugging Face Hub on 127.0.0.1: the part of its HTTP API that file downloads use.

    GET  /api/models/{repo}/revision/{rev}          the repository at a revision (its commit sha)
    GET  /api/models/{repo}/tree/{rev}[/{folder}]   its files: size, git blob id, LFS sha256
    HEAD /{repo}/resolve/{rev}/{path}               a file's commit, etag and size headers
    GET  /{repo}/resolve/{rev}/{path}               the file, with Range requests for resuming

Point huggingface_hub at it with HF_ENDPOINT. Faults make it misbehave on purpose, per file: `cut` sends that
many bytes of the first GET then drops the connection; `stall` sends that many bytes then waits `stall_s`
seconds; `fail` answers 500; `corrupt` flips a byte of every GET (or only of the first, `corrupt_once`); a
repository in `gated` answers 401 the Hub's way unless the request has `token`. `requests` records every
request: method, path and headers.
"""
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Set

LFS = (".bin", ".model", ".pth", ".safetensors")  # the extensions stored in LFS here


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repos: Dict[str, Dict[str, bytes]], gated: Set[str] = frozenset(), token: str = "hf_good"):
        self.repos = repos
        self.gated, self.token = set(gated), token
        self.faults: Dict[str, dict] = {}  # "repo/path" -> {"cut": n} | {"stall": n, "stall_s": s} | {"corrupt": True}
        self.requests: List[dict] = []
        self._lock = threading.Lock()
        self._gets: Dict[str, int] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def gets(self, repo: str, path: str) -> int:
        """How many GETs of a file the hub has answered."""
        return self._gets.get(f"{repo}/{path}", 0)

    def ranges(self, repo: str, path: str) -> List[Optional[str]]:
        """The Range header of each GET of a file (None: from its start)."""
        route = re.compile(rf"/{re.escape(repo)}/resolve/[^/]+/{re.escape(path)}")
        return [r["headers"].get("range") for r in self.requests if r["method"] == "GET" and route.fullmatch(r["path"])]

    # Answers.

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = h.path.split("?")[0]
        with self._lock:
            self.requests.append({"method": h.command, "path": path,
                                  "headers": {k.lower(): v for k, v in h.headers.items()}})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._json(h, self._repo(h, m.group(1)) and {
                "id": m.group(1), "sha": self.commit(m.group(1)), "private": False,
                "siblings": [{"rfilename": p} for p in sorted(self.repos[m.group(1)])]})
        m = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            return self._json(h, self._repo(h, m.group(1)) and self._tree(m.group(1), m.group(3) or "",
                                                                          "recursive=true" in h.path.lower()))
        m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(h, m.group(1), m.group(3), head)
        self._error(h, 404, "RepoNotFound", "no such route")

    def _repo(self, h, repo: str) -> bool:
        if repo not in self.repos:
            self._error(h, 401, "RepoNotFound", f"Repository Not Found for url: {h.path}")
            return False
        if repo in self.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
            self._error(h, 401, "GatedRepo", f"Access to model {repo} is restricted. You must have access to it "
                                             "and be authenticated to access it. Please log in.")
            return False
        return True

    def _tree(self, repo: str, folder: str, recursive: bool) -> list:
        prefix = folder.rstrip("/") + "/" if folder else ""
        out, folders = [], set()
        for p, data in sorted(self.repos[repo].items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
            if p.endswith(LFS):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        return out

    def _file(self, h, repo: str, path: str, head: bool) -> None:
        if not self._repo(h, repo):
            return
        data = self.repos[repo].get(path)
        if data is None:
            return self._error(h, 404, "EntryNotFound", f"{path} does not exist")
        key = f"{repo}/{path}"
        lfs = path.endswith(LFS)
        headers = {"X-Repo-Commit": self.commit(repo), "ETag": f'"{git_blob_sha1(data)}"',
                   "Content-Type": "application/octet-stream"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        if head:
            h.send_response(200)
            for k, v in {**headers, "Content-Length": str(len(data))}.items():
                h.send_header(k, v)
            h.end_headers()
            return
        with self._lock:
            n = self._gets[key] = self._gets.get(key, 0) + 1
        fault = self.faults.get(key, {})
        if fault.get("fail"):  # the server errs on this file, every time
            return self._error(h, 500, "InternalError", "the storage backend failed")
        if fault.get("corrupt") or (fault.get("corrupt_once") and n == 1):
            data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if m and int(m.group(1)) < len(data):
            start = int(m.group(1))
            h.send_response(206)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        else:
            h.send_response(200)
        body = data[start:]
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        if n == 1 and "cut" in fault:  # the connection drops mid-file
            h.wfile.write(body[:fault["cut"]])
            h.wfile.flush()
            h.close_connection = True
            return
        if n == 1 and "stall" in fault:  # the server goes silent mid-file, longer than the client waits
            h.wfile.write(body[:fault["stall"]])
            h.wfile.flush()
            time.sleep(fault["stall_s"])
            h.close_connection = True
            return
        h.wfile.write(body)

    def _json(self, h, obj) -> None:
        if obj is False:
            return
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _error(self, h, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
