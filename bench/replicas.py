"""Replicas benchmark (issue 14): kernel starts and REST requests per second through nginx with
1, 2 and 3 gateway replicas on PostgreSQL, beside one gateway on SQLite, in one run.

Run from the repository root:

    .venv/bin/python bench/replicas.py [--bursts N] [--burst-size N] [--rest-seconds S]

Each setup is started afresh in a scratch folder: the gateways (one on SQLite, the baseline; or
1, 2, 3 replicas on one database of a PostgreSQL server the bench starts), a real nginx in front
of them (round-robin, as tests/nginx.py configures it; the SQLite gateway behind it too, so that
only the database and the number of replicas differ), and four hosts of eight fake H100s that
join through nginx. Then, through nginx:

1. Kernel starts: `--bursts` bursts of `--burst-size` `POST /api/kernels` sent at once, each
   timed until its kernel is running (the POST waits for it; a kernel still starting after that
   is polled); then all are deleted and the machine is left to settle. Starts per second is a
   burst's size over its time to the last running kernel (median over bursts); p50 and p99 are
   over every start.
2. REST: `GET /api/kernels` (the tenant's list, a database read) from 16 concurrent clients for
   `--rest-seconds`, with two kernels running.
3. Where a start's time goes: the gateways' own `gpupool_db_round_trips_total` and
   `gpupool_db_statement_seconds_total` (summed over replicas) during the bursts, less what the
   replicas do in the background (heartbeats, idle watch, following each other) in as long an
   idle stretch, per start. The rest of a start is the host starting the kernel process.

Everything runs on loopback on the same cores as the bench itself; each wait is bounded, and every
process started is stopped at the end, also on error or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import REPO, describe_machine, log, run_lines, run_main
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from conftest import Gateway, HostAgent, free_port, start_gateway, start_host
from nginx import Nginx, binary
from postgres import Postgres, Unavailable

from kernel_gateway.tokens import new_token

H100_X1 = "python3-gpu-h100-x1"
HOSTS, GPUS_PER_HOST = 4, 8
REST_CLIENTS = 16
SETUPS = [("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Result:
    label: str
    start_latencies: list[float] = field(default_factory=list)
    starts_per_second: list[float] = field(default_factory=list)
    requests_per_second: float = 0.0
    request_p50: float = 0.0
    request_p99: float = 0.0
    trips_per_start: float = 0.0
    db_seconds_per_start: float = 0.0


@dataclass
class Setup:
    """One setup's processes: gateways, nginx, hosts."""

    where: Path
    gateways: list[Gateway] = field(default_factory=list)
    hosts: list[HostAgent] = field(default_factory=list)
    nginx: Nginx | None = None
    front: Gateway | None = None
    token: str = ""
    admin: str = ""

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    def front_gateway(self) -> Gateway:
        assert self.front is not None
        return self.front

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()
        if self.nginx is not None:
            self.nginx.stop()
        for gateway in self.gateways:
            gateway.stop()


class Bench:
    def __init__(self, where: Path) -> None:
        self.where = where
        self.postgres: Postgres | None = None
        self.setup: Setup | None = None

    async def cleanup(self) -> None:
        if self.setup is not None:
            self.setup.stop()
        if self.postgres is not None:
            self.postgres.close()

    def logs(self) -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = []
        if self.setup is not None:
            for gateway in self.setup.gateways:
                found.append((f"gateway {gateway.url}", gateway.log))
        return found


def start_setup(bench: Bench, backend: str, replicas: int) -> Setup:
    folder = bench.where / f"{backend}-{replicas}"
    folder.mkdir()
    setup = Setup(folder)
    bench.setup = setup
    secrets = {f"GPUPOOL_{n}": new_token() for n in ("HOST_KEY", "ADMIN_TOKEN", "JOIN_TOKEN")}
    setup.admin = secrets["GPUPOOL_ADMIN_TOKEN"]
    ports = [free_port() for _ in range(replicas)]
    front = free_port()
    database: list[str] = []
    if backend == "postgresql":
        assert bench.postgres is not None
        database = ["--db-url", bench.postgres.database(str(folder))]
    for index, port in enumerate(ports):
        setup.gateways.append(
            start_gateway(
                folder,
                *database,
                "--public-url",
                f"http://127.0.0.1:{front}",
                state=folder / f"gateway-{index}",
                port=port,
                env=secrets,
            )
        )
    setup.nginx = Nginx(folder / "nginx", front, [f"127.0.0.1:{p}" for p in ports])
    # nginx seen as a gateway, for its requests and waits
    setup.front = entry = Gateway(setup.nginx.proc, setup.url, "", folder,
                                  folder / "nginx" / "error.log")  # fmt: skip
    reply = entry.call("POST", "/api/admin/tenants", {"name": "bench", "allow_shared_host": True},
                       token=setup.admin)  # fmt: skip
    assert reply.status == 201, reply.body
    setup.token = entry.token = reply.body["token"]
    for index in range(HOSTS):
        host_folder = folder / f"host-{index}"
        host_folder.mkdir()
        setup.hosts.append(
            start_host(
                host_folder,
                "--fake-gpus",
                f"H100:{GPUS_PER_HOST}",
                "--no-isolate",
                "--gateway",
                setup.url,
                f"--join-token={secrets['GPUPOOL_JOIN_TOKEN']}",
            )
        )

    def every_gateway_sees_the_pool() -> bool:
        for gateway in setup.gateways:
            reply = gateway.call("GET", "/api/gpus", token=setup.token)
            gpus = reply.body
            if reply.status != 200 or sum(g["total"] for g in gpus) != HOSTS * GPUS_PER_HOST:
                return False
        return True

    entry.wait_for(every_gateway_sees_the_pool, 60, "every gateway to see the four hosts")
    return setup


