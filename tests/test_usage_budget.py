"""Usage and budgets: GET /api/usage (JSON, CSV, filters, bad input, other tenants),
`gpupool usage`, the Prometheus counter, monthly budgets (402 with the numbers, running kernels'
billing stopped), and budgets set through the admin API and `gpupool tenant`. Real gateway and
host processes on loopback with fake GPUs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, HostAgent, start_gateway, start_host

from kernel_gateway.ledger import CSV_COLUMNS

H100_X1 = "python3-gpu-h100-x1"
A10G_X1 = "python3-gpu-a10g-x1"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, HostAgent]]:
    folder = tmp_path_factory.mktemp("pool")
    gw = start_gateway(folder, state=folder / "gw")
    (folder / "host").mkdir()
    agent = start_host(
        folder / "host", "--fake-gpus", "H100:2,A10G:1", "--no-isolate", "--gateway", gw.url,
        f"--join-token={gw.join_token}", "--heartbeat-seconds", "0.5",
    )  # fmt: skip
    try:
        gw.wait_for(lambda: gw.call("GET", "/api/hosts", token=gw.admin_token).body, 15, "the host")
        yield gw, agent
    finally:
        agent.stop()
        gw.stop()


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The `gpupool` command; `env` adds to a copy of this environment without GPUPOOL_TOKEN."""
    full = {k: v for k, v in os.environ.items() if k != "GPUPOOL_TOKEN"} | (env or {})
    return subprocess.run([sys.executable, "-m", "gpupool.cli", *args], env=full,
                          input=stdin, capture_output=True, text=True, timeout=60)  # fmt: skip


def create(gw: Gateway, token: str, name: str) -> str:
    reply = gw.call("POST", "/api/kernels", {"name": name}, token=token)
    assert reply.status == 201, reply.body
    assert reply.body["gpupool"]["state"] == "running", reply.body
    return str(reply.body["id"])


def delete(gw: Gateway, token: str, kernel_id: str) -> None:
    assert gw.call("DELETE", f"/api/kernels/{kernel_id}", token=token).status == 204


