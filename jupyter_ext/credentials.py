"""Where the gateway's URL and the tenant token come from, for the pool kernelspecs and their
provisioner: given values, then `GPUPOOL_URL` / `GPUPOOL_TOKEN`, then the file `gpupool login`
writes (`$XDG_CONFIG_HOME/gpupool/credentials`, default `~/.config/gpupool/credentials`, 0600).

The token is never written anywhere else: not into a kernelspec, a connection file or a log."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from .errors import GatewayError, GpuMagicError
from .gateway_api import TOKEN_ENV, URL_ENV, GatewayApi


class CredentialsError(GpuMagicError):
    """No usable gateway URL or token, said with what to do about it."""


def credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gpupool" / "credentials"


def _saved() -> dict[str, str]:
    path = credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise CredentialsError(
            f"cannot read {path} ({error}); run `gpupool login --url URL` again."
        ) from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path} is not what `gpupool login` writes; run it again.")
    return {k: str(v) for k, v in data.items() if k in ("url", "token") and v}


def resolve(url: str = "", token: str = "", who: str = "pool kernels need") -> tuple[str, str]:
    """The gateway URL and tenant token to use, or CredentialsError saying how to set them
    (`who` starts that message). A saved token is used only with the URL it was saved for, so
    it never goes elsewhere."""
    url = (url or os.environ.get(URL_ENV, "")).rstrip("/")
    token = token or os.environ.get(TOKEN_ENV, "")
    if not (url and token):
        saved = _saved()
        url = url or saved.get("url", "").rstrip("/")
        if not token and saved.get("url", "").rstrip("/") == url:
            token = saved.get("token", "")
    missing = [name for name, value in ((URL_ENV, url), (TOKEN_ENV, token)) if not value]
    if missing:
        raise CredentialsError(
            f"{who} the gateway's URL and a tenant token: {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Run `gpupool login --url URL`, "
            f"or set {URL_ENV} and {TOKEN_ENV}."
        )
    return url, token


def explain(error: GatewayError, url: str) -> str:
    """A gateway refusal in words, naming the problem and never the token."""
    if error.status == 401:
        return (
            f"the gateway at {url} does not accept this tenant token ({error}). Run "
            f"`gpupool login --url {url}` with a valid token, or fix {TOKEN_ENV}."
        )
    if error.status == 0:
        return f"{error}. Is the gateway running, and is {URL_ENV} right?"
    return f"the gateway at {url} answered {error.status}: {error}"


def check(url: str, token: str) -> list[str]:
    """The pool's kernelspec names, fetched with `token`; CredentialsError if refused."""
    try:
        specs = GatewayApi(url, token).call("GET", "/api/kernelspecs", timeout=15)
    except GatewayError as error:
        raise CredentialsError(explain(error, url)) from None
    return sorted((specs or {}).get("kernelspecs", {}))


def save(url: str, token: str) -> Path:
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump({"url": url, "token": token}, f)
    os.replace(path.with_suffix(".tmp"), path)
    return path


def main(argv: list[str] | None = None) -> None:
    """`gpupool login --url URL`: the token from stdin (or a prompt that does not echo it),
    checked against the gateway, then saved 0600."""
    parser = argparse.ArgumentParser(
        prog="gpupool login",
        description="Save the gateway URL and your tenant token for pool kernels "
        f"({credentials_path()}, mode 0600). The token is read from stdin or a prompt.",
    )
    parser.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8888")
    # As `gpupool host` and `gpupool gateway` (traitlets) do; this command has no more options.
    parser.add_argument("--help-all", action="help", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    if sys.stdin.isatty():
        token = getpass.getpass("tenant token (not shown): ")
    else:
        token = sys.stdin.readline()
    token = token.strip()
    if not token:
        print(
            "gpupool login: no token given; paste it at the prompt or pipe it in.", file=sys.stderr
        )
        sys.exit(2)
    try:
        names = check(url, token)
    except CredentialsError as error:
        print(f"gpupool login: {error}", file=sys.stderr)
        sys.exit(1)
    path = save(url, token)
    print(f"Saved to {path}. The pool offers: {', '.join(names) or 'nothing yet'}.")
    print("Run `gpupool kernelspec sync` to list its GPU shapes beside your local kernels.")
