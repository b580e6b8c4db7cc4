"""A real PostgreSQL with pgvector on 127.0.0.1 for the tests: the server binaries of the `pgserver` package
(PostgreSQL with pgvector), a fresh data folder, a free port, trust authentication, stopped at the end. PostgreSQL
refuses to run as root: then it runs as pgserver's own system user, as pgserver itself does."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from in_thread_server import free_port


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory) -> Iterator[str]:
    import pgserver

    bin_dir = Path(pgserver.__file__).parent / "pginstall" / "bin"
    data = tmp_path_factory.mktemp("pg") / "data"
    data.mkdir()
    user = None
    if os.geteuid() == 0:
        import shutil

        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        user = "pgserver"
        ensure_user_exists(user)
        ensure_prefix_permissions(data)
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, 0o555)
        ensure_folder_permissions(bin_dir.parent / "lib", 0o444)
        shutil.chown(data, user, user)
    subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, user=user)
    port = free_port()
    log = open(data.parent / "postgres.log", "wb")
    proc = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                             "-k", str(data)], stdout=log, stderr=subprocess.STDOUT, user=user,
                            env={**os.environ, "LC_ALL": "C"})
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 60
    while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start:\n{(data.parent / 'postgres.log').read_text()}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
