"""The launcher tests' process helper: Ray's startup timeout (and only it) is started again."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from app_process import RAY_STARTUP_TIMEOUT, start_app, stop_app
from serve_testutil import free_port

# First run: print `first_words` and exit 1. Later runs: serve `root` over HTTP, where
# health/ready is a file, so GET /health/ready answers 200.
SCRIPT = """
import sys, pathlib, http.server, functools
runs = pathlib.Path(sys.argv[1]); root = sys.argv[2]; port = int(sys.argv[3])
n = int(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text(str(n))
if n == 1:
    print(sys.argv[4], flush=True); sys.exit(1)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
http.server.HTTPServer(("127.0.0.1", port), handler).serve_forever()
"""


def launch(tmp_path: Path, first_words: str):
    (tmp_path / "root" / "health").mkdir(parents=True)
    (tmp_path / "root" / "health" / "ready").write_text("ok")
    port = free_port()
    cmd = [sys.executable, "-c", SCRIPT, str(tmp_path / "runs"), str(tmp_path / "root"),
           str(port), first_words]
    return start_app(cmd, f"http://127.0.0.1:{port}", {}, tmp_path / "app.log", tmp_path)


def test_rays_startup_timeout_is_started_again(tmp_path):
    proc = launch(tmp_path, f"Exception: The current node {RAY_STARTUP_TIMEOUT}. This ...")
    try:
        assert (tmp_path / "runs").read_text() == "2"
    finally:
        stop_app(proc, 5)
    assert proc.poll() is not None


def test_any_other_early_exit_fails_with_the_log(tmp_path):
    with pytest.raises(AssertionError, match="exited early(.|\n)*ImportError: no module"):
        launch(tmp_path, "ImportError: no module")
    assert (tmp_path / "runs").read_text() == "1"