def counters(setup: Setup) -> tuple[float, float]:
    """Database round trips and statement seconds, summed over the setup's gateways."""
    trips = seconds = 0.0
    for gateway in setup.gateways:
        reply = gateway.call("GET", "/metrics", token=setup.admin)
        assert reply.status == 200, reply.body
        text = reply.body
        for line in str(text).splitlines():
            if line.startswith("gpupool_db_round_trips_total "):
                trips += float(line.split()[1])
            elif line.startswith("gpupool_db_statement_seconds_total "):
                seconds += float(line.split()[1])
    return trips, seconds


def settle(setup: Setup) -> None:
    """Until the hosts run no kernel (deleted ones are stopped) and have refilled their pools."""
    setup.front_gateway().wait_for(lambda: all(
        not [k for k in h.call("GET", "/api/kernels").body if k["execution_state"] != "dead"
             and (k.get("gpupool") or {}).get("owner")]
        for h in setup.hosts
    ), 120, "the hosts to stop every kernel")  # fmt: skip
    time.sleep(3)  # the warm pools refill (a kernel process each) before the next burst


async def burst(setup: Setup, size: int) -> tuple[list[float], float, list[str]]:
    client = AsyncHTTPClient(force_instance=True, max_clients=size)
    began = time.perf_counter()

    async def one() -> tuple[float, str]:
        request = HTTPRequest(
            setup.url + "/api/kernels", method="POST", request_timeout=180,
            headers={"Authorization": f"token {setup.token}"},
            body=json.dumps({"name": H100_X1, "env": {}}),
        )  # fmt: skip
        sent = time.perf_counter()
        response = await client.fetch(request)
        model = json.loads(response.body)
        kernel_id = model["id"]
        while model["gpupool"]["state"] != "running":
            if time.perf_counter() - sent > 180 or model["gpupool"]["state"] == "dead":
                raise RuntimeError(f"kernel {kernel_id} did not run: {model['gpupool']}")
            await asyncio.sleep(0.05)
            again = await client.fetch(HTTPRequest(
                f"{setup.url}/api/kernels/{kernel_id}",
                headers={"Authorization": f"token {setup.token}"},
            ))  # fmt: skip
            model = json.loads(again.body)
        return time.perf_counter() - sent, kernel_id

    try:
        done = await asyncio.gather(*(one() for _ in range(size)))
    finally:
        client.close()
    return [d for d, _ in done], time.perf_counter() - began, [k for _, k in done]


async def rest(setup: Setup, seconds: float) -> tuple[float, list[float]]:
    client = AsyncHTTPClient(force_instance=True, max_clients=REST_CLIENTS)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            response = await client.fetch(HTTPRequest(
                setup.url + "/api/kernels", headers={"Authorization": f"token {setup.token}"},
                request_timeout=30,
            ))  # fmt: skip
            assert response.code == 200
            latencies.append(time.perf_counter() - sent)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(REST_CLIENTS)))
    finally:
        client.close()
    return len(latencies) / (time.perf_counter() - began), latencies


