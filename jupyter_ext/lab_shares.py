"""Shared notebook links from JupyterLab: the /gpupool/shares routes of the server extension.

    POST /gpupool/shares              {path, kernel_id?, mode, outputs, access, tenants,
                                       expires_in}: share a notebook of this workspace
    POST /gpupool/shares/open         {link, directory?}: write your own copy of a run link
    POST /gpupool/shares/differences  {path, kernel_id}: a copy's packages against its kernel's

The notebook is read through the contents manager (so only files of this workspace), and the
packages are asked of the notebook's own kernel as `gpupool share --kernel` asks them. The
gateway is called with this server's tenant token, which never reaches the browser or a log; a
pasted link gives only its id: the token goes to the configured gateway, never to the host a
link names."""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import time
import urllib.parse
from typing import Any

import tornado.web
from jupyter_server.utils import ensure_async

from gpupool.wire import shape_of_kernel_name

from .gateway_api import GatewayApi
from .server_extension import (
    KERNEL_ID,
    TOKEN_ENV,
    GatewayUnavailable,
    GpupoolHandler,
    _gateway_client,
    _local_name,
    _scrub,
    pool_kernel_id,
    sync_pool_kernelspecs,
)
from .share_cli import (
    ASK_TIMEOUT_S,
    ENVIRONMENT_EXPRESSION,
    ShareError,
    ask_environment,
    environment_of,
    package_differences,
)

MAX_BODY_BYTES = 16 * 1024  # a request body of these routes is a few options, never a notebook
MAX_PATH = 1024
MAX_COPY_BYTES = 128 * 1000 * 1000  # the largest copy answer read from the gateway
SHARE_TIMEOUT_S = 120.0  # sending or fetching a large notebook
SHARE_ID = re.compile(r"[A-Za-z0-9_-]{32}")  # the gateway's ids: 192 random bits, url-safe
MODES, OUTPUTS, ACCESS = ("view", "run"), ("keep", "strip"), ("anyone", "gateway", "tenants")
MAX_TENANTS = 100
MAX_COPY_TRIES = 100  # name.ipynb, name-1.ipynb, ... name-99.ipynb
METADATA_KEY = "gpupool"  # the copy's metadata.gpupool.shared: where it came from, its packages


class Refused(Exception):
    """A request this server answers itself with `status` and a sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def read_body(body: bytes, required: set[str], optional: set[str]) -> dict[str, Any]:
    """The request's JSON object, bounded, with exactly the keys these routes know."""
    if len(body) > MAX_BODY_BYTES:
        raise Refused(413, f"The request body is {len(body)} bytes; at most {MAX_BODY_BYTES}.")
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise Refused(400, "Send a JSON object of the options (see the route's description).")
    unknown = sorted(str(k)[:40] for k in data if k not in required | optional)
    if unknown:
        raise Refused(400, f"Unknown option {unknown[0]!r}; known: "
                      f"{', '.join(sorted(required | optional))}.")  # fmt: skip
    missing = sorted(required - set(data))
    if missing:
        raise Refused(400, f"{missing[0]} is missing.")
    return data


def workspace_path(value: Any, what: str = "path") -> str:
    """A path in this workspace as the contents manager takes it (it refuses what is outside)."""
    if not isinstance(value, str) or len(value) > MAX_PATH or "\0" in value:
        raise Refused(400, f"{what} must be a path in your workspace of at most {MAX_PATH} "
                      "characters.")  # fmt: skip
    return value.strip("/")


def kernel_id_of(value: Any) -> str:
    if not isinstance(value, str) or not KERNEL_ID.fullmatch(value):
        raise Refused(400, "kernel_id must be a kernel's id (a lower-case UUID).")
    return value


def share_options(data: dict[str, Any]) -> dict[str, Any]:
    """The share's options, checked here so that a mistake is named before anything is read."""
    options: dict[str, Any] = {}
    for key, allowed in (("mode", MODES), ("outputs", OUTPUTS), ("access", ACCESS)):
        if key in data:
            if data[key] not in allowed:
                raise Refused(400, f"{key} must be one of {', '.join(allowed)}.")
            options[key] = data[key]
    if "tenants" in data:
        tenants = data["tenants"]
        if (
            not isinstance(tenants, list)
            or len(tenants) > MAX_TENANTS
            or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tenants)
        ):
            raise Refused(400, f"tenants must be a list of at most {MAX_TENANTS} tenant names.")
        options["tenants"] = tenants
    if "expires_in" in data:
        expires = data["expires_in"]
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int)):
            raise Refused(400, "expires_in must be whole seconds from now, or null for never.")
        options["expires_in"] = expires
    return options


