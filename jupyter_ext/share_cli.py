"""`gpupool share`: shared notebook links from the command line.

    gpupool share NOTEBOOK.ipynb [--run] [--expires 7d] [--strip-outputs]
                  [--anyone | --gateway-tenants | --tenants a,b] [--kernel ID] [--kernel-name N]
    gpupool share list
    gpupool share revoke ID
    gpupool share copy ID [-o FILE] [--kernel ID]

The gateway URL and tenant token come from GPUPOOL_URL / GPUPOOL_TOKEN or `gpupool login`'s file.
The packages a share lists are asked of a kernel, never guessed: `--kernel ID` names one of your
running pool kernels, and this command asks it (one execute request with a user expression) for
its Python version and installed distributions. Without `--kernel` the share lists none."""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from .channel import CLOSED, KernelChannel
from .credentials import CredentialsError, explain, resolve
from .errors import GatewayError
from .gateway_api import GatewayApi

# What a kernel is asked for its environment, as one expression (the Lab extension sends the
# same one as a user expression of a silent execute request): JSON of the Python version and
# every installed distribution's name and version.
ENVIRONMENT_EXPRESSION = (
    "__import__('json').dumps({'python': __import__('platform').python_version(), "
    "'packages': {d.metadata['Name']: d.version for d in "
    "__import__('importlib.metadata').metadata.distributions() if d.metadata['Name']}})"
)
EXPIRES = re.compile(r"^(\d{1,4})([mhd])$")
UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}
ASK_TIMEOUT_S = 60.0


class ShareError(Exception):
    """Something the user can fix, said in a sentence."""


def expires_seconds(text: str) -> int | None:
    if text in ("", "never"):
        return None
    match = EXPIRES.match(text)
    if not match:
        raise ShareError(
            f"--expires {text!r}: use a number and m, h or d (30m, 12h, 7d), or never."
        )
    return int(match[1]) * UNIT_SECONDS[match[2]]


def ask_environment(api: GatewayApi, kernel_id: str) -> dict[str, Any]:
    """The Python version and packages of the running kernel `kernel_id`, as it reports them."""
    channel = KernelChannel(api.url, api.token, kernel_id)
    try:
        channel.connect()
    except ConnectionError as error:
        raise ShareError(f"cannot ask kernel {kernel_id} for its packages: {error}.") from None
    try:
        content = {"code": "", "silent": True, "store_history": False, "allow_stdin": False,
                   "user_expressions": {"environment": ENVIRONMENT_EXPRESSION},
                   "stop_on_error": False}  # fmt: skip
        msg_id, waiting = channel.send("shell", "execute_request", content)
        assert waiting is not None
        import queue

        while True:
            try:
                msg = waiting.get(timeout=ASK_TIMEOUT_S)
            except queue.Empty:
                raise ShareError(
                    f"kernel {kernel_id} did not answer within {ASK_TIMEOUT_S:.0f} s; is it busy?"
                ) from None
            if msg is CLOSED:
                raise ShareError(f"cannot ask kernel {kernel_id}: {channel.closed_reason}.")
            if msg.get("msg_type") == "execute_reply":
                break
        channel.forget(msg_id)
    finally:
        channel.close()
    return environment_of(msg["content"], kernel_id)


def environment_of(reply: dict[str, Any], kernel_id: str) -> dict[str, Any]:
    """The environment in an execute_reply's content to ENVIRONMENT_EXPRESSION, or ShareError."""
    answer = (reply.get("user_expressions") or {}).get("environment") or {}
    if answer.get("status") != "ok":
        raise ShareError(
            f"kernel {kernel_id} could not list its packages: {answer.get('ename', '')} "
            f"{answer.get('evalue', '')}".rstrip()
        )
    try:
        found = json.loads(ast.literal_eval(answer["data"]["text/plain"]))
    except (KeyError, TypeError, ValueError, SyntaxError):
        raise ShareError(f"kernel {kernel_id} answered no package list.") from None
    if not isinstance(found, dict):
        raise ShareError(f"kernel {kernel_id} answered no package list.")
    return found


def package_differences(
    shared: dict[str, str], yours: dict[str, str]
) -> list[tuple[str, str, str | None]]:
    """(name, shared version, your version or None when missing) for each package of the share
    whose version your kernel does not have; names compared without case."""
    lower = {k.lower(): v for k, v in yours.items()}
    return [(n, v, lower.get(n.lower())) for n, v in shared.items() if lower.get(n.lower()) != v]


