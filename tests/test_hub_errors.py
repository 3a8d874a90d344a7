"""Hub failures give one actionable line within seconds, never a traceback.

A local HTTP server on 127.0.0.1 stands in for the hub (HF_ENDPOINT points at it) and answers
the repo-info request the way the hub does for a gated repo, a missing or private repo, a bad
revision and a server error; a closed port stands in for an unreachable hub.
"""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest


class _FakeHub(http.server.BaseHTTPRequestHandler):
    mode = "gated"

    def do_GET(self):  # noqa: N802 (http.server API)
        status, code = {"gated": (403, "GatedRepo"), "missing": (401, "RepoNotFound"),
                        "revision": (404, "RevisionNotFound"), "broken": (500, None)}[self.server.mode]
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        body = b'{"error": "nope"}'
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def _run(endpoint: str, tmp_path, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra_env or {})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "shardify", "imagenet", "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("mode,expected", [
    ("gated", "is gated and your account has no access yet: accept its terms at"),
    ("missing", "no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN"),
    ("revision", "has no revision 'main'"),
    ("broken", "the hub answered HTTP 500"),
])
def test_hub_refusals_are_one_line(fake_hub, tmp_path, mode, expected):
    fake_hub.mode = mode
    proc, elapsed = _run(f"http://127.0.0.1:{fake_hub.server_address[1]}", tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert elapsed < 30


def test_with_a_token_the_missing_repo_message_changes(fake_hub, tmp_path):
    fake_hub.mode = "missing"
    proc, _ = _run(f"http://127.0.0.1:{fake_hub.server_address[1]}", tmp_path, {"HF_TOKEN": "hf_fake"})
    assert "your token cannot see it" in proc.stderr


def test_unreachable_hub(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, elapsed = _run(f"http://127.0.0.1:{port}", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot reach the hub at") and "--source DIR" in proc.stderr
    assert "Traceback" not in proc.stderr and elapsed < 30


def test_offline_mode(tmp_path):
    proc, _ = _run("http://127.0.0.1:9", tmp_path, {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "offline mode is on (HF_HUB_OFFLINE=1)" in proc.stderr
