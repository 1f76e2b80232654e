"""Three gateway replicas on one real PostgreSQL behind a real nginx (round-robin, websockets
proxied, no sticky sessions), with four hosts of eight fake H100s that joined through nginx:
placement across replicas never gives one GPU to two kernels (as the hosts themselves tell),
the queue keeps its order across replicas, any replica serves any kernel, and a replica killed
under a client's websocket or during a start loses nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy
from conftest import Gateway, HostAgent, free_port, start_gateway, start_host
from kernel_ws import KernelSocket
from nginx import Nginx, binary
from postgres import Postgres
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from gpupool.wire import parse_iso
from kernel_gateway.tokens import new_token

pytestmark = pytest.mark.slow
H100_X1 = "python3-gpu-h100-x1"
HOSTS, GPUS_PER_HOST = 4, 8
POOL = HOSTS * GPUS_PER_HOST
LEASE_SECONDS = 10.0  # a killed replica's jobs are taken over in the test; loaded CI renews in time


@dataclass
class Cluster:
    replicas: list[Gateway]
    front: Gateway  # nginx, seen as a tenant
    hosts: list[HostAgent]
    admin_token: str
    nginx: Nginx
    db_url: str
    launch: Callable[[int], Gateway]  # starts replica `index` (again), on its own port

    def revive(self) -> None:
        """Start again each replica an earlier test killed, and wait until it sees the pool."""
        for index, replica in enumerate(self.replicas):
            if replica.proc.poll() is not None:
                revived = self.replicas[index] = self.launch(index)
                self.front.wait_for(lambda r=revived: sees_pool(r, self.front.token), 30,
                                    "the revived replica to see the pool")  # fmt: skip

    def replica_of(self, owner: str) -> Gateway:
        """The replica whose lease owner name ("host:pid:nonce") this is."""
        pid = int(owner.split(":")[1])
        [replica] = [r for r in self.replicas if r.proc.pid == pid]
        return replica

    def lease_owner(self, kernel_id: str) -> str | None:
        engine = sqlalchemy.create_engine(self.db_url)
        try:
            with engine.connect() as connection:
                return connection.execute(
                    sqlalchemy.text("SELECT lease_owner FROM kernels WHERE id = :id"),
                    {"id": kernel_id},
                ).scalar()
        finally:
            engine.dispose()

    def on_hosts(self) -> list[dict[str, Any]]:
        """Every kernel the hosts run (not dead), as the hosts themselves tell."""
        kernels = []
        for host in self.hosts:
            reply = host.call("GET", "/api/kernels")
            assert reply.status == 200, reply.body
            kernels += [k for k in reply.body if k["execution_state"] != "dead"]
        return kernels

    def gpu_seconds(self) -> float:
        """The GPU-seconds the hosts gave out to kernels, as they count them."""
        return sum(float(host.call("GET", "/api/host").body["gpu_seconds"]) for host in self.hosts)

    def states(self, ids: list[str]) -> list[str]:
        reply = self.front.call("GET", "/api/kernels")
        if reply.status == 502:  # nginx, for a moment without a live replica after a kill
            time.sleep(1)
            reply = self.front.call("GET", "/api/kernels")
        assert reply.status == 200 and isinstance(reply.body, list), reply
        listed = {k["id"]: k for k in reply.body}
        return [listed[i]["gpupool"]["state"] if i in listed else "gone" for i in ids]


def sees_pool(replica: Gateway, token: str) -> bool:
    gpus = replica.call("GET", "/api/gpus", token=token).body
    return isinstance(gpus, list) and sum(g["total"] for g in gpus) == POOL


@pytest.fixture(scope="module")
def cluster(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if binary() is None:
        pytest.skip("replica tests skipped: nginx is not installed (`make install` as root "
                    "installs Debian's nginx)")  # fmt: skip
    folder = tmp_path_factory.mktemp("replicas")
    db_url = postgres.database(str(folder / "database"))
    secrets = {f"GPUPOOL_{name}": new_token() for name in ("HOST_KEY", "ADMIN_TOKEN", "JOIN_TOKEN")}
    ports = [free_port() for _ in range(3)]
    front_port = free_port()
    front_url = f"http://127.0.0.1:{front_port}"
    started: list[Any] = []
    replicas: list[Gateway] = []

    def launch(index: int) -> Gateway:
        return start_gateway(
            folder, "--db-url", db_url, "--public-url", front_url,
            "--lease-seconds", str(LEASE_SECONDS), state=folder / f"replica-{index}",
            port=ports[index], env=secrets,
        )  # fmt: skip

    try:
        for index in range(len(ports)):
            replicas.append(launch(index))
        # After the replicas: nginx takes a replica that refuses a connection out for a while.
        nginx = Nginx(folder / "nginx", front_port, [f"127.0.0.1:{p}" for p in ports])
        started.append(nginx)
        admin = secrets["GPUPOOL_ADMIN_TOKEN"]
        front = Gateway(nginx.proc, nginx.url, "", folder, folder / "nginx" / "error.log")
        reply = front.call(
            "POST", "/api/admin/tenants", {"name": "team", "allow_shared_host": True},
            token=admin,
        )  # fmt: skip
        assert reply.status == 201, reply.body
        front.token = reply.body["token"]
        hosts = []
        for index in range(HOSTS):
            host_folder = folder / f"host-{index}"
            host_folder.mkdir()
            host = start_host(
                host_folder, "--fake-gpus", f"H100:{GPUS_PER_HOST}", "--no-isolate",
                "--gateway", nginx.url, f"--join-token={secrets['GPUPOOL_JOIN_TOKEN']}",
                "--heartbeat-seconds", "0.5",
            )  # fmt: skip
            hosts.append(host)
            started.append(host)

        front.wait_for(lambda: all(sees_pool(r, front.token) for r in replicas), 30,
                       "every replica to see all four hosts")  # fmt: skip
        yield Cluster(replicas, front, hosts, admin, nginx, db_url, launch)
    finally:
        for thing in reversed(started):
            thing.stop()
        for replica in replicas:  # those revived included
            replica.stop()


class HostWatch:
    """Reads every host's own list of kernels over and over, in a thread, and keeps any GPU it
    ever saw given to two live kernels at once."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.twice: list[tuple[str, list[str]]] = []
        self.most_held = 0
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            holders: dict[str, list[str]] = {}
            for host in self.cluster.hosts:
                for kernel in host.call("GET", "/api/kernels").body:
                    if kernel["execution_state"] == "dead":
                        continue
                    for gpu in kernel["gpupool"]["gpus"]:
                        holders.setdefault(f"{host.url} {gpu}", []).append(kernel["id"])
            self.twice += [(gpu, ids) for gpu, ids in holders.items() if len(ids) > 1]
            self.most_held = max(self.most_held, len(holders))
            self.reads += 1
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


