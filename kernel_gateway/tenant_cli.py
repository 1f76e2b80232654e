"""`gpupool tenant create|list|budget|revoke|token`: tenants of the gateway whose state is here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from gpupool.token_file import read_token_file

from .errors import ApiError
from .ledger import usd
from .state import GatewayState
from .store import open_store


def main(argv: list[str] | None = None) -> None:
    # --state-dir may come before or after the action.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=argparse.SUPPRESS, help="the gateway's state folder")
    common.add_argument(
        "--db-url", default=argparse.SUPPRESS,
        help="the gateways' database, as their --db-url (default: $GPUPOOL_DB_URL, else the "
        "state folder's SQLite)",
    )  # fmt: skip
    parser = argparse.ArgumentParser(prog="gpupool tenant", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser(
        "create", parents=[common], help="create a tenant; prints its token once, last line"
    )
    create.add_argument("name")
    create.add_argument("--max-gpus", type=int, default=None)
    create.add_argument("--max-kernels", type=int, default=None)
    create.add_argument(
        "--allow-shared-host", action="store_true",
        help="create it even though a host runs every tenant's kernels as one Unix user, where "
        "tenants can read each other's files and kernels",
    )  # fmt: skip
    create.add_argument(
        "--budget-usd", type=float, default=None, help="US dollars of GPU time per calendar month"
    )
    budget = sub.add_parser(
        "budget", parents=[common], help="set a tenant's monthly GPU budget in USD, or 'none'"
    )
    budget.add_argument("name")
    budget.add_argument("usd", help="dollars per calendar month (UTC), or 'none' for no budget")
    sub.add_parser("list", parents=[common], help="list tenants and their token prefixes")
    revoke = sub.add_parser(
        "revoke", parents=[common],
        help="revoke a tenant: its tokens, open websockets and kernels (and their billing) end",
    )  # fmt: skip
    revoke.add_argument("name")
    token = sub.add_parser(
        "token", parents=[common], help="make another token for a tenant; prints it once"
    )
    token.add_argument("name")
    # As `gpupool host` and `gpupool gateway` (traitlets) do; this command has no more options.
    parser.add_argument("--help-all", action="help", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.state_dir = getattr(args, "state_dir", ".gpupool")

    db_url = getattr(args, "db_url", None) or os.environ.get("GPUPOOL_DB_URL", "")
    db_path = Path(args.state_dir) / "gateway.db"
    if not db_url and not db_path.exists():
        sys.exit(f"gpupool tenant: no gateway state in {args.state_dir}/; run 'gpupool up' or "
                 "'gpupool gateway' here first, or pass --state-dir or --db-url.")  # fmt: skip
    # Beside a live gateway: only tenants are touched, never its kernels, queue or ledger.
    state = GatewayState(
        open_store(db_url or str(db_path)), admin_token="", join_token="", host_timeout=1,
        serving=False,
    )  # fmt: skip
    try:
        if args.action == "create":
            tenant, secret = state.create_tenant(
                args.name, args.max_gpus, args.max_kernels, budget_usd=args.budget_usd,
                allow_shared_host=args.allow_shared_host, how_to_allow="pass --allow-shared-host",
            )  # fmt: skip
            print(f"created tenant {tenant.name}; its token is shown this once:")
            print(secret)
        elif args.action == "token":
            print(f"new token for {args.name}; it is shown this once:")
            print(state.new_token_for(args.name))
        elif args.action == "budget":
            dollars = _dollars(args.usd)
            entry = state.update_tenant(args.name, {"budget_usd": dollars})
            limit = "no budget" if dollars is None else f"a budget of {usd(dollars)} a month"
            print(f"tenant {args.name} has {limit}; spent {usd(entry['spent_this_month_usd'])} "
                  f"in {entry['month']}")  # fmt: skip
        elif args.action == "revoke":
            state.revoke_tenant(args.name)  # its tokens stop working now, gateway or not
            print(f"revoked tenant {args.name} and all its tokens")
            if db_url and not (Path(args.state_dir) / "gateway.json").exists():
                print("its websockets and kernels end when a gateway on this database is sent "
                      f"DELETE /api/admin/tenants/{args.name} with the admin token, or when one "
                      "next starts.")  # fmt: skip
            else:
                print(_end_at_gateway(Path(args.state_dir), args.name))
        else:
            for t in state.tenants():
                tokens = ", ".join(k["prefix"] + "…" for k in t["tokens"] if not k["revoked"])
                status = "revoked" if t["revoked"] else "active"
                monthly = "none" if t["budget_usd"] is None else f"${t['budget_usd']:,.2f}"
                print(f"{t['name']}\t{status}\tmax_gpus={t['max_gpus']}\t"
                      f"max_kernels={t['max_kernels']}\tbudget={monthly}\t"
                      f"spent={usd(t['spent_this_month_usd'])}\t"
                      f"tokens: {tokens or 'none'}")  # fmt: skip
    except ApiError as error:
        sys.exit(f"gpupool tenant: {error.message}")


MAX_STATE_FILE_BYTES = 64 << 10  # gateway.json is a few hundred bytes


def _end_at_gateway(state_dir: Path, name: str) -> str:
    """Ask the gateway running on this state folder to close the tenant's websockets and shut
    its kernels down (its admin route); a gateway that is not running does it at its start."""
    later = "its kernels are shut down when the gateway next starts here"
    try:
        with open(state_dir / "gateway.json", encoding="utf-8") as f:
            url = json.loads(f.read(MAX_STATE_FILE_BYTES))["url"]
        admin = os.environ.get("GPUPOOL_ADMIN_TOKEN") or read_token_file(
            str(state_dir / "admin-token"), "the admin token file", "token"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return f"no gateway has run in {state_dir}/ yet; {later}."
    request = urllib.request.Request(
        f"{url}/api/admin/tenants/{quote(name, safe='')}", method="DELETE",
        headers={"Authorization": f"token {admin}"},
    )  # fmt: skip
    try:
        urllib.request.urlopen(request, timeout=120).close()
    except urllib.error.HTTPError as error:
        return (f"the gateway at {url} answered {error.code} when asked to end the tenant's "
                f"websockets and kernels; {later}, or run this again.")  # fmt: skip
    except (OSError, ValueError) as error:  # not running, or its certificate is not trusted
        return (f"could not reach the gateway at {url} ({error}); if it runs, send it DELETE "
                f"/api/admin/tenants/{name} with the admin token; otherwise {later}.")  # fmt: skip
    return f"the gateway at {url} closed its websockets and shut its kernels down."


def _dollars(text: str) -> float | None:
    if text.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ApiError(400, f"{text[:40]!r} is not a number of US dollars, or 'none'.") from None
