"""Checkpoint and restore of a kernel's user namespace, for the gateway's idle suspend and resume.

The agent only chooses and checks paths and asks the kernel: the saving and loading code
(`namespace.py`) runs inside the tenant's own kernel, so the agent never unpickles anything."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from jupyter_server._tz import utcnow
from tornado import web

from .kernels import HostKernelManager
from .tenants import TenantError, check_tenant_name

MAX_BODY_BYTES = 64 * 1024
MAX_PATH_CHARS = 4096
FOLDER = Path(".gpupool") / "checkpoints"  # inside the tenant's working folder
# The code that saves and loads namespaces: sent to the kernel as text, never imported here.
NAMESPACE_SOURCE = Path(__file__).with_name("namespace.py")


@functools.cache
def _source() -> str:
    return NAMESPACE_SOURCE.read_text(encoding="utf-8")


def kernel_expression(function: str, path: Path) -> str:
    """A Python expression that, evaluated in the kernel's user namespace (as a silent execute
    request's user expression), runs `function` of namespace.py there and leaves no name behind."""
    module = f'(lambda g: (exec({_source()!r}, g), g)[1])({{"__name__": "gpupool_namespace"}})'
    return f"{module}[{function!r}](get_ipython(), {str(path)!r})"


def parse_body(body: bytes, fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object of a request body (empty means {}); only `fields` may appear in it."""
    if len(body) > MAX_BODY_BYTES:
        raise web.HTTPError(
            413, f"the request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted."
        )
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as error:
        raise web.HTTPError(400, f"the request body is not valid JSON: {error}.") from None
    if not isinstance(data, dict):
        raise web.HTTPError(400, "the request body must be a JSON object.")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(fields) or "none"
        raise web.HTTPError(400, f"unknown field {unknown[0][:40]!r}; allowed fields: {allowed}.")
    return data


def checkpoint_path(km: HostKernelManager, kernel_id: str) -> Path:
    return km.placements[kernel_id].space.workdir / FOLDER / f"{kernel_id}.pkl"


def restore_path(km: HostKernelManager, kernel_id: str, given: Any) -> Path:
    """`given` as a real path to a file inside this kernel's tenant folder; 400 for anything else
    (another tenant's folder, `..` or a link leading out, a missing file)."""
    if not isinstance(given, str) or not given or len(given) > MAX_PATH_CHARS or "\0" in given:
        raise web.HTTPError(
            400, f"path must be a non-empty string of at most {MAX_PATH_CHARS} characters."
        )
    workdir = km.placements[kernel_id].space.workdir
    real = Path(os.path.realpath(workdir / given))  # a relative path is taken from the folder
    if real == workdir or not real.is_relative_to(workdir):
        raise web.HTTPError(
            400, f"path {given[:200]!r} is not inside this kernel's tenant folder {workdir}."
        )
    if not real.is_file():
        raise web.HTTPError(400, f"there is no checkpoint file at {given[:200]!r}.")
    return real


async def checkpoint(km: HostKernelManager, kernel_id: str) -> dict[str, Any]:
    """Save the kernel's user namespace to its checkpoint file, from inside the kernel."""
    path = checkpoint_path(km, kernel_id)
    answer = await _in_kernel(km, kernel_id, "checkpoint", path)
    answer["path"] = str(path)  # the agent's choice, whatever the tenant's kernel answered
    return answer


async def restore(km: HostKernelManager, kernel_id: str, path: Path) -> dict[str, Any]:
    """Load a checkpoint file into the kernel's user namespace, from inside the kernel. The
    file stays: the caller deletes it (`discard`) once no kernel will need it."""
    return await _in_kernel(km, kernel_id, "restore", path)


CHECKPOINT_FILE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.pkl")


def discard(km: HostKernelManager, tenant: str, name: str) -> bool:
    """Delete the checkpoint file `name` of `tenant` (a suspended kernel that was shut down);
    whether there was one. Only a file name of the form this agent writes is accepted."""
    if not CHECKPOINT_FILE.fullmatch(name):
        raise web.HTTPError(400, f"{name[:80]!r} is not a checkpoint file name (<kernel id>.pkl).")
    try:
        tenant = check_tenant_name(tenant)
    except TenantError as error:
        raise web.HTTPError(400, str(error)) from None
    # The tenant owns its folder and could put links in it: walk down without following any,
    # and unlink by name in the last folder (which removes a link itself, never its target).
    home = os.path.realpath(km.spaces.home(tenant))
    try:
        folder = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False
    try:
        for part in FOLDER.parts:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
            except FileNotFoundError:
                return False
            except OSError:  # a link, or not a folder: not one this agent made
                raise web.HTTPError(
                    400, f"{tenant}'s checkpoint folder is not a plain folder; nothing deleted."
                ) from None
            os.close(folder)
            folder = inner
        try:
            os.unlink(name, dir_fd=folder)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(folder)


async def _kernel_info(client: Any) -> dict[str, Any]:
    """The kernel's kernel_info reply content, saved with its checkpoint: the gateway answers a
    suspended kernel's kernel_info requests with it rather than resume the kernel for them.
    {} when the kernel does not answer within 10 s or answers with what is not a reply."""
    try:
        reply = await client.kernel_info(reply=True, timeout=10)
    except TimeoutError:
        return {}
    content = reply.get("content") if isinstance(reply, dict) else None
    return content if isinstance(content, dict) and content.get("status") == "ok" else {}


async def _in_kernel(
    km: HostKernelManager, kernel_id: str, function: str, path: Path
) -> dict[str, Any]:
    """Run `namespace.<function>` in the kernel as a silent execute request's user expression
    (no output, no history, no name left behind) and return its answer, timed."""
    kernel = km.get_kernel(kernel_id)
    activity = kernel.last_activity  # type: ignore[attr-defined]
    start = time.perf_counter()
    client = kernel.client()
    client.start_channels()
    request = asyncio.ensure_future(
        client.execute(
            "",
            silent=True,
            store_history=False,
            user_expressions={"gpupool": kernel_expression(function, path)},
            reply=True,
            timeout=km.checkpoint_timeout,
        )
    )
    try:
        while not request.done():
            await asyncio.wait([request], timeout=1)
            if not request.done() and kernel_id not in km:  # the death watch saw it end
                raise web.HTTPError(500, f"the kernel died during the {function}.")
        reply = request.result()
        info = await _kernel_info(client) if function == "checkpoint" else None
    except TimeoutError:
        raise web.HTTPError(
            504, f"the kernel did not finish the {function} within {km.checkpoint_timeout} s."
        ) from None
    finally:
        request.cancel()
        client.stop_channels()
    # The reply comes just before the kernel's idle status: once the activity watch has seen
    # that, put the idle clock back, since a checkpoint is not the user's activity. A restore
    # is: it runs because a client spoke to the suspended kernel, whose message comes next, so
    # the idle clock starts when the restore ends (from the start of a slow cold start, a short
    # idle timeout would suspend the kernel again before that message arrives).
    for _ in range(100):
        if kernel.execution_state == "idle":  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    now = utcnow()
    kernel.last_activity = activity if function == "checkpoint" else now  # type: ignore[attr-defined]
    kernel.execution_state = "idle"  # type: ignore[attr-defined]
    content = reply["content"]
    answer = content.get("user_expressions", {}).get("gpupool", {})
    if content["status"] != "ok" or answer.get("status") != "ok":
        error = answer if answer.get("status") == "error" else content
        name, value = error.get("ename", "Error"), error.get("evalue", "")
        # A file that is not a checkpoint is the caller's mistake; anything else is the kernel's.
        status = 400 if function == "restore" and name == "CheckpointError" else 500
        raise web.HTTPError(status, f"{function} failed in the kernel: {name}: {value}")
    result = dict(answer["data"]["application/json"])
    if info is not None:
        result["kernel_info"] = info
    result["seconds"] = round(time.perf_counter() - start, 4)
    return result
