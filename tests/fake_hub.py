"""A minimal stand-in for the Hugging Face hub on 127.0.0.1, serving a local directory.

It answers the requests huggingface_hub makes to resolve a dataset revision and to read files
through HfFileSystem (repo info, paths-info, tree, resolve with HTTP ranges), so the hub code
path of a source runs for real, offline. Point HF_ENDPOINT at `url` in a subprocess.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote

FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.requests: list[str] = []
        # bytes of file content sent per (repo file, Authorization header) of GET requests: which
        # client read what and how much (tests give each client its own HF_TOKEN)
        self.sent: dict[tuple[str, str | None], int] = {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _repo(self, name):
                root = hub.repos.get(name)
                if root is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                return root

            def _entry(self, root: Path, rel: str) -> dict:
                path = root / rel
                if path.is_dir():
                    return {"type": "directory", "path": rel, "oid": "d" * 40}
                return {"type": "file", "path": rel, "size": path.stat().st_size, "oid": "f" * 40}

            def do_GET(self):  # noqa: N802
                hub.requests.append(self.path)
                path = unquote(self.path.split("?", 1)[0])
                if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^/]+)", path):
                    root = self._repo(m.group(1))
                    if root is not None:
                        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
                        self._json({"id": m.group(1), "sha": FAKE_SHA, "private": False,
                                    "siblings": [{"rfilename": f} for f in files]})
                elif m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)/?(.*)", path):
                    root = self._repo(m.group(1))
                    if root is not None:
                        base = root / m.group(3)
                        if not base.is_dir():
                            self._json({"error": "not found"}, 404)
                        else:
                            self._json([self._entry(root, str(p.relative_to(root))) for p in sorted(base.iterdir())])
                elif m := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    root = self._repo(m.group(1))
                    if root is not None:
                        sent = self._serve_file(root / m.group(3))
                        if self.command == "GET":
                            who = (m.group(3), self.headers.get("Authorization"))
                            hub.sent[who] = hub.sent.get(who, 0) + sent
                else:
                    self._json({"error": f"unknown path {path}"}, 404)

            def do_HEAD(self):  # noqa: N802
                self.do_GET()

            def do_POST(self):  # noqa: N802
                hub.requests.append(self.path)
                path = unquote(self.path)
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length).decode()
                if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path):
                    root = self._repo(m.group(1))
                    if root is None:
                        return
                    if self.headers.get("Content-Type", "").startswith("application/json"):
                        paths = json.loads(body).get("paths", [])
                    else:
                        paths = parse_qs(body).get("paths", [])
                    self._json([self._entry(root, p) for p in paths if (root / p).exists()])
                else:
                    self._json({"error": f"unknown path {path}"}, 404)

            def _serve_file(self, file: Path) -> int:
                """Answer with the file (or the requested range); return the content bytes sent."""
                if not file.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return 0
                data = file.read_bytes()
                start, end = 0, len(data) - 1
                status = 200
                if rng := self.headers.get("Range"):
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return 0
                    status = 206
                chunk = data[start : end + 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"etag"')
                self.send_header("X-Repo-Commit", FAKE_SHA)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return 0
                self.wfile.write(chunk)
                return len(chunk)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def hub_env(url: str, home: Path) -> dict:
    """Environment for a subprocess that talks to the fake hub, with no token and no cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1")
    return env