async def burst(url: str, token: str, count: int) -> list[tuple[int, dict[str, Any]]]:
    client = AsyncHTTPClient(force_instance=True, max_clients=count)

    async def one() -> tuple[int, dict[str, Any]]:
        request = HTTPRequest(
            url + "/api/kernels", method="POST", request_timeout=120,
            headers={"Authorization": f"token {token}"},
            body=json.dumps({"name": H100_X1, "env": {}}),
        )  # fmt: skip
        response = await client.fetch(request, raise_error=False)
        return response.code, json.loads(response.body)

    try:
        return list(await asyncio.gather(*(one() for _ in range(count))))
    finally:
        client.close()


def billed(front: Gateway) -> float:
    """The GPU-seconds in the tenant's whole ledger."""
    return float(front.call("GET", "/api/usage").body["total"]["gpu_seconds"])


def run_cell(url: str, token: str, kernel_id: str, code: str) -> str:
    """Run `code` on the kernel over a websocket to `url` (a replica, or nginx); its stdout."""

    async def run() -> str:
        sock = await KernelSocket.open(url, token, kernel_id)
        try:
            out, result = await sock.execute(code)
            assert result["status"] == "ok", result
            return out
        finally:
            sock.close()

    return asyncio.run(run())


def transitions(replica: Gateway, admin: str, into: str) -> float:
    """How many kernels this replica moved into `into` (its own counter, from its /metrics)."""
    text = replica.call("GET", "/metrics", token=admin).body
    total = 0.0
    for line in text.splitlines():
        if line.startswith("gpupool_kernel_transitions_total{") and f'to_state="{into}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# 64 real kernels on 2 cores beside other test files: minutes, not seconds, under load.