def share_id_of(link: Any) -> str:
    """The id in a pasted link: http(s)://GATEWAY/s/ID (any host: only the id is used), or the
    bare id."""
    if not isinstance(link, str) or len(link) > 2048:
        raise Refused(400, "link must be the shared link, e.g. https://GATEWAY/s/ID.")
    text = link.strip()
    if SHARE_ID.fullmatch(text):
        return text
    parts = urllib.parse.urlsplit(text)
    segments = parts.path.rstrip("/").split("/")
    if (
        parts.scheme in ("http", "https")
        and len(segments) >= 2
        and segments[-2] == "s"
        and SHARE_ID.fullmatch(segments[-1])
    ):
        return segments[-1]
    raise Refused(
        400, "That is not a shared notebook link: paste it as it was given, "
        "https://GATEWAY/s/ID (ID: 32 letters, digits, - and _).",
    )  # fmt: skip


def copy_name(name: Any) -> str:
    """A safe file name for the copy: the sharer's name without folders or leading dots."""
    text = posixpath.basename(str(name or "").replace("\\", "/"))
    text = "".join(c for c in text if c.isprintable()).strip().lstrip(".")[:200]
    if not text.endswith(".ipynb"):
        text = (text or "shared") + ".ipynb"
    return text if text != ".ipynb" else "shared.ipynb"


class SharesBase(GpupoolHandler):
    """Like GpupoolHandler, but with a bounded JSON body."""

    async def answer_with(self, call: Any) -> None:
        try:
            result = await call
        except Refused as error:
            self.set_status(error.status)
            self.finish(json.dumps({"reason": "refused", "message": error.message}))
            return
        except GatewayUnavailable as error:
            self.set_status(error.status)
            self.finish(json.dumps({"reason": error.reason, "message": error.message}))
            return
        except ShareError as error:  # the kernel could not say its packages
            self.set_status(409)
            message = f"Could not ask the notebook's kernel for its packages: {error}"
            token = self.gateway.config.token or os.environ.get(TOKEN_ENV, "")
            self.finish(json.dumps({"reason": "kernel did not answer",
                                    "message": _scrub(message, token)}))  # fmt: skip
            return
        self.finish(json.dumps(result))

    def gateway_id(self, kernel_id: str) -> str | None:
        """The pool's id of this server's kernel; None for a local one; 404 for none."""
        try:
            return pool_kernel_id(self, kernel_id)
        except tornado.web.HTTPError:
            raise Refused(404, "No such kernel in this Jupyter server; start the notebook's "
                          "kernel and try again.") from None  # fmt: skip

    async def environment(self, kernel_id: str) -> dict[str, Any]:
        """The Python version and packages the kernel reports, asked as `gpupool share` asks."""
        remote = self.gateway_id(kernel_id)
        if remote is not None:
            url, token = self.gateway.target()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, ask_environment, GatewayApi(url, token), remote)
        return await self.local_environment(kernel_id)

    async def local_environment(self, kernel_id: str) -> dict[str, Any]:
        """The same question, to a kernel on this machine, over its own ZMQ channels."""
        client = self.kernel_manager.get_kernel(kernel_id).client()
        client.start_channels()
        try:
            msg_id = client.execute(
                "", silent=True, store_history=False, allow_stdin=False, stop_on_error=False,
                user_expressions={"environment": ENVIRONMENT_EXPRESSION},
            )  # fmt: skip
            deadline = time.monotonic() + ASK_TIMEOUT_S
            while True:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    reply = await ensure_async(client.get_shell_msg(timeout=left))
                except (TimeoutError, asyncio.TimeoutError) as error:
                    raise ShareError(
                        f"the kernel did not answer within {ASK_TIMEOUT_S:.0f} s; is it busy?"
                    ) from error
                except Exception as error:  # queue.Empty from a blocking client
                    if type(error).__name__ != "Empty":
                        raise
                    raise ShareError(
                        f"the kernel did not answer within {ASK_TIMEOUT_S:.0f} s; is it busy?"
                    ) from None
                if reply.get("parent_header", {}).get("msg_id") == msg_id:
                    return environment_of(reply.get("content") or {}, kernel_id)
        finally:
            client.stop_channels()

    async def notebook(self, path: str) -> dict[str, Any]:
        """The notebook at `path` in this workspace, bounded, as its JSON."""
        manager = self.contents_manager
        try:
            model = await ensure_async(manager.get(path, content=False))
        except tornado.web.HTTPError as error:
            if error.status_code == 404:
                raise Refused(404, f"No file {path!r} in your workspace.") from None
            raise Refused(400, f"Cannot read {path!r}: {error.log_message}") from None
        if model.get("type") != "notebook":
            raise Refused(400, f"{path!r} is not a notebook (.ipynb).")
        size, limit = model.get("size") or 0, self.gateway.config.max_share_mb
        if size > limit * 1e6:
            raise Refused(413, f"{path!r} is {size / 1e6:.1f} MB; a share may be at most "
                          f"{limit:g} MB here. Clear large outputs and save it, then share "
                          "again.")  # fmt: skip
        try:
            model = await ensure_async(manager.get(path, content=True, type="notebook"))
        except tornado.web.HTTPError as error:
            raise Refused(400, f"{path!r} is not a readable notebook: "
                          f"{str(error.log_message)[:200]}") from None  # fmt: skip
        return json.loads(json.dumps(model["content"]))