def test_usage_lists_intervals_with_totals_per_gpu_type(pool: tuple[Gateway, HostAgent]) -> None:
    gw, _ = pool
    token = gw.tenant("usage")
    h100, a10g = create(gw, token, H100_X1), create(gw, token, A10G_X1)
    cpu = create(gw, token, "python3")  # no GPU: no interval, no cost
    time.sleep(0.6)
    delete(gw, token, h100)
    delete(gw, token, a10g)
    between = time.time()
    time.sleep(0.3)
    still = create(gw, token, H100_X1)
    time.sleep(0.3)
    try:
        reply = gw.call("GET", "/api/usage", token=token)
        assert reply.status == 200, reply.body
        report = reply.body
        assert report["tenant"] == "usage"
        assert [i["kernel_id"] for i in report["intervals"]] == [h100, a10g, still]
        assert cpu not in {i["kernel_id"] for i in report["intervals"]}
        assert [i["end_reason"] for i in report["intervals"]] == ["shut_down", "shut_down", ""]
        assert report["intervals"][2]["open"] is True and report["intervals"][2]["end"] is None
        assert set(report["totals"]) == {"H100", "A10G"}
        assert report["totals"]["H100"]["intervals"] == 2
        seconds = sum(i["gpu_seconds"] for i in report["intervals"])
        assert report["total"]["gpu_seconds"] == pytest.approx(seconds, abs=0.003)
        cost = sum(i["cost_usd"] for i in report["intervals"])
        assert report["total"]["cost_usd"] == pytest.approx(cost, abs=1e-5)
        a10g_row = report["intervals"][1]
        # The cost is rounded to a millionth of a dollar and the seconds shown to a millisecond:
        # the two roundings together are off by at most this much.
        rounding = 0.5e-6 + 0.0005 * 1.10 / 3600
        expected = a10g_row["seconds"] * 1.10 / 3600
        assert a10g_row["cost_usd"] == pytest.approx(expected, abs=rounding)
        assert report["budget"]["budget_usd"] is None
        assert report["budget"]["spent_this_month_usd"] == pytest.approx(cost, abs=1e-4)

        # Filters: one kernel; a window (each interval counted within it).
        only = gw.call("GET", f"/api/usage?kernel={a10g}", token=token).body
        assert [i["kernel_id"] for i in only["intervals"]] == [a10g]
        assert set(only["totals"]) == {"A10G"}
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(between)) + (
            f".{int(between % 1 * 1e6):06d}Z"
        )
        later = gw.call("GET", f"/api/usage?since={since}", token=token).body
        assert [i["kernel_id"] for i in later["intervals"]] == [still]
        assert later["since"] == since
        before = gw.call("GET", "/api/usage?until=2001-01-01", token=token).body
        assert before["intervals"] == [] and before["total"]["cost_usd"] == 0

        # CSV: a header row, then one row per interval.
        csv_reply = gw.call("GET", "/api/usage?format=csv", token=token)
        assert csv_reply.status == 200
        assert csv_reply.headers["Content-Type"].startswith("text/csv")
        lines = csv_reply.body.splitlines()
        assert lines[0].split(",") == list(CSV_COLUMNS)
        assert len(lines) == 4 and lines[1].split(",")[2] == h100

        # Another tenant sees none of it, and its filter on this kernel is a 404 like any other.
        other = gw.tenant("usage-other")
        assert gw.call("GET", "/api/usage", token=other).body["intervals"] == []
        theirs = gw.call("GET", f"/api/usage?kernel={h100}", token=other)
        never_id = str(uuid.uuid4())
        never = gw.call("GET", f"/api/usage?kernel={never_id}", token=other)
        assert theirs.status == never.status == 404
        assert theirs.body["message"].replace(h100, "ID") == never.body["message"].replace(
            never_id, "ID"
        )
    finally:
        delete(gw, token, still)
        delete(gw, token, cpu)

    # The counter of GPU-seconds billed, per type, and the open ones' gauge.
    text = gw.call("GET", "/metrics", token=gw.admin_token).body
    billed = re.search(r'^gpupool_gpu_seconds_billed_total\{gpu_type="H100"\} (\S+)$', text, re.M)
    assert billed and float(billed[1]) > 0.5, text
    assert re.search(r'^gpupool_gpu_seconds_billed_total\{gpu_type="A10G"\} ', text, re.M)
    assert "# TYPE gpupool_gpu_seconds_open gauge" in text


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("since=yesterday", 400, "not an ISO 8601 time"),
        ("until=2025-13-40", 400, "not an ISO 8601 time"),
        ("since=99999-01-01", 400, "not an ISO 8601 time"),
        ("since=" + "1" * 200, 400, "200 characters"),
        ("since=2025-06-01&until=2025-05-01", 400, "since is after until"),
        ("format=xml", 400, "json (the default) or csv"),
        ("kernel=not-a-kernel", 404, "Kernel does not exist"),
        ("kernel=%3D1%2B1", 404, "Kernel does not exist"),
        ("sinse=2025-01-01", 400, "unknown parameter 'sinse'"),
    ],
)
def test_usage_refuses_bad_filters_with_words(
    pool: tuple[Gateway, HostAgent], query: str, status: int, words: str
) -> None:
    gw, _ = pool
    token = gw.tenant(f"bad-{uuid.uuid4().hex[:12]}")
    reply = gw.call("GET", f"/api/usage?{query}", token=token)
    assert reply.status == status, reply.body
    assert words in reply.body["message"], reply.body


def test_usage_needs_a_tenant_token(pool: tuple[Gateway, HostAgent]) -> None:
    gw, _ = pool
    assert gw.call("GET", "/api/usage", token="").status == 401
    assert gw.call("GET", "/api/usage", token="x" * 64).status == 401