@pytest.mark.timeout(600)
def test_64_starts_on_32_gpus_over_three_replicas(cluster: Cluster) -> None:
    front = cluster.front
    assert cluster.on_hosts() == []
    billed_before, held_before = billed(front), cluster.gpu_seconds()
    watch = HostWatch(cluster)
    try:
        first = asyncio.run(burst(front.url, front.token, POOL))
        assert [code for code, _ in first] == [201] * POOL, first
        first_ids = [body["id"] for _, body in first]
        front.wait_for(lambda: cluster.states(first_ids) == ["running"] * POOL, 240,
                       "the first 32 kernels to run")  # fmt: skip
        # The rest arrive one after another (each answered at once: queued), through nginx, so
        # through every replica in turn; the queue keeps their order on every replica.
        second_ids = []
        for _ in range(POOL):
            reply = front.call("POST", "/api/kernels", {"name": H100_X1, "env": {}})
            assert reply.status == 201 and reply.body["gpupool"]["state"] == "queued", reply.body
            second_ids.append(reply.body["id"])
        for replica in cluster.replicas:
            listed = {
                k["id"]: k for k in replica.call("GET", "/api/kernels", token=front.token).body
            }
            positions = [listed[i]["gpupool"]["queue_position"] for i in second_ids]
            assert positions == list(range(1, POOL + 1)), (replica.url, positions)
        # Every replica placed some of the first burst: the starts really were spread.
        assert all(transitions(r, cluster.admin_token, "starting") > 0 for r in cluster.replicas)

        # Eight GPUs come back (through any replica): the first eight waiting get them, in order.
        for kernel_id in first_ids[:8]:
            assert front.call("DELETE", f"/api/kernels/{kernel_id}").status == 204
        front.wait_for(lambda: cluster.states(second_ids[:8]) == ["running"] * 8, 120,
                       "the first eight queued kernels to run")  # fmt: skip
        assert cluster.states(second_ids[8:]) == ["queued"] * (POOL - 8)
        for kernel_id in first_ids[8:]:
            assert front.call("DELETE", f"/api/kernels/{kernel_id}").status == 204
        front.wait_for(lambda: cluster.states(second_ids) == ["running"] * POOL, 240,
                       "every queued kernel to run")  # fmt: skip
    finally:
        watch.stop()
    assert watch.reads > 10
    assert watch.twice == [], f"GPUs held by two kernels at once: {watch.twice[:5]}"
    assert watch.most_held == POOL
    on_hosts = cluster.on_hosts()
    assert len(on_hosts) == POOL
    owners = {k["gpupool"]["owner"] for k in on_hosts}
    assert owners == set(second_ids)

    # The ledger: each kernel of the first burst has one closed interval; each of the second
    # one open interval that began when its host gave it its GPUs, as the host tells, so the
    # ledger's GPU-seconds are the hosts' at every moment.
    intervals: dict[str, list[dict[str, Any]]] = {}
    for interval in front.call("GET", "/api/usage").body["intervals"]:
        intervals.setdefault(interval["kernel_id"], []).append(interval)
    for kernel_id in first_ids:
        [closed] = intervals[kernel_id]
        assert not closed["open"] and closed["seconds"] > 0 and closed["end_reason"] == "shut_down"
    held_since = {k["gpupool"]["owner"]: k["gpupool"]["held_since"] for k in on_hosts}
    for kernel_id in second_ids:
        [interval] = intervals[kernel_id]
        assert interval["open"]
        assert abs(parse_iso(interval["start"]) - held_since[kernel_id]) < 0.01, interval
    for kernel_id in second_ids:
        assert front.call("DELETE", f"/api/kernels/{kernel_id}").status == 204
    front.wait_for(lambda: cluster.on_hosts() == [], 120, "the hosts to stop every kernel")
    # The whole ledger against the hosts' own count of the GPU-seconds they gave out: each
    # interval starts when a host gave the GPUs and ends when the host's answer to the DELETE
    # came, the host's count when the kernel had stopped, a few milliseconds before (a quarter
    # second each allowed, for a loaded machine).
    ledger, hosts = billed(front) - billed_before, cluster.gpu_seconds() - held_before
    assert ledger > 0 and abs(ledger - hosts) <= 0.25 * 2 * POOL, (ledger, hosts)


