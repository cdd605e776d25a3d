"""A throw-away PostgreSQL server for the tests of the shared Optuna storage: Debian's `postgresql` package
(`apt-get install postgresql`; `.ci/run` installs it), initialised in a temporary folder, listening on a Unix socket
only, torn down after. As root the server runs as the package's `postgres` user (PostgreSQL refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL = "apt-get install postgresql"


def server_bin() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: Debian keeps them in /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    pytest.fail(f"PostgreSQL server not found (no initdb in /usr/lib/postgresql/*/bin or on PATH): {INSTALL}",
                pytrace=False)


def postgres_server(port: int = 55432) -> Iterator[str]:
    """Start a server and yield its SQLAlchemy URL (database ``postgres``, trust authentication on the socket)."""
    bindir = server_bin()
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    try:
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, text=True)
        options = f"-k {root} -c listen_addresses='' -p {port} -F -c max_connections=50"
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                        "-w", "-t", "60", "start"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"PostgreSQL did not start: {exc.stderr}{log}") from None
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