@pytest.mark.parametrize(
    "raw",
    [b'"5"', b"-1", b"true", b"1e12", b"NaN", b"Infinity", b"[]", b"1" + b"0" * 400],
)
def test_a_budget_must_be_dollars_in_range(pool: tuple[Gateway, HostAgent], raw: bytes) -> None:
    gw, _ = pool
    body = b'{"name": "budget-bad", "budget_usd": ' + raw + b"}"
    reply = gw.call("POST", "/api/admin/tenants", raw=body, token=gw.admin_token)
    assert reply.status == 400, reply.body
    assert "budget_usd" in reply.body["message"], reply.body


def test_admins_change_budgets_and_nobody_else_does(pool: tuple[Gateway, HostAgent]) -> None:
    gw, _ = pool
    admin = gw.admin_token
    # The pool's host runs with --no-isolate: a further tenant there is accepted as shared.
    body = {"name": "budgeted", "budget_usd": 25, "allow_shared_host": True}
    reply = gw.call("POST", "/api/admin/tenants", body, token=admin)
    assert reply.status == 201, reply.body
    token = reply.body["token"]
    path = "/api/admin/tenants/budgeted"
    assert gw.call("PATCH", path, {"budget_usd": 1}, token=token).status == 401
    changed = gw.call("PATCH", path, {"budget_usd": 12.5}, token=admin)
    assert changed.status == 200, changed.body
    assert changed.body["budget_usd"] == 12.5 and changed.body["spent_this_month_usd"] == 0
    assert gw.call("PATCH", path, {"budget_usd": -3}, token=admin).status == 400
    assert gw.call("PATCH", path, {"colour": "red"}, token=admin).status == 400
    assert gw.call("PATCH", path, {}, token=admin).status == 400
    assert gw.call("PATCH", "/api/admin/tenants/nobody", {"budget_usd": 1}, token=admin).status == (
        404
    )
    removed = gw.call("PATCH", path, {"budget_usd": None}, token=admin)
    assert removed.status == 200 and removed.body["budget_usd"] is None
    listed = {t["name"]: t for t in gw.call("GET", "/api/admin/tenants", token=admin).body}
    assert listed["budgeted"]["budget_usd"] is None


def test_a_budget_reached_refuses_gpus_and_stops_billing(pool: tuple[Gateway, HostAgent]) -> None:
    gw, _ = pool
    budget = 0.003  # an H100 at $3.95/h runs through it in about 2.7 s
    body = {"name": "thrifty", "budget_usd": budget, "allow_shared_host": True}
    reply = gw.call("POST", "/api/admin/tenants", body, token=gw.admin_token)
    assert reply.status == 201, reply.body
    token = reply.body["token"]
    kernel_id = create(gw, token, H100_X1)

    def ended() -> dict[str, Any] | None:
        model = gw.call("GET", f"/api/kernels/{kernel_id}", token=token).body
        return model if model["gpupool"]["state"] == "suspended" else None

    # Suspended, not killed: its variables are kept for when the budget allows again.
    model = gw.wait_for(ended, 8, "the budget to suspend the kernel")
    reason = model["gpupool"]["reason"]
    assert "budget" in reason and "of its $0.0030 GPU budget" in reason, reason
    # Billing stopped at the budget, give or take the watcher's tick.
    assert budget <= model["gpupool"]["cost_usd"] <= budget + 0.5 * 3.95 / 3600, model
    [interval] = gw.call("GET", f"/api/usage?kernel={kernel_id}", token=token).body["intervals"]
    assert interval["end_reason"] == "budget"
    time.sleep(0.3)
    again = gw.call("GET", f"/api/kernels/{kernel_id}", token=token).body["gpupool"]
    assert again["cost_usd"] == model["gpupool"]["cost_usd"]

    # At the limit: no new GPU hold, with the numbers; a CPU kernel still starts.
    refused = gw.call("POST", "/api/kernels", {"name": H100_X1}, token=token)
    assert refused.status == 402, refused.body
    assert re.search(r"has spent \$0\.00\d\d of its \$0\.0030 GPU budget for \w+ \d{4}",
                     refused.body["message"]), refused.body  # fmt: skip
    delete(gw, token, create(gw, token, "python3"))
    # The admin raises it: GPUs again.
    raised = gw.call("PATCH", "/api/admin/tenants/thrifty", {"budget_usd": 10},
                     token=gw.admin_token)  # fmt: skip
    assert raised.status == 200, raised.body
    delete(gw, token, create(gw, token, H100_X1))


