"""The gateway's REST API against a hostile caller (issue 10): host reports checked field by
field, who asks checked before any body is read, bodies bounded before they are parsed, tokens
kept out of the log, /metrics behind a token, 503 for an unreachable host, Allow on 405, and
kernelspecs that say what a kernel gets. A real gateway process; hosts are registered through
the API (a host that never answers is all some of these need)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Gateway, free_port, start_gateway
from sqlalchemy import select

from kernel_gateway.log_redaction import RedactTokens
from kernel_gateway.store import Host, open_store

GIB = 1 << 30
DEEP = b"[" * 17_500 + b"]" * 17_500  # 35 KB: the body of the report
MISSING = "00000000-0000-4000-8000-000000000000"


def check_error(reply: Any, status: int, *words: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict) and set(reply.body) == {"reason", "message"}, reply.body
    for word in words:
        assert word in reply.body["message"], reply.body


def report(gpus: list[dict[str, Any]], url: str | None = None, **extra: Any) -> dict[str, Any]:
    """What `gpupool host` sends when it registers, for a host nothing listens at."""
    url = url or f"http://127.0.0.1:{free_port()}"
    return {"name": "ghost", "url": url, "version": "0.1.0", "source": "fake", "time": 0,
            "gpus": gpus, "kernels": [], "warm": 0, **extra}  # fmt: skip


def h100s(count: int) -> list[dict[str, Any]]:
    """GPUs as `Gpu.to_json` and `HostStatus.gpus` report them."""
    return [
        {"index": i, "uuid": f"GPU-{uuid.uuid4()}", "name": "NVIDIA H100", "gpu_type": "H100",
         "memory_total": 80 * GIB, "memory_used": 0, "utilization": 0, "processes": [],
         "parent_uuid": None, "kernels": [], "warm": 0, "free": True}
        for i in range(count)
    ]  # fmt: skip


def register(gw: Gateway, body: Any) -> Any:
    return gw.call("POST", "/api/hosts/register", body, token=gw.join_token)


def host_rows(gw: Gateway) -> list[tuple[str, str]]:
    rows = gw.sql("select url, gpus from hosts order by url")
    # PostgreSQL hands a JSON column back parsed, SQLite as its text.
    return [(url, gpus if isinstance(gpus, str) else json.dumps(gpus)) for url, gpus in rows]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("gw")
    gateway = start_gateway(folder, "--host-timeout", "600")
    gateway.token = gateway.tenant("alice")
    yield gateway
    gateway.stop()


# -- finding 3: a bad host registration or heartbeat --------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"url": "http://127.0.0.1:10", "gpus": [1]}, "gpus[0] must be an object"),
        ({"gpus": [{**h100s(1)[0], "gpu_type": 5}]}, "gpus[0].gpu_type must be a GPU type"),
        ({"gpus": [{**h100s(1)[0], "gpu_type": "h100; drop"}]}, "gpus[0].gpu_type"),
        ({"gpus": [{**h100s(1)[0], "uuid": None}]}, "gpus[0].uuid"),
        ({"gpus": [{**h100s(1)[0], "memory_total": "80GB"}]}, "gpus[0].memory_total"),
        ({"gpus": h100s(1) * 2}, "names one GPU uuid twice"),
        ({"gpus": "H100"}, "gpus must be a list"),
        ({"url": "http://127.0.0.1:0"}, "url must be the http(s) address"),
        ({"url": "ftp://127.0.0.1:21"}, "url must be"),
        ({"url": 7}, "url must be a non-empty string"),
        ({"name": ["x"]}, "name must be"),
        ({"kernels": [{"id": 1}]}, "kernels[0].id"),
        ({"kernels": [{"id": "k", "execution_state": "idle", "gpupool": []}]}, "gpupool"),
        ({"isolates": "yes"}, "isolates must be true or false"),
    ],
)
def test_a_bad_registration_is_400_and_stores_nothing(gw, change, words):
    before = host_rows(gw)
    check_error(register(gw, {**report(h100s(1)), **change}), 400, words, "nothing was stored")
    assert host_rows(gw) == before
    assert gw.call("GET", "/api/gpus").status == 200
    assert gw.call("GET", "/api/kernelspecs").status == 200


def test_a_good_registration_may_say_whether_it_isolates(gw):
    for isolates in (True, False):
        reply = register(gw, report(h100s(1), isolates=isolates))
        assert reply.status == 200, reply.body
        assert set(reply.body) == {"host_id", "host_token"}


def test_a_bad_heartbeat_is_400_and_changes_nothing(gw):
    joined = register(gw, report(h100s(1)))
    assert joined.status == 200, joined.body
    path = f"/api/hosts/{joined.body['host_id']}/heartbeat"
    gpus_before = gw.call("GET", "/api/gpus").body
    bad = {"gpus": [{**h100s(1)[0], "gpu_type": 5}]}
    check_error(gw.call("POST", path, bad, token=joined.body["host_token"]), 400, "gpu_type")
    bad_kernels = {"kernels": [{"id": "k"}]}
    check_error(gw.call("POST", path, bad_kernels, token=joined.body["host_token"]), 400,
                "kernels[0].execution_state")  # fmt: skip
    assert gw.call("GET", "/api/gpus").body == gpus_before
    assert gw.call("GET", "/api/kernelspecs").status == 200
    assert gw.call("POST", path, {"gpus": h100s(1)}, token=joined.body["host_token"]).status == 200


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("utilization", -1, "utilization must be a whole percent from 0 to 100, or null"),
        ("utilization", 101, "utilization must be a whole percent from 0 to 100"),
        ("utilization", 37.5, "utilization must be a whole percent"),
        ("utilization", "37%", "utilization must be a whole percent"),
        ("utilization", True, "utilization must be a whole percent"),
        ("utilization", 10**400, "utilization must be a whole percent"),
        ("memory_used", -1, "memory_used must be a whole number from 0 to"),
        ("memory_used", "12GB", "memory_used must be a whole number"),
        ("memory_used", 1.5 * GIB, "memory_used must be a whole number"),
        ("memory_used", (1 << 50) + 1, "memory_used must be a whole number from 0 to"),
        ("memory_used", 10**400, "memory_used must be a whole number"),
    ],
)
def test_a_heartbeat_with_bad_gpu_readings_is_400_and_changes_nothing(gw, field, value, words):
    joined = register(gw, report(h100s(1)))
    assert joined.status == 200, joined.body
    path, token = f"/api/hosts/{joined.body['host_id']}/heartbeat", joined.body["host_token"]
    gpus_before = gw.call("GET", "/api/gpus").body
    bad = {"gpus": [{**h100s(1)[0], field: value}]}
    check_error(gw.call("POST", path, bad, token=token), 400, f"gpus[0].{words}")
    check_error(register(gw, report(bad["gpus"])), 400, f"gpus[0].{words}", "nothing was stored")
    assert gw.call("GET", "/api/gpus").body == gpus_before
    # What NVML reports (a MIG instance's utilization is unknown), and an older host's
    # report without either field, are taken.
    for good in ({"utilization": 100, "memory_used": 80 * GIB}, {"utilization": None}, {}):
        gpu = {k: v for k, v in h100s(1)[0].items() if k not in ("utilization", "memory_used")}
        reply = gw.call("POST", path, {"gpus": [{**gpu, **good}]}, token=token)
        assert reply.status == 200, (good, reply.body)


@pytest.mark.slow
def test_a_bad_host_row_left_in_the_database_does_not_stop_the_gateway(tmp_path):
    """A row saved by an older gateway (which stored reports unchecked) is skipped at start."""
    gw = start_gateway(tmp_path)
    try:
        url = f"http://127.0.0.1:{free_port()}"
        assert register(gw, report(h100s(1), url=url)).status == 200
    finally:
        gw.stop()
    with open_store(gw.database)() as s:  # a GPU list no gateway could have stored
        for row in s.scalars(select(Host).where(Host.url == url)):
            row.gpus = [1]
        s.commit()
    again = start_gateway(tmp_path, state=gw.state_dir)
    try:
        again.token = again.tenant("bob")
        assert again.call("GET", "/api/gpus").status == 200
        assert again.call("GET", "/api/kernelspecs").status == 200
        assert "skipped until it registers again" in again.log()
        assert register(again, report(h100s(2), url=url)).status == 200  # it comes back whole
        assert again.call("GET", "/api/gpus").body[0]["total"] == 2
    finally:
        again.stop()


# -- finding 4: who asks is checked before any body is read, and bodies are bounded ------------


def test_deep_json_without_a_token_is_refused_before_it_is_read(gw):
    for path in (f"/api/hosts/{MISSING}/heartbeat", "/api/kernels", "/api/admin/tenants",
                 "/api/hosts/register"):  # fmt: skip
        reply = gw.call("POST", path, raw=DEEP, token="")
        assert reply.status in (401, 404), (path, reply.status, reply.body)
    # Over the body limit too: who asks is checked first, so this is 401, not 413.
    big = b'{"pad": "' + b"x" * 500_000 + b'"}'
    check_error(gw.call("POST", "/api/kernels", raw=big, token=""), 401, "tenant token")
    assert "Traceback" not in gw.log() and "RecursionError" not in gw.log()


def test_deep_json_with_a_token_is_400_before_it_is_parsed(gw):
    joined = register(gw, report(h100s(1)))
    heartbeat = f"/api/hosts/{joined.body['host_id']}/heartbeat"
    for path, token in (("/api/kernels", gw.token), ("/api/admin/tenants", gw.admin_token),
                        (heartbeat, joined.body["host_token"]),
                        ("/api/hosts/register", gw.join_token)):  # fmt: skip
        check_error(gw.call("POST", path, raw=DEEP, token=token), 400, "more than 32 deep")
    nested = {"name": "python3", "env": {}}
    for _ in range(40):
        nested = {"x": nested}
    check_error(gw.call("POST", "/api/kernels", nested), 400, "more than 32 deep")
    # Brackets inside strings are text, not nesting.
    reply = gw.call("POST", "/api/admin/tenants", {"name": "[" * 100}, token=gw.admin_token)
    check_error(reply, 400, "tenant name")
    assert "Traceback" not in gw.log() and "RecursionError" not in gw.log()


def test_every_route_bounds_its_body(gw):
    big = b'{"pad": "' + b"x" * 100_000 + b'"}'
    for method, path, token in (("POST", "/api/kernels", gw.token),
                                ("PATCH", "/api/admin/tenants/alice", gw.admin_token),
                                ("POST", "/api/admin/tokens", gw.admin_token),
                                ("GET", "/api/gpus", gw.token)):  # fmt: skip
        check_error(gw.call(method, path, raw=big, token=token), 413, "65536")
    assert gw.call("GET", "/api/kernels").status == 200


# -- finding 8: tokens in the log -----------------------------------------------------------------


def test_a_token_in_the_url_is_never_written_to_the_log(gw):
    wrong = "f00d" + "7" * 60
    assert gw.call("GET", f"/api/kernels?token={wrong}", token="").status == 401
    path = f"/api/kernels/{MISSING}?token={gw.token}"
    assert gw.call("GET", path, token="").status == 404
    assert gw.call("GET", f"/metrics?x=1&token={gw.token}", token="").status == 401
    log = gw.log_path.read_text()
    assert wrong not in log and gw.token not in log and gw.token[:8] not in log
    assert "token=f00d…" in log and f"token={gw.token[:4]}…" in log


def test_every_log_line_is_redacted_not_only_the_access_log():
    """Tornado's 'Uncaught exception GET /…?token=…' and our own lines go through the filter."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactTokens())
    log = logging.getLogger("tornado.application.redaction-test")
    log.addHandler(handler)
    try:
        secret = "abcd" + "e" * 60
        log.error("Uncaught exception %s", f"GET /api/kernels?x=1&token={secret} (127.0.0.1)")
        log.warning("headers %r", {"Authorization": f"token {secret}"})
        log.warning("session_id=x%%26token%%3D%s", secret)
    finally:
        log.removeHandler(handler)
    assert secret[:5] not in out.getvalue() and out.getvalue().count("abcd…") == 3, out.getvalue()


