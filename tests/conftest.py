"""Shared fixtures: a real `gpupool host` process on loopback, and a small JSON client for it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_core.paths import jupyter_data_dir
from postgres import Postgres, Unavailable

from kernel_gateway.up import host_state_dir

REPO = Path(__file__).resolve().parent.parent
# The database the gateways of this run use (--db), and the PostgreSQL server made for it.
DATABASE: dict[str, Any] = {"backend": "sqlite"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db", choices=("sqlite", "postgresql"), default="sqlite",
        help="the database every gateway of the tests uses: sqlite (its state folder's, the "
        "default) or postgresql (one server started for the run, a database per state folder)",
    )  # fmt: skip


# Folders of this run, made when pytest starts (not when bench/ imports this module's launchers,
# whose hosts keep the product's warm kernels).
_RUN_FOLDERS: list[tempfile.TemporaryDirectory[str]] = []


# The user's own Jupyter kernelspecs folder, as it was when the run began (see
# pytest_sessionfinish).
_USER_KERNELS: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    DATABASE["backend"] = config.getoption("--db")
    if not hasattr(config, "workerinput"):  # the run's own process, not an xdist worker
        kernels = Path(jupyter_data_dir()) / "kernels"
        _USER_KERNELS.update(path=kernels, names=_kernel_names(kernels))
    # Every Jupyter server and `gpupool kernelspec sync` the tests start writes its kernelspecs
    # into a data folder of this run, never the user's own (~/.local/share/jupyter/kernels): a
    # pool shape left there by a test would show up in every later Lab on this machine.
    data = tempfile.TemporaryDirectory(prefix="gpupool-tests-jupyter-data-")
    os.environ["JUPYTER_DATA_DIR"] = data.name
    # Hosts the tests start keep no warm kernels unless a test asks (`--warm-per-shape 1`, or
    # `start_stack(..., warm=True)`): each warm kernel costs a second of CPU, and most of the
    # suite's ~200 hosts never take theirs. Config files in JUPYTER_CONFIG_PATH rank below the
    # command line, so an explicit option still wins; the browser tests' `gpupool up` keeps
    # the product's default (lab_stack starts it without JUPYTER_* variables).
    config_dir = tempfile.TemporaryDirectory(prefix="gpupool-tests-jupyter-config-")
    (Path(config_dir.name) / "gpupool_host_config.json").write_text(
        json.dumps({"HostKernelManager": {"warm_per_shape": 0}})
    )
    os.environ["JUPYTER_CONFIG_PATH"] = config_dir.name
    _RUN_FOLDERS.extend((data, config_dir))


def _kernel_names(kernels: Path) -> set[str]:
    return {p.name for p in kernels.iterdir()} if kernels.is_dir() else set()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A run that left kernelspecs in the user's own Jupyter folder fails: every later Lab on
    this machine would list them (a test started a server without a data folder of its own)."""
    if not _USER_KERNELS:
        return
    left = sorted(_kernel_names(_USER_KERNELS["path"]) - _USER_KERNELS["names"])
    if left:
        print(f"\nthe tests left kernelspecs in {_USER_KERNELS['path']}: {', '.join(left)}; "
              "give every server a test starts its own JUPYTER_DATA_DIR")  # fmt: skip
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a test marked slow first: pytest-xdist hands out whole modules in this order,
    so the long ones start at once instead of running alone at the end of the run."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def pytest_unconfigure(config: pytest.Config) -> None:
    server = DATABASE.pop("server", None)
    if server is not None:
        server.close()


def shared_postgres() -> Postgres:
    """The run's PostgreSQL server, started on first use; the test skips if there can be none."""
    if "server" not in DATABASE:
        if "unavailable" in DATABASE:
            pytest.skip(DATABASE["unavailable"])
        try:
            DATABASE["server"] = Postgres(free_port())
        except Unavailable as why:
            DATABASE["unavailable"] = f"PostgreSQL tests skipped: {why}"
            pytest.skip(DATABASE["unavailable"])
    server: Postgres = DATABASE["server"]
    return server