class SharesHandler(SharesBase):
    """POST /gpupool/shares: share a notebook of this workspace; the answer holds the link."""

    @tornado.web.authenticated
    async def post(self) -> None:
        await self.answer_with(self.create())

    async def create(self) -> dict[str, Any]:
        data = read_body(
            self.request.body, {"path"},
            {"kernel_id", "mode", "outputs", "access", "tenants", "expires_in"},
        )  # fmt: skip
        path = workspace_path(data["path"])
        options = share_options(data)
        kernel_id = kernel_id_of(data["kernel_id"]) if data.get("kernel_id") else None
        url, _token = self.gateway.target()  # 503 before reading anything when not configured
        notebook = await self.notebook(path)
        body: dict[str, Any] = {"notebook": notebook, "name": posixpath.basename(path), **options}
        if kernel_id is not None:
            remote = self.gateway_id(kernel_id)
            name = self.kernel_manager.get_kernel(kernel_id).kernel_name if remote is None else ""
            if remote is not None:
                model = await self.gateway.get(f"/api/kernels/{urllib.parse.quote(remote)}")
                name = str(model.get("name") or "")
            if shape_of_kernel_name(name) is None:
                raise Refused(400, f"This notebook's kernel {name[:80]!r} is neither a pool GPU "
                              "kernel nor Python 3: change its kernel to a pool shape (GPU Pool: "
                              "Change Kernel to a GPU Shape…) and share again.")  # fmt: skip
            body["kernel_name"] = name
            body["environment"] = await self.environment(kernel_id)
        made = await self.gateway.call(
            "POST", "/api/shares", body, timeout=SHARE_TIMEOUT_S, passthrough=(400, 413)
        )
        self.log.info("gpupool: shared %s as a %s link (%s…)", path, made.get("mode"),
                      str(made.get("id", ""))[:4])  # fmt: skip
        packages = len((body.get("environment") or {}).get("packages") or {})
        return {**made, "link": url + str(made.get("path", "")), "packages": packages}


