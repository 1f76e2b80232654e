"""A real PostgreSQL server for the tests: initdb into a temporary folder, pg_ctl on a free
loopback port, one database per gateway state folder. As root, the server runs as `nobody`
(PostgreSQL refuses to run as root). `make install` installs the server where it is missing."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

USER = "gpupool"  # the database superuser initdb makes (trust auth, loopback only)


class Unavailable(Exception):
    """Why no PostgreSQL server can run here, as one line for a skip."""


def binaries() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, in /usr/local/bin, or Debian's own."""
    for folder in [
        *(str(Path(p).parent) for p in (shutil.which("initdb"),) if p),
        "/usr/local/bin",
        *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True),  # newest first
    ]:
        if os.access(Path(folder) / "initdb", os.X_OK) and os.access(
            Path(folder) / "pg_ctl", os.X_OK
        ):
            return Path(folder)
    return None


class Postgres:
    def __init__(self, port: int) -> None:
        self.port = port
        folder = binaries()
        if folder is None:
            raise Unavailable(
                "no PostgreSQL server here (initdb and pg_ctl not found; `make install` as "
                "root installs Debian's postgresql)"
            )
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable(
                "psycopg is not installed in this Python (pip install 'psycopg[binary]')"
            ) from None
        self.bin = folder
        self.prefix: list[str] = []
        owner = None
        if os.geteuid() == 0:  # postgres will not run as root: as nobody, in a folder of theirs
            try:
                owner = pwd.getpwnam("nobody")
            except KeyError:
                raise Unavailable("running as root, and there is no user nobody to run the "
                                  "server as") from None  # fmt: skip
            if shutil.which("runuser") is None:
                raise Unavailable("running as root, and runuser (util-linux) is missing")
            self.prefix = ["runuser", "-u", "nobody", "--"]
        self.base = Path(tempfile.mkdtemp(prefix="gpupool-pg-"))
        if owner is not None:
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        try:
            self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                      "--no-sync", "--no-instructions")  # fmt: skip
            self.start()
        except Unavailable:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.prefix, str(self.bin / tool), *args], capture_output=True,
                              text=True, timeout=60, cwd=self.base)  # fmt: skip
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise Unavailable(f"{tool} failed: {(done.stderr or done.stdout).strip()} {log}")

    def start(self) -> None:
        # Durability is not under test: no fsync makes initdb and every commit fast.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} "
                   "-c fsync=off -c full_page_writes=off "
                   "-c max_connections=300")  # fmt: skip
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        """Stop at once, dropping every connection, as a crash or a failover would."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, name: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"

    def database(self, key: str) -> str:
        """The URL of the database for `key` (a state folder), made on first use, so a gateway
        restarted on the same folder finds its state again."""
        import psycopg

        name = "gw_" + hashlib.sha256(key.encode()).hexdigest()[:16]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres",
                             autocommit=True) as connection:  # fmt: skip
            found = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is None:
                connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        except Unavailable:
            pass  # not running
        shutil.rmtree(self.base, ignore_errors=True)