def database_url(state: Path) -> str:
    """The --db-url for a gateway on `state` under --db postgresql ("" under sqlite): the same
    database each time for one state folder, so a restarted gateway finds its state."""
    if DATABASE["backend"] != "postgresql":
        return ""
    return shared_postgres().database(str(state.resolve()))


@pytest.fixture(scope="module")
def on_postgresql() -> Iterator[None]:
    """Every gateway this module starts uses PostgreSQL, whatever --db says: the modules
    `test_*_on_postgresql.py` rerun a SQLite module this way within the same run (a worker runs
    one module at a time, so the switch holds for exactly that module)."""
    shared_postgres()
    before = DATABASE["backend"]
    DATABASE["backend"] = "postgresql"
    yield
    DATABASE["backend"] = before


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    """The run's PostgreSQL server, whatever --db says (skips where there can be none)."""
    return shared_postgres()


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _decode(text: bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text.decode(errors="replace")


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class HostAgent:
    """A running `gpupool host`, with the token it printed."""

    proc: subprocess.Popen[str]
    url: str
    token: str
    log_path: Path

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"}
        if token is None:
            token = self.token
        if token:
            headers["Authorization"] = f"token {token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return Reply(response.status, _decode(text), dict(response.headers))
        except urllib.error.HTTPError as error:
            text = error.read()
            return Reply(error.code, _decode(text), dict(error.headers))

    def create(self, **body: Any) -> dict[str, Any]:
        reply = self.call("POST", "/api/kernels", body)
        assert reply.status == 201, reply.body
        return dict(reply.body)

    def wait_for(self, check: Any, timeout: float = 30, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; log: {self.log()}")

    def warm_count(self) -> int:
        return int(self.call("GET", "/api/host").body["warm"])

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_host(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> HostAgent:
    port = free_port()
    log_path = tmp_path / f"host-{port}.log"
    command = [sys.executable, "-m", "gpu_host", "--port", str(port), "--state-dir",
               str(tmp_path / "state"), *args]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if k != "GPUPOOL_HOST_TOKEN"}
    full_env.update(env or {})
    log = open(log_path, "w")  # the process writes it until it ends
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=tmp_path)  # fmt: skip
    url = token = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (url and token):
        if proc.poll() is not None:
            raise AssertionError(
                f"gpupool host exited with {proc.returncode}: {log_path.read_text()}"
            )
        for line in log_path.read_text().splitlines():
            if line.startswith("host: "):
                url = line.split(" ", 1)[1]
            elif line.startswith("token: "):
                token = line.split(" ", 1)[1]
        if (env or {}).get("GPUPOOL_HOST_TOKEN"):
            token = (env or {})["GPUPOOL_HOST_TOKEN"]
        time.sleep(0.05)
    if not (url and token):
        proc.kill()
        raise AssertionError(f"gpupool host did not start: {log_path.read_text()}")
    return HostAgent(proc, url, token, log_path)


@pytest.fixture
def host_factory(tmp_path: Path) -> Iterator[Any]:
    """Start agents with any options; every one is stopped at the end of the test."""
    started: list[HostAgent] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> HostAgent:
        agent = start_host(tmp_path, *args, env=env)
        started.append(agent)
        return agent

    yield factory
    for agent in started:
        agent.stop()


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostAgent]:
    """One agent with two fake H100s and one A10G, shared by a module's tests."""
    agent = start_host(
        tmp_path_factory.mktemp("host"), "--fake-gpus", "H100:2,A10G:1", "--no-isolate",
        "--warm-per-shape", "1",
    )  # fmt: skip
    yield agent
    agent.stop()