def test_hosts_heartbeat_through_every_replica_without_registering_again(
    cluster: Cluster,
) -> None:
    """A host registered through one replica; its heartbeats reach the others in turn (nginx's
    round-robin), and each knows it from the database: none is refused."""
    cluster.revive()
    logs = {
        host.log_path: host.log_path.read_text().count("no longer knows") for host in cluster.hosts
    }
    time.sleep(3)  # six heartbeats per host, spread over the replicas
    again = {path: path.read_text().count("no longer knows") - n for path, n in logs.items()}
    assert set(again.values()) == {0}, again


def test_any_replica_serves_a_kernel_another_started(cluster: Cluster) -> None:
    one, other = cluster.replicas[0], cluster.replicas[2]
    token = cluster.front.token
    reply = one.call("POST", "/api/kernels", {"name": H100_X1, "env": {}}, token=token)
    assert reply.status == 201 and reply.body["gpupool"]["state"] == "running", reply.body
    kernel_id = reply.body["id"]

    assert run_cell(other.url, token, kernel_id, "x = 20\nprint(x * 2 + 2)") == "42\n"
    assert other.call("DELETE", f"/api/kernels/{kernel_id}", token=token).status == 204
    assert one.call("GET", f"/api/kernels/{kernel_id}", token=token).status == 404


def test_a_start_whose_replica_is_killed_is_taken_over(cluster: Cluster) -> None:
    """The replica dies after placing the kernel, before the host's answer: its lease expires
    and another replica starts the kernel; the host kernel of the first try is stopped."""
    victim = cluster.replicas[1]
    token = cluster.front.token
    result: dict[str, Any] = {}

    def post() -> None:
        # The replica dies under this request: its connection closes without an answer.
        try:
            result["reply"] = victim.call("POST", "/api/kernels", {"name": H100_X1, "env": {}},
                                          token=token)  # fmt: skip
        except ConnectionError as error:
            result["error"] = error

    poster = threading.Thread(target=post)
    # The kernel's id is not known before the answer: find it as the one starting.
    poster.start()
    starting: list[str] = []

    def placed() -> bool:
        listed = cluster.front.call("GET", "/api/kernels").body
        starting[:] = [k["id"] for k in listed if k["gpupool"]["state"] in ("starting", "running")]
        return bool(starting)

    cluster.front.wait_for(placed, 10, "the kernel to be placed")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    poster.join(30)
    [kernel_id] = starting
    cluster.front.wait_for(lambda: cluster.states([kernel_id]) == ["running"], 60,
                           "another replica to start the kernel")  # fmt: skip
    # Exactly one host kernel for it, however far the first start got.
    cluster.front.wait_for(
        lambda: [k["gpupool"]["owner"] for k in cluster.on_hosts()] == [kernel_id], 30,
        "one host kernel for it",
    )  # fmt: skip

    assert run_cell(cluster.front.url, token, kernel_id, "print(6 * 7)") == "42\n"
    assert cluster.front.call("DELETE", f"/api/kernels/{kernel_id}").status == 204
    cluster.front.wait_for(lambda: cluster.on_hosts() == [], 30, "its host kernel to stop")