async def measure(bench: Bench, args: argparse.Namespace, backend: str, replicas: int) -> Result:
    label = "SQLite, 1 gateway" if backend == "sqlite" else f"PostgreSQL, {replicas} replica(s)"
    log(f"{label}: starting gateways, nginx and {HOSTS} hosts")
    setup = await asyncio.to_thread(start_setup, bench, backend, replicas)
    result = Result(label)
    try:
        await asyncio.to_thread(settle, setup)
        # The background's database traffic, over a stretch as long as a burst is expected to be.
        idle_from, idle_seconds_from = await asyncio.to_thread(counters, setup)
        idle_began = time.perf_counter()
        await asyncio.sleep(5)
        idle_to, idle_seconds_to = await asyncio.to_thread(counters, setup)
        idle_span = time.perf_counter() - idle_began
        trips_rate = (idle_to - idle_from) / idle_span
        seconds_rate = (idle_seconds_to - idle_seconds_from) / idle_span
        trips = db_seconds = 0.0
        for index in range(args.bursts):
            before, before_seconds = await asyncio.to_thread(counters, setup)
            began = time.perf_counter()
            latencies, took, ids = await burst(setup, args.burst_size)
            span = time.perf_counter() - began
            after, after_seconds = await asyncio.to_thread(counters, setup)
            trips += after - before - trips_rate * span
            db_seconds += after_seconds - before_seconds - seconds_rate * span
            result.start_latencies += latencies
            result.starts_per_second.append(args.burst_size / took)
            log(f"{label}: burst {index + 1}: {args.burst_size} running in {took:.2f} s")
            for kernel_id in ids:
                await asyncio.to_thread(setup.front_gateway().call, "DELETE",
                                        f"/api/kernels/{kernel_id}")  # fmt: skip
            await asyncio.to_thread(settle, setup)
        starts = args.bursts * args.burst_size
        result.trips_per_start = trips / starts
        result.db_seconds_per_start = db_seconds / starts
        # REST, with two kernels in the tenant's list.
        _, _, ids = await burst(setup, 2)
        rate, latencies = await rest(setup, args.rest_seconds)
        result.requests_per_second = rate
        result.request_p50, result.request_p99 = pct(latencies, 0.5), pct(latencies, 0.99)
        log(f"{label}: {rate:.0f} GET /api/kernels per second")
        for kernel_id in ids:
            await asyncio.to_thread(setup.front_gateway().call, "DELETE",
                                    f"/api/kernels/{kernel_id}")  # fmt: skip
    finally:
        setup.stop()
        bench.setup = None
        shutil.rmtree(setup.where, ignore_errors=True)
    return result


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def report(results: list[Result], args: argparse.Namespace, took: float) -> None:
    base = results[0]
    base_starts = statistics.median(base.starts_per_second)
    measured = ["kernel_gateway", "gpu_host", "gpupool", "bench/replicas.py"]
    machine = describe_machine(["jupyter_server", "sqlalchemy", "psycopg"])
    lines = run_lines(machine, measured, took)
    print()
    for line in lines:
        print(f"- {line}")
    print()
    print(f"{args.bursts} bursts of {args.burst_size} concurrent H100 starts per setup; REST: "
          f"GET /api/kernels from {REST_CLIENTS} clients for {args.rest_seconds:g} s; all through "
          "nginx.")  # fmt: skip
    print()
    print("| setup | starts/s (median burst) | vs SQLite | start p50 | start p99 "
          "| GET req/s | vs SQLite | GET p50 | GET p99 | DB round trips per start "
          "| DB time per start |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        starts = statistics.median(r.starts_per_second)
        print(
            f"| {r.label} | {starts:.1f} | {starts / base_starts:.2f}x "
            f"| {ms(pct(r.start_latencies, 0.5))} | {ms(pct(r.start_latencies, 0.99))} "
            f"| {r.requests_per_second:.0f} "
            f"| {r.requests_per_second / base.requests_per_second:.2f}x "
            f"| {ms(r.request_p50)} | {ms(r.request_p99)} | {r.trips_per_start:.0f} "
            f"| {ms(r.db_seconds_per_start)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=3, help="bursts of starts per setup (3)")
    parser.add_argument("--burst-size", type=int, default=16, help="starts per burst (16, most 32)")
    parser.add_argument("--rest-seconds", type=float, default=5.0, help="REST load seconds (5)")
    args = parser.parse_args()
    if args.bursts < 1 or not 1 <= args.burst_size <= HOSTS * GPUS_PER_HOST:
        parser.error("--bursts must be at least 1 and --burst-size from 1 to 32")
    if not 0.5 <= args.rest_seconds <= 600:
        parser.error("--rest-seconds must be from 0.5 to 600")
    if binary() is None:
        sys.exit("bench/replicas.py needs nginx (`make install` as root installs Debian's).")

    async def body(bench: Bench) -> None:
        began = time.perf_counter()
        try:
            bench.postgres = Postgres(free_port())
        except Unavailable as why:
            sys.exit(f"bench/replicas.py needs a PostgreSQL server: {why}")
        results = [await measure(bench, args, backend, n) for backend, n in SETUPS]
        report(results, args, time.perf_counter() - began)

    run_main("gpupool-bench-replicas-", Bench, body, "the gateways, nginx, hosts and PostgreSQL")


if __name__ == "__main__":
    main()