@dataclass
class Gateway:
    """A running gateway (with `gpupool up --no-lab`, also its local host), seen as a tenant."""

    proc: subprocess.Popen[str]
    url: str
    token: str  # the demo tenant's, when started with `up`
    state_dir: Path
    log_path: Path
    db_url: str = ""  # under --db postgresql; else the state folder's SQLite

    @property
    def database(self) -> str:
        """What store.open_store opens to read this gateway's database."""
        return self.db_url or str(self.state_dir / "gateway.db")

    def sql(self, statement: str, **params: Any) -> list[tuple[Any, ...]]:
        """Run one SQL statement (named :parameters) on this gateway's database, SQLite or
        PostgreSQL, committed; its rows, if any."""
        import sqlalchemy

        from kernel_gateway.store import database_url

        engine = sqlalchemy.create_engine(database_url(self.database))
        try:
            with engine.begin() as connection:
                result = connection.execute(sqlalchemy.text(statement), params)
                return [tuple(row) for row in result] if result.returns_rows else []
        finally:
            engine.dispose()

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin-token").read_text().strip()

    @property
    def join_token(self) -> str:
        return (self.state_dir / "join-token").read_text().strip()

    call = HostAgent.call
    create = HostAgent.create
    wait_for = HostAgent.wait_for
    log = HostAgent.log
    stop = HostAgent.stop

    def tenant(self, name: str, **caps: int) -> str:
        """Create a tenant through the admin API; returns its token. Tests run many tenants on
        hosts started with --no-isolate, so this accepts a shared host (allow_shared_host);
        tests/security/test_secrets.py checks the refusal without it."""
        body = {"name": name, "allow_shared_host": True, **caps}
        reply = self.call("POST", "/api/admin/tenants", body, token=self.admin_token)
        assert reply.status == 201, reply.body
        return str(reply.body["token"])


def _read_lines(
    proc: subprocess.Popen[str], log_path: Path, keys: tuple[str, ...]
) -> dict[str, str]:
    found: dict[str, str] = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(found) < len(keys):
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            key, _, value = line.partition(": ")
            if key in keys:
                found[key] = value.strip()
        time.sleep(0.05)
    if len(found) < len(keys):
        proc.kill()
        raise AssertionError(f"did not print {keys}: {log_path.read_text()}")
    return found


def start_stack(
    tmp_path: Path, fake_gpus: str = "H100:2,A10G:1", *extra: str, warm: bool = False
) -> Gateway:
    """`gpupool up --no-lab`: a gateway and one local host with fake GPUs, and a demo tenant;
    with `warm`, the host keeps the product's warm kernels (one per shape)."""
    state = tmp_path / "state"
    log_path = tmp_path / f"up-{time.monotonic_ns()}.log"
    db_url = database_url(state)
    command = [sys.executable, "-m", "gpupool.cli", "up", "--no-lab",
               "--port", str(free_port()), "--host-port", str(free_port()),
               "--fake-gpus", fake_gpus, "--state-dir", str(state),
               *(["--db-url", db_url] if db_url else []), *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    if warm:
        env.pop("JUPYTER_CONFIG_PATH", None)
    log = open(log_path, "w")  # the process writes it until it ends
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path
    )
    lines = _read_lines(proc, log_path, ("gateway", "token"))
    return Gateway(proc, lines["gateway"], lines["token"], state, log_path, db_url)


def start_gateway(
    tmp_path: Path,
    *extra: str,
    state: Path | None = None,
    port: int = 0,
    env: dict[str, str] | None = None,
) -> Gateway:
    """`gpupool gateway` alone (hosts join it separately); no tenant token until one is made.
    `env`: GPUPOOL_* variables for it (the test's own are never passed on)."""
    state = state or tmp_path / "state"
    log_path = tmp_path / f"gateway-{time.monotonic_ns()}.log"
    db_url = database_url(state) if not any(a.startswith("--db") for a in extra) else ""
    command = [sys.executable, "-m", "gpupool.cli", "gateway",
               "--port", str(port or free_port()), "--state-dir", str(state),
               *(["--db-url", db_url] if db_url else []), *extra]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    full_env.update(env or {})
    log = open(log_path, "w")  # the process writes it until it ends
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=tmp_path
    )
    lines = _read_lines(proc, log_path, ("gateway",))
    return Gateway(proc, lines["gateway"], "", state, log_path, db_url)


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """One embedded stack (gateway + host with two fake H100s and an A10G) for a module; its
    host keeps warm kernels where the module sets `WARM_KERNELS = True`."""
    warm = bool(getattr(request.module, "WARM_KERNELS", False))
    gateway = start_stack(tmp_path_factory.mktemp("stack"), warm=warm)
    yield gateway
    gateway.stop()
    # As root, `gpupool up` keeps its host's tenant folders outside the state folder.
    shutil.rmtree(host_state_dir(gateway.state_dir.resolve()), ignore_errors=True)