def test_killing_the_replica_under_a_websocket_loses_nothing(cluster: Cluster) -> None:
    front = cluster.front
    alive = [r for r in cluster.replicas if r.proc.poll() is None]
    assert len(alive) >= 2
    reply = front.call("POST", "/api/kernels", {"name": H100_X1, "env": {}})
    assert reply.status == 201, reply.body
    kernel_id = reply.body["id"]
    front.wait_for(lambda: cluster.states([kernel_id]) == ["running"], 60, "the kernel to run")

    async def scenario() -> str:
        sock = await KernelSocket.open(front.url, front.token, kernel_id)
        _, result = await sock.execute("x = 41")
        assert result["status"] == "ok"
        # The replica relaying this websocket is the one that counts a connection for it.
        holder = None
        for replica in alive:
            model = await asyncio.to_thread(
                replica.call, "GET", f"/api/kernels/{kernel_id}", None, front.token
            )
            if model.body["connections"] == 1:
                holder = replica
        assert holder is not None
        holder.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(holder.proc.wait, 10)
        with pytest.raises(ConnectionError):
            while True:
                await sock.recv(10)
        # The client reconnects, as JupyterLab does, through the same address.
        deadline = time.monotonic() + 20
        while True:
            try:
                again = await KernelSocket.open(front.url, front.token, kernel_id)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        try:
            out, result = await again.execute("print(x + 1)")
            assert result["status"] == "ok", result
            return out
        finally:
            again.close()

    assert asyncio.run(scenario()) == "42\n"
    states = cluster.states([kernel_id])
    assert states == ["running"], states
    assert front.call("DELETE", f"/api/kernels/{kernel_id}").status == 204


# A variable whose saving takes seconds: a suspend is under way long enough to kill its replica.
SLOW_TO_SAVE = """
import time
class SlowToSave:
    def __reduce__(self):
        time.sleep(2)
        return (SlowToSave, ())
slow = SlowToSave()
x = 41
"""


def intervals_of(front: Gateway, kernel_id: str) -> list[dict[str, Any]]:
    reply = front.call("GET", "/api/usage")
    assert reply.status == 200 and isinstance(reply.body, dict), reply
    usage = reply.body["intervals"]
    return sorted((i for i in usage if i["kernel_id"] == kernel_id), key=lambda i: i["start"])


def test_a_suspend_whose_replica_is_killed_is_done_once_by_another(cluster: Cluster) -> None:
    """The replica suspending an idle kernel dies while the host saves its variables: once its
    lease expires another replica suspends it, once; the next cell resumes it with them."""
    cluster.revive()
    front = cluster.front
    reply = front.call(
        "POST", "/api/kernels", {"name": H100_X1, "env": {"KERNEL_IDLE_TIMEOUT": "2"}}
    )
    assert reply.status == 201, reply.body
    kernel_id = reply.body["id"]
    front.wait_for(lambda: cluster.states([kernel_id]) == ["running"], 60, "the kernel to run")

    run_cell(front.url, front.token, kernel_id, SLOW_TO_SAVE)
    # Idle for 2 s, then some replica's idle watch takes the lease and asks for the checkpoint.
    owner = front.wait_for(lambda: cluster.lease_owner(kernel_id), 30, "a replica to suspend it")
    victim = cluster.replica_of(owner)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    assert cluster.states([kernel_id]) == ["running"]  # killed before its suspend was written
    front.wait_for(lambda: cluster.states([kernel_id]) == ["suspended"], 60,
                   "another replica to suspend it")  # fmt: skip
    front.wait_for(lambda: cluster.on_hosts() == [], 30, "its host kernel to stop")
    [closed] = intervals_of(front, kernel_id)
    assert not closed["open"] and closed["end_reason"] == "suspended", closed

    # Resumed, its variables back.
    assert run_cell(front.url, front.token, kernel_id, "print(x + 1)") == "42\n"
    intervals = intervals_of(front, kernel_id)
    assert [(i["open"], i["end_reason"]) for i in intervals] == [
        (False, "suspended"),
        (True, ""),
    ], intervals
    assert front.call("DELETE", f"/api/kernels/{kernel_id}").status == 204
    front.wait_for(lambda: cluster.on_hosts() == [], 30, "its host kernel to stop")


