"""`gpupool usage`: GPU time billed, per interval and in total, as a table (or CSV).

On the gateway's machine it reads the state folder, every tenant's or one's (`--tenant`); from
anywhere else it asks a gateway's /api/usage with a tenant token (`--url`, and $GPUPOOL_TOKEN
or `--token-file`), which shows that tenant's own usage."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gpupool.token_file import read_token_file

from .budgets import Budgets
from .errors import ApiError
from .ledger import Ledger, read_time, to_csv, usd
from .store import Tenant, open_store


def _short_time(text: str | None) -> str:
    return text[:19].replace("T", " ") if text else ""


def render(report: dict[str, Any], budgets: list[dict[str, Any]]) -> str:
    """The report as a table a person reads, totals per GPU type, then each budget."""
    header = ("TENANT", "KERNEL", "GPU", "START (UTC)", "END (UTC)", "ENDED BY", "SECONDS", "COST")
    rows = [
        (i["tenant"], i["kernel_id"][:8], f"{i['gpu_type']} x{i['gpu_count']}",
         _short_time(i["start"]), _short_time(i["end"]) or "(running)", i["end_reason"] or "-",
         f"{i['seconds']:.1f}", usd(i["cost_usd"]))
        for i in report["intervals"]
    ]  # fmt: skip
    lines = []
    window = f"from {report['since'] or 'the start'} until {report['until'] or 'now'}"
    if not rows:
        lines.append(f"no GPU time billed {window}.")
    else:
        widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
        right = {6, 7}  # numbers line up on the right

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                str(v).rjust(w) if c in right else str(v).ljust(w)
                for c, (v, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        lines += [line(header), *(line(r) for r in rows), ""]
        lines.append(f"totals {window}:")
        totals = [(t, v) for t, v in report["totals"].items()] + [("all", report["total"])]
        for name, v in totals:
            lines.append(
                f"  {name:<8} {v['intervals']:>5} interval(s)  {v['gpu_seconds']:>12.1f} "
                f"GPU-seconds  {usd(v['cost_usd']):>12}"
            )
    for b in budgets:
        limit = (
            "no budget" if b["budget_usd"] is None
            else f"a budget of {usd(b['budget_usd'])} a month"
        )  # fmt: skip
        lines.append(
            f"tenant {b['tenant']}: spent {usd(b['spent_this_month_usd'])} in {b['month']}; {limit}"
        )
    return "\n".join(lines)


ON_ARGV = (
    "gpupool usage: warning: the token is on the command line, where every user of this "
    "machine can read it (ps); pass it in $GPUPOOL_TOKEN or --token-file instead."
)


def read_token(args: argparse.Namespace) -> str:
    """The tenant token: --token-file (a file, or - for stdin), else $GPUPOOL_TOKEN, else
    --token, which works but is warned about (DESIGN: no secret on a command line)."""
    if args.token and args.token_file:
        raise SystemExit("gpupool usage: give the token once: --token-file or --token, not both.")
    if args.token_file:
        try:
            return read_token_file(args.token_file, "--token-file", "tenant token")
        except ValueError as error:
            raise SystemExit(f"gpupool usage: {error}.") from None
    if args.token:
        print(ON_ARGV, file=sys.stderr, flush=True)
        return str(args.token)
    return os.environ.get("GPUPOOL_TOKEN", "")


def _from_api(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    token = read_token(args)
    if not token:
        raise SystemExit(
            "gpupool usage: --url needs a tenant token: set $GPUPOOL_TOKEN, or pass --token-file "
            "FILE (- reads it from stdin)."
        )
    query = {k: v for k, v in (("since", args.since), ("until", args.until),
                                ("kernel", args.kernel)) if v}  # fmt: skip
    if args.csv:
        query["format"] = "csv"
    url = args.url.rstrip("/") + "/api/usage"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read())["message"]
        except (ValueError, KeyError, TypeError):
            message = str(error)
        raise SystemExit(f"gpupool usage: the gateway answered {error.code}: {message}") from None
    except (urllib.error.URLError, OSError) as error:
        raise SystemExit(f"gpupool usage: cannot reach {args.url}: {error}") from None
    if args.csv:
        return {}, text
    report = json.loads(text)
    budget = dict(report.get("budget") or {}, tenant=report.get("tenant", ""))
    return report, render(report, [budget])


def _from_state(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    db_path = Path(args.state_dir) / "gateway.db"
    if not args.db_url and not db_path.exists():
        raise SystemExit(
            f"gpupool usage: no gateway state in {args.state_dir}/; pass --state-dir or "
            "--db-url, or --url and a token to ask a gateway."
        )
    db = open_store(args.db_url or str(db_path))
    ledger = Ledger(db)
    budgets = Budgets(ledger)
    with db() as s:
        query = select(Tenant).order_by(Tenant.name)
        if args.tenant:
            query = query.where(Tenant.name == args.tenant)
        tenants = s.scalars(query).all()
    if args.tenant and not tenants:
        raise SystemExit(f"gpupool usage: no tenant named {args.tenant!r}.")
    since = read_time("--since", args.since)
    until = read_time("--until", args.until)
    if since is not None and until is not None and since > until:
        raise SystemExit("gpupool usage: --since is after --until; swap them.")
    tenant_id = tenants[0].id if args.tenant else None
    report = ledger.report(tenant_id, since, until, args.kernel or None)
    if args.csv:
        return report, to_csv(report)
    summaries = [dict(budgets.summary(t), tenant=t.name) for t in tenants]
    if not args.tenant:  # every tenant: only those with a budget or a spend this month
        summaries = [b for b in summaries if b["budget_usd"] is not None
                     or b["spent_this_month_usd"] > 0]  # fmt: skip
    return report, render(report, summaries)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpupool usage", description=__doc__)
    parser.add_argument("--state-dir", default=".gpupool", help="the gateway's state folder")
    parser.add_argument("--db-url", default=os.environ.get("GPUPOOL_DB_URL", ""),
                        help="the gateways' database, as their --db-url")  # fmt: skip
    parser.add_argument("--tenant", default="", help="only this tenant (state folder only)")
    parser.add_argument("--since", default="", help="ISO 8601 time, e.g. 2025-05-01")
    parser.add_argument("--until", default="", help="ISO 8601 time, e.g. 2025-06-01T00:00:00Z")
    parser.add_argument("--kernel", default="", help="only this kernel id")
    parser.add_argument("--csv", action="store_true", help="print CSV with a header row")
    parser.add_argument("--url", default=os.environ.get("GPUPOOL_URL", ""),
                        help="ask this gateway instead ($GPUPOOL_URL)")  # fmt: skip
    parser.add_argument(
        "--token-file", default="",
        help="file holding the tenant token for --url; - reads it from stdin (or set "
        "$GPUPOOL_TOKEN)",
    )  # fmt: skip
    parser.add_argument(
        "--token", default="", help="the token itself: every user of the machine can read a "
        "command line, so prefer $GPUPOOL_TOKEN or --token-file (warned about)",
    )  # fmt: skip
    # As `gpupool host` and `gpupool gateway` (traitlets) do; this command has no more options.
    parser.add_argument("--help-all", action="help", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        _report, text = _from_api(args) if args.url else _from_state(args)
    except ApiError as error:
        raise SystemExit(f"gpupool usage: {error.message}") from None
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