@pytest.mark.slow
def test_gpupool_usage_and_tenant_budgets_in_the_terminal(
    pool: tuple[Gateway, HostAgent],
) -> None:
    gw, _ = pool
    # Under --db postgresql the commands find the gateway's database by its URL.
    state = [str(gw.state_dir), *(["--db-url", gw.db_url] if gw.db_url else [])]
    # The pool's host runs with --no-isolate: a further tenant there must be accepted as shared.
    made = run_cli("tenant", "create", "terminal", "--budget-usd", "12.5", "--state-dir", *state,
                   "--allow-shared-host")  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    kernel_id = create(gw, token, H100_X1)
    time.sleep(0.3)
    delete(gw, token, kernel_id)

    table = run_cli("usage", "--state-dir", *state, "--tenant", "terminal")
    assert table.returncode == 0, table.stderr
    assert re.search(rf"terminal\s+{kernel_id[:8]}\s+H100 x1 .* shut_down\s+\d+\.\d\s+\$0\.0",
                     table.stdout), table.stdout  # fmt: skip
    assert re.search(r"^  H100 +1 interval\(s\) +\d+\.\d GPU-seconds +\$0\.0\d+$", table.stdout,
                     re.M), table.stdout  # fmt: skip
    assert "tenant terminal: spent $0.0" in table.stdout and "a budget of $12.50" in table.stdout

    csv_out = run_cli("usage", "--state-dir", *state, "--tenant", "terminal", "--csv")
    assert csv_out.stdout.splitlines()[0].split(",") == list(CSV_COLUMNS)
    assert len(csv_out.stdout.splitlines()) == 2

    # With a token, from anywhere: the same numbers through the API.
    remote = run_cli("usage", "--url", gw.url, env={"GPUPOOL_TOKEN": token})
    assert remote.returncode == 0, remote.stderr
    assert kernel_id[:8] in remote.stdout and "a budget of $12.50" in remote.stdout
    wrong = run_cli("usage", "--url", gw.url, "--since", "soon", env={"GPUPOOL_TOKEN": token})
    assert wrong.returncode != 0 and "not an ISO 8601 time" in wrong.stderr

    # Budgets from the terminal: listed, changed, removed, refused when not dollars.
    listed = run_cli("tenant", "list", "--state-dir", *state)
    assert re.search(r"^terminal\tactive\t.*budget=\$12\.50\tspent=\$0\.0", listed.stdout, re.M)
    changed = run_cli("tenant", "budget", "terminal", "7", "--state-dir", *state)
    assert changed.returncode == 0 and "a budget of $7.00 a month" in changed.stdout
    assert run_cli("tenant", "budget", "terminal", "none", "--state-dir", *state).returncode == 0
    bad = run_cli("tenant", "budget", "terminal", "nan", "--state-dir", *state)
    assert bad.returncode != 0 and "budget_usd" in bad.stderr
    listed = run_cli("tenant", "list", "--state-dir", *state)
    assert re.search(r"^terminal\t.*budget=none\t", listed.stdout, re.M), listed.stdout