def test_a_replica_killed_while_it_closes_the_ledger_leaves_it_whole(cluster: Cluster) -> None:
    """A shut down: the replica stops the host kernel, then waits on the kernel's row (held
    locked here) to write the end and close the ledger, and is killed there. Nothing of its
    transaction is written; another replica ends the kernel when the host reports it gone,
    billed to the host's last sighting, and the owner's retried DELETE through nginx finishes."""
    cluster.revive()
    front = cluster.front
    victim = cluster.replicas[0]
    reply = front.call("POST", "/api/kernels", {"name": H100_X1, "env": {}})
    assert reply.status == 201, reply.body
    kernel_id = reply.body["id"]
    front.wait_for(lambda: cluster.states([kernel_id]) == ["running"], 60, "the kernel to run")
    [on_host] = cluster.on_hosts()
    held_since = on_host["gpupool"]["held_since"]

    engine = sqlalchemy.create_engine(cluster.db_url)
    result: dict[str, Any] = {}

    def delete() -> None:
        try:
            result["reply"] = victim.call("DELETE", f"/api/kernels/{kernel_id}", token=front.token)
        except ConnectionError as error:  # the replica dies under the request
            result["error"] = error

    try:
        with engine.connect() as lock:
            locked = lock.execute(
                sqlalchemy.text("SELECT state FROM kernels WHERE id = :id FOR UPDATE"),
                {"id": kernel_id},
            ).scalar()
            assert locked == "running"
            sent = time.time()
            deleter = threading.Thread(target=delete)
            deleter.start()
            front.wait_for(lambda: cluster.on_hosts() == [], 30, "the host kernel to stop")
            gone = time.time()

            def waiting_on_the_row() -> bool:
                with engine.connect() as look:
                    return bool(look.execute(sqlalchemy.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    )).scalar())  # fmt: skip

            front.wait_for(waiting_on_the_row, 10, "the replica to wait on the kernel's row")
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            deleter.join(30)
            assert "error" in result, result  # no answer: it died before its commit
            lock.rollback()  # the row is free: what the dead replica began is not written
    finally:
        engine.dispose()

    def state() -> str:
        reply = front.call("GET", f"/api/kernels/{kernel_id}")
        return str(reply.body["gpupool"]["state"]) if reply.status == 200 else str(reply.status)

    # Its end, as the host reported it, by another replica: `dead`, not the `deleted` the
    # killed replica's transaction was about to write.
    front.wait_for(lambda: state() == "dead", 30, "another replica to end the kernel")
    again = front.call("DELETE", f"/api/kernels/{kernel_id}")  # the owner tries again
    assert again.status == 204, again.body
    assert cluster.states([kernel_id]) == ["gone"]
    [closed] = intervals_of(front, kernel_id)
    assert not closed["open"], closed
    # The GPU was held from the host's held_since until the host stopped the kernel, between
    # `sent` and `gone`; billed to the last heartbeat that still had it (every 0.5 s).
    billed = closed["seconds"]
    assert sent - held_since - 1.0 <= billed <= gone - held_since + 0.1, (
        billed, sent - held_since, gone - held_since
    )  # fmt: skip