# -- finding 9: /metrics --------------------------------------------------------------------------


def test_metrics_need_the_scrape_or_admin_token(tmp_path):
    secret = tmp_path / "scrape-token"
    secret.write_text("s3cret-scrape-token-0123456789\n")
    gw = start_gateway(tmp_path, "--metrics-token-file", str(secret))
    try:
        tenant = gw.tenant("carol")
        check_error(gw.call("GET", "/metrics", token=""), 401, "metrics (scrape) or admin token")
        check_error(gw.call("GET", "/metrics", token=tenant), 401, "metrics")
        for token in ("s3cret-scrape-token-0123456789", gw.admin_token):
            reply = gw.call("GET", "/metrics", token=token)
            assert reply.status == 200 and "gpupool_kernels" in reply.body
        # As Prometheus's `authorization: {credentials_file: ...}` sends it (type Bearer).
        request = urllib.request.Request(
            gw.url + "/metrics", headers={"Authorization": "Bearer s3cret-scrape-token-0123456789"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200 and b"gpupool_gpus" in response.read()
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("/dev/zero", "--metrics-token-file /dev/zero must hold one token"),  # endless: bounded
        ("two-lines", "--metrics-token-file"),
    ],
)
def test_a_token_file_that_is_not_one_token_stops_the_start_with_a_sentence(tmp_path, given, says):
    if given == "two-lines":
        given = str(tmp_path / "two")
        (tmp_path / "two").write_text("one-token\nanother-token\n")
    command = [sys.executable, "-m", "gpupool.cli", "gateway", "--port", str(free_port()),
               "--state-dir", str(tmp_path / "state"), "--metrics-token-file", given]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    done = subprocess.run(command, text=True, capture_output=True, timeout=60, env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert says in done.stderr and "delete it to have a new one made" in done.stderr


def test_metrics_token_is_made_in_the_state_folder_by_default(gw):
    made = gw.state_dir / "metrics-token"
    assert oct(made.stat().st_mode & 0o777) == "0o600"
    reply = gw.call("GET", "/metrics", token=made.read_text().strip())
    assert reply.status == 200


# -- finding 9: POST /api/kernels on an unreachable host ------------------------------------------


def test_an_unreachable_host_answers_503_and_bills_nothing(tmp_path):
    gw = start_gateway(tmp_path, "--host-timeout", "600")
    try:
        token = gw.tenant("dave")
        assert register(gw, report(h100s(1))).status == 200  # nothing listens at its url
        reply = gw.call("POST", "/api/kernels", {"name": "python3-gpu-h100-x1"}, token=token)
        check_error(reply, 503, "could not be reached", "Nothing was billed", "try again")
        assert reply.headers.get("Retry-After") == "30"
        assert gw.call("GET", "/api/kernels", token=token).body == []
        usage = gw.call("GET", "/api/usage", token=token).body
        assert usage["intervals"] == [], usage
        gpus = gw.call("GET", "/api/gpus", token=token).body
        assert gpus[0]["free"] == 1, "a failed start must not keep its GPU"
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()


# -- finding 9: 405 carries Allow ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/kernels", {"GET", "POST"}),
        ("DELETE", "/api/kernelspecs", {"GET"}),
        ("POST", f"/api/kernels/{MISSING}", {"GET", "DELETE"}),
        ("GET", "/api/admin/tokens", {"POST"}),
    ],
)
def test_405_names_the_allowed_methods(gw, method, path, allowed):
    token = gw.admin_token if "admin" in path else gw.token
    reply = gw.call(method, path, {} if method in ("POST", "PUT") else None, token=token)
    check_error(reply, 405, method)
    assert set(reply.headers["Allow"].split(", ")) == allowed


# -- finding 9: what a kernelspec says -----------------------------------------------------------


def test_kernelspecs_say_the_memory_a_kernel_gets_and_cpu_is_free(tmp_path):
    gw = start_gateway(tmp_path, "--host-timeout", "600")
    try:
        token = gw.tenant("erin")
        cpu = gw.call("GET", "/api/kernelspecs/python3", token=token).body
        assert cpu["spec"]["metadata"]["gpupool"]["free"] == 0, "no host yet: nowhere to start"
        assert register(gw, report(h100s(2))).status == 200
        specs = gw.call("GET", "/api/kernelspecs", token=token).body["kernelspecs"]
        meta = {name: spec["spec"]["metadata"]["gpupool"] for name, spec in specs.items()}
        assert meta["python3"]["free"] == 1, "one host can start a CPU kernel now"
        assert meta["python3-gpu-h100-x1"]["memory_gb"] == 80
        assert meta["python3-gpu-h100-x2"]["memory_gb"] == 160
        assert meta["python3-gpu-h100-x2"]["memory_gb_per_gpu"] == 80
        assert meta["python3-gpu-h100-x2"]["free"] == 2
    finally:
        gw.stop()