def read_notebook(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShareError(f"no file {path}.") from None
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ShareError(f"{path} is not a notebook (not JSON: {error}).") from None
    if not isinstance(data, dict):
        raise ShareError(f"{path} is not a notebook (its JSON is not an object).")
    return data


def share(api: GatewayApi, args: argparse.Namespace) -> str:
    path = Path(args.notebook)
    body: dict[str, Any] = {
        "notebook": read_notebook(path),
        "name": path.name,
        "mode": "run" if args.run else "view",
        "outputs": "strip" if args.strip_outputs else "keep",
        "expires_in": expires_seconds(args.expires),
        "access": "anyone" if args.anyone else "tenants" if args.tenants else "gateway",
    }
    if args.tenants:
        body["tenants"] = [t.strip() for t in args.tenants.split(",") if t.strip()]
    if args.kernel:
        model = api.kernel(args.kernel)
        if model is None:
            raise ShareError(f"you have no kernel {args.kernel}; `GET /api/kernels` lists yours.")
        body["kernel_name"] = args.kernel_name or model["name"]
        body["environment"] = ask_environment(api, args.kernel)
    elif args.kernel_name:
        body["kernel_name"] = args.kernel_name
    made = api.call("POST", "/api/shares", body, timeout=300)
    packages = len((body.get("environment") or {}).get("packages", {}))
    who = {"anyone": "anyone with the link", "gateway": "any tenant of this gateway"}.get(
        made["access"], "tenants " + ", ".join(made["tenants"])
    )
    return (
        f"{api.url}{made['path']}\n"
        f"{made['mode']} link to {made['name']} on {made['kernel_name']}, for {who}; "
        f"{'packages: ' + str(packages) if packages else 'no package list (pass --kernel ID)'}; "
        f"expires {made['expires'] or 'never'}. Revoke: gpupool share revoke {made['id']}"
    )


def listing(api: GatewayApi) -> str:
    shares = api.call("GET", "/api/shares")
    if not shares:
        return "you have no shared links."
    header = ("ID", "NAME", "MODE", "ACCESS", "KERNEL", "VIEWS", "RUNS", "EXPIRES")
    rows = [header] + [
        (s["id"], s["name"], s["mode"], s["access"], s["kernel_name"], str(s["views"]),
         str(s["runs"]), "expired" if s["expired"] else (s["expires"] or "never")[:16])
        for s in shares
    ]  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


def copy(api: GatewayApi, args: argparse.Namespace) -> str:
    got = api.call("POST", f"/api/shares/{args.id}/copies", {})
    notebook = got["notebook"]
    notebook.setdefault("metadata", {})["kernelspec"] = {
        "name": got["kernel_name"], "display_name": got["kernel_name"], "language": "python"
    }  # fmt: skip
    out = Path(args.output or got["share"]["name"])
    if out.exists() and not args.force:
        raise ShareError(f"{out} exists; pass -o FILE or --force.")
    out.write_text(json.dumps(notebook, indent=1) + "\n", encoding="utf-8")
    lines = [f"wrote {out}: run it on {got['kernel_name']} (your own kernel, billed to you)."]
    theirs: dict[str, str] = got.get("packages") or {}
    if args.kernel and theirs:
        mine = ask_environment(api, args.kernel).get("packages", {})
        differ = [f"  {n}: shared {v}, yours {y or 'missing'}"
                  for n, v, y in package_differences(theirs, mine)]  # fmt: skip
        lines.append(f"{len(differ)} package(s) differ from kernel {args.kernel}:" if differ
                     else "your kernel has the same package versions.")  # fmt: skip
        lines += differ
    elif theirs:
        lines.append(f"the share lists {len(theirs)} packages; pass --kernel ID to compare.")
    return "\n".join(lines)


def parser_for(command: str) -> argparse.ArgumentParser:
    if command == "list":
        return argparse.ArgumentParser(
            prog="gpupool share list", description="Your shared links, with view and run counts."
        )
    if command == "revoke":
        p = argparse.ArgumentParser(prog="gpupool share revoke",
                                    description="Revoke a shared link at once.")  # fmt: skip
        p.add_argument("id", help=ID_HELP)
        return p
    if command == "copy":
        p = argparse.ArgumentParser(
            prog="gpupool share copy",
            description="Save your own copy of a run link's notebook, set to its kernel shape.",
        )
        p.add_argument("id", help=ID_HELP)
        p.add_argument("-o", "--output", default="", help="file to write (default: its name)")
        p.add_argument("--force", action="store_true", help="overwrite the file")
        p.add_argument("--kernel", default="", help="a running kernel of yours to compare with")
        return p
    p = argparse.ArgumentParser(
        prog="gpupool share", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("notebook", help="the .ipynb file to share")
    p.add_argument(
        "--run",
        action="store_true",
        help="a run link: tenants may open their own copy (default: view only)",
    )
    p.add_argument("--expires", default="never", help="30m, 12h, 7d ... or never (default)")
    p.add_argument("--strip-outputs", action="store_true", help="share without outputs")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--anyone", action="store_true", help="anyone with the link")
    who.add_argument(
        "--gateway-tenants", action="store_true", help="any tenant of this gateway (the default)"
    )
    who.add_argument("--tenants", default="", help="only these tenants: a,b")
    p.add_argument(
        "--kernel",
        default="",
        help="a running kernel of yours: its shape, and its packages asked of it",
    )
    p.add_argument(
        "--kernel-name", default="", help="the shape, e.g. python3-gpu-h100-x1 (default: the "
        "notebook's)",
    )  # fmt: skip
    return p


ID_HELP = "the link, or its id (the part after /s/)"


def share_id_of(given: str) -> str:
    """The id of a link given whole (https://.../s/ID) or as its id, quoted for a URL path."""
    return urllib.parse.quote(given.strip().rsplit("/s/", 1)[-1].strip("/"), safe="")


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    command = args_in[0] if args_in and args_in[0] in ("list", "revoke", "copy") else "share"
    parser = parser_for(command)
    parser.add_argument("--help-all", action="help", help=argparse.SUPPRESS)
    args = parser.parse_args(args_in[1:] if command != "share" else args_in)
    if command in ("revoke", "copy"):
        args.id = share_id_of(args.id)
    try:
        url, token = resolve()
        api = GatewayApi(url, token)
        if command == "list":
            text = listing(api)
        elif command == "revoke":
            api.call("DELETE", f"/api/shares/{args.id}")
            text = f"revoked {args.id}: its link answers 404 from now on."
        elif command == "copy":
            text = copy(api, args)
        else:
            text = share(api, args)
    except (CredentialsError, ShareError) as error:
        print(f"gpupool share: {error}", file=sys.stderr)
        sys.exit(1)
    except GatewayError as error:
        print(f"gpupool share: {explain(error, url)}", file=sys.stderr)
        sys.exit(1)
    print(text)


if __name__ == "__main__":
    main()