def test_gpupool_usage_reads_the_token_from_the_environment_a_file_or_stdin(
    pool: tuple[Gateway, HostAgent], tmp_path: Path
) -> None:
    """DESIGN: no secret on a command line (every user of the machine can read it in ps)."""
    gw, _ = pool
    token = gw.tenant("usage-token")
    usage = ("usage", "--url", gw.url)
    file = tmp_path / "token"
    file.write_text(token + "\n")
    for ok in (run_cli(*usage, env={"GPUPOOL_TOKEN": token}),
               run_cli(*usage, "--token-file", str(file)),
               run_cli(*usage, "--token-file", "-", stdin=token + "\n")):  # fmt: skip
        assert ok.returncode == 0 and "no GPU time billed" in ok.stdout, ok.stderr
        assert ok.stderr == "" and token not in ok.stdout
    # On the command line it still works, with a warning that says what to do instead.
    warned = run_cli(*usage, "--token", token)
    assert warned.returncode == 0 and "no GPU time billed" in warned.stdout, warned.stderr
    assert "every user of this machine can read it" in warned.stderr
    assert "$GPUPOOL_TOKEN or --token-file" in warned.stderr and token not in warned.stderr
    # Bad token files: each one line naming the problem, and no request sent with a guess.
    (tmp_path / "two").write_text(token + "\n" + token + "\n")
    (tmp_path / "big").write_text("x" * 5000)
    (tmp_path / "blank").write_text("\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe" * 10)
    for args, words in (
        (("--token-file", str(tmp_path / "two")), "must hold one tenant token"),
        (("--token-file", str(tmp_path / "big")), "must hold one tenant token"),
        (("--token-file", str(tmp_path / "blank")), "must hold one tenant token"),
        (("--token-file", str(tmp_path / "binary")), "cannot read --token-file"),
        (("--token-file", str(tmp_path / "missing")), "cannot read --token-file"),
        (("--token-file", str(file), "--token", token), "not both"),
    ):
        bad = run_cli(*usage, *args)
        assert bad.returncode != 0 and words in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and token not in bad.stderr
    stdin_empty = run_cli(*usage, "--token-file", "-", stdin="")
    assert stdin_empty.returncode != 0 and "stdin must hold one tenant token" in stdin_empty.stderr
    none = run_cli(*usage)
    assert none.returncode != 0 and "$GPUPOOL_TOKEN" in none.stderr
    wrong = run_cli(*usage, env={"GPUPOOL_TOKEN": "f" * 64})
    assert wrong.returncode != 0 and "answered 401" in wrong.stderr


def test_a_cold_start_is_billed_from_when_the_host_gave_it_its_gpus(tmp_path: Any) -> None:
    """DESIGN: `starting` is billed, since the GPUs are held while the kernel boots; a start
    that fails bills nothing."""
    gw = start_gateway(tmp_path, state=tmp_path / "gw")
    (tmp_path / "host").mkdir()
    agent = start_host(
        tmp_path / "host", "--fake-gpus", "H100:1", "--no-isolate", "--warm-per-shape", "0",
        "--gateway", gw.url, f"--join-token={gw.join_token}", "--heartbeat-seconds", "0.5",
    )  # fmt: skip
    try:
        gw.wait_for(lambda: gw.call("GET", "/api/gpus").body, 15, "the host")
        token = gw.tenant("cold")
        asked = time.time()
        kernel_id = create(gw, token, "python3-gpu-h100-x1")
        answered = time.time()
        [held] = agent.call("GET", "/api/kernels").body
        assert held["gpupool"]["start"] == "cold"
        [interval] = gw.call("GET", f"/api/usage?kernel={kernel_id}", token=token).body["intervals"]
        start = datetime.strptime(interval["start"], "%Y-%m-%dT%H:%M:%S.%fZ")
        start_at = start.replace(tzinfo=timezone.utc).timestamp()
        assert abs(start_at - held["gpupool"]["held_since"]) < 0.002
        # The boot (most of a cold start) is inside the interval, not before it.
        assert asked <= start_at < asked + (answered - asked) / 2, (asked, start_at, answered)
        delete(gw, token, kernel_id)
    finally:
        agent.stop()
        gw.stop()