class OpenShareHandler(SharesBase):
    """POST /gpupool/shares/open: your own copy of a run link, written to your workspace and set
    to the local kernelspec of the link's shape."""

    @tornado.web.authenticated
    async def post(self) -> None:
        await self.answer_with(self.open_copy())

    async def open_copy(self) -> dict[str, Any]:
        data = read_body(self.request.body, {"link"}, {"directory"})
        share_id = share_id_of(data["link"])
        directory = workspace_path(data.get("directory", ""), "directory")
        manager = self.contents_manager
        if directory and not await ensure_async(manager.dir_exists(directory)):
            raise Refused(404, f"No folder {directory!r} in your workspace.")
        url, _token = self.gateway.target()
        try:
            got = await self.gateway.call(
                "POST", f"/api/shares/{share_id}/copies", {}, max_bytes=MAX_COPY_BYTES,
                timeout=SHARE_TIMEOUT_S, passthrough=(403,),
            )  # fmt: skip
        except GatewayUnavailable as error:
            if error.status == 404:
                raise Refused(404, f"No shared notebook at that link on the gateway at {url}: "
                              "it may be mistyped, revoked or expired, or not shared with you."
                              ) from None  # fmt: skip
            raise
        notebook, kernel_name = got.get("notebook"), str(got.get("kernel_name") or "")
        share = got.get("share") or {}
        if not isinstance(notebook, dict) or shape_of_kernel_name(kernel_name) is None:
            raise GatewayUnavailable(
                502, "bad gateway answer", f"The gateway at {url} answered no notebook copy."
            )
        local_name, display = await self.local_kernel(kernel_name, got)
        metadata = notebook.setdefault("metadata", {})
        metadata["kernelspec"] = {"name": local_name, "display_name": display,
                                  "language": "python"}  # fmt: skip
        # Where it came from and what it ran with; not the link (its id is the secret).
        metadata[METADATA_KEY] = {"shared": {
            "name": share.get("name"), "shared_by": share.get("shared_by"),
            "created": share.get("created"), "kernel_name": kernel_name,
            "python": got.get("python"), "packages": got.get("packages") or {},
        }}  # fmt: skip
        path = await self.free_path(directory, copy_name(share.get("name")))
        await ensure_async(
            manager.save({"type": "notebook", "format": "json", "content": notebook}, path)
        )
        self.log.info("gpupool: wrote a shared notebook's copy to %s (%s)", path, kernel_name)
        return {
            "path": path, "kernel_name": local_name, "kernel_display_name": display,
            "gpu_type": got.get("gpu_type"), "gpu_count": got.get("gpu_count"),
            "shared_by": share.get("shared_by"), "name": share.get("name"),
            "created": share.get("created"), "python": got.get("python"),
            "packages": len(got.get("packages") or {}),
        }  # fmt: skip

    async def local_kernel(self, kernel_name: str, got: dict[str, Any]) -> tuple[str, str]:
        """The kernelspec this server knows the shape by, and its display name. Beside local
        kernels the pool's kernelspecs may not be synced yet: sync once, then look again."""
        for attempt in range(2):
            try:
                specs = dict(await ensure_async(self.kernel_spec_manager.get_all_specs()) or {})
            except Exception:
                specs = {}
            if kernel_name == "python3":
                found: str | None = "python3" if "python3" in specs else None
            else:
                found = _local_name(specs, kernel_name, str(got.get("gpu_type") or ""),
                                    int(got.get("gpu_count") or 0))  # fmt: skip
            if found is not None:
                spec = (specs.get(found) or {}).get("spec") or {}
                return found, str(spec.get("display_name") or found)
            if attempt == 0 and _gateway_client(self.serverapp) is None:
                await asyncio.get_running_loop().run_in_executor(
                    None, sync_pool_kernelspecs, self.log
                )
        raise Refused(409, f"This Jupyter server has no kernel {kernel_name!r}, the shape the "
                      "notebook was shared with; the pool may not offer it now. Try again when "
                      "it does (GPU Pool in the launcher lists the shapes).")  # fmt: skip

    async def free_path(self, directory: str, name: str) -> str:
        manager = self.contents_manager
        stem = name[: -len(".ipynb")]
        for n in range(MAX_COPY_TRIES):
            candidate = posixpath.join(directory, name if n == 0 else f"{stem}-{n}.ipynb")
            if not await ensure_async(manager.file_exists(candidate)):
                return candidate
        raise Refused(409, f"{name} and {MAX_COPY_TRIES - 1} numbered copies exist already; "
                      "remove some, or open it into another folder.")  # fmt: skip


class DifferencesHandler(SharesBase):
    """POST /gpupool/shares/differences: the packages of a copy's share against its kernel's."""

    @tornado.web.authenticated
    async def post(self) -> None:
        await self.answer_with(self.differences())

    async def differences(self) -> dict[str, Any]:
        data = read_body(self.request.body, {"path", "kernel_id"}, set())
        path, kernel_id = workspace_path(data["path"]), kernel_id_of(data["kernel_id"])
        self.gateway_id(kernel_id)  # 404 before reading, for a kernel this server lacks
        notebook = await self.notebook(path)
        shared = ((notebook.get("metadata") or {}).get(METADATA_KEY) or {}).get("shared")
        if not isinstance(shared, dict):
            raise Refused(400, f"{path!r} is not a copy of a shared notebook (Open Shared "
                          "Notebook… makes one).")  # fmt: skip
        theirs = shared.get("packages") or {}
        if not isinstance(theirs, dict) or not theirs:
            return {"recorded": False, "python": {"shared": shared.get("python"), "yours": None},
                    "differ": [], "same": 0}  # fmt: skip
        theirs = {str(k): str(v) for k, v in theirs.items()}
        mine = await self.environment(kernel_id)
        differ = package_differences(theirs, mine.get("packages") or {})
        return {
            "recorded": True,
            "python": {"shared": shared.get("python"), "yours": mine.get("python")},
            "differ": [{"name": n, "shared": v, "yours": y} for n, v, y in differ],
            "same": len(theirs) - len(differ),
        }


def handlers(base: str) -> list[tuple[str, Any]]:
    from jupyter_server.utils import url_path_join

    return [
        (url_path_join(base, "shares"), SharesHandler),
        (url_path_join(base, "shares", "open"), OpenShareHandler),
        (url_path_join(base, "shares", "differences"), DifferencesHandler),
    ]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """The second extension point of `jupyter_ext`, loaded after `server_extension`'s."""
    from jupyter_server.utils import url_path_join

    web_app = serverapp.web_app
    web_app.add_handlers(".*$", handlers(url_path_join(web_app.settings["base_url"], "gpupool")))
