"""`vishwamai-edge profile` argument errors: one line on stderr, exit code 2, no model loaded."""

from __future__ import annotations

import subprocess
import sys


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", "profile", *args],
                              capture_output=True, text=True, timeout=120)

    r = run(str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run(str(tmp_path), "--scenarios", "chat,warp-speed", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown scenario 'warp-speed'" in r.stderr
