"""`serve` mistakes end with exit code 2 and one line on stderr, before any model loads."""

from __future__ import annotations

import socket
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vishwamai_edge.cli", *args],
                          capture_output=True, text=True, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_bundle(tmp_path):
    assert "does not exist" in one_line_error(run_cli("serve", str(tmp_path / "nope")))


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for command in ("serve", "ui"):
            line = one_line_error(run_cli(command, str(tmp_path / "never-loaded"), "--port", str(port)))
            assert f"cannot listen on 127.0.0.1:{port}" in line
