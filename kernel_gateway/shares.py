"""Shared notebook links: immutable snapshots of a notebook with its kernel shape and packages,
behind an unguessable id. Who may open one is checked here, once, for the page and the API alike;
a link that is revoked, expired, not for the caller or never existed is one and the same None."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import nbformat
from sqlalchemy import ColumnElement, and_, not_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gpupool.wire import iso, shape_of_kernel_name

from .errors import ApiError
from .private_files import private_folder
from .store import Share, Tenant

MODES = ("view", "run")
ACCESS = ("anyone", "gateway", "tenants")  # anyone with the link, any tenant, named tenants
SHARE_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")  # secrets.token_urlsafe(24): 192 random bits
TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,23}$")  # as state.TENANT_NAME
PACKAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_PACKAGES = 10_000
MAX_VERSION = 100
MAX_NAMED_TENANTS = 100
MAX_NAME = 255
MIN_EXPIRES, MAX_EXPIRES = 60, 366 * 24 * 3600  # seconds
DEFAULT_MAX_BYTES = 50 * 1000 * 1000
RENDER_CACHE_BYTES = 256 << 20  # rendered pages kept in memory, most recently used first
SWEEP_SECONDS = 60.0  # how often snapshots of links that expired are looked for (--option)

log = logging.getLogger(__name__)


def new_share_id() -> str:
    """192 random bits, never with a leading "-": `gpupool share copy -AbC...` would be read as
    an option."""
    while True:
        share_id = secrets.token_urlsafe(24)
        if not share_id.startswith("-"):
            return share_id


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def read_options(body: dict[str, Any]) -> dict[str, Any]:
    """The share request's options, each checked, with the defaults filled in."""
    mode = body.get("mode", "view")
    if mode not in MODES:
        raise _bad(f"mode must be one of {', '.join(MODES)}; got {str(mode)[:20]!r}.")
    access = body.get("access", "gateway")
    if access not in ACCESS:
        raise _bad(
            f"access must be anyone (anyone with the link), gateway (any tenant of this gateway) "
            f"or tenants (those named in tenants); got {str(access)[:20]!r}."
        )
    tenants = body.get("tenants") or []
    if not isinstance(tenants, list) or len(tenants) > MAX_NAMED_TENANTS:
        raise _bad(f"tenants must be a list of at most {MAX_NAMED_TENANTS} tenant names.")
    for name in tenants:
        if not isinstance(name, str) or not TENANT_NAME.match(name):
            raise _bad(f"{str(name)[:40]!r} in tenants is not a tenant name.")
    if access == "tenants" and not tenants:
        raise _bad("access tenants needs the tenants to share with: tenants: [NAME, ...].")
    if access != "tenants" and tenants:
        raise _bad("tenants is only for access tenants; leave it out or set access to tenants.")
    expires_in = body.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, (int, float))
        or not MIN_EXPIRES <= expires_in <= MAX_EXPIRES
    ):
        raise _bad(
            f"expires_in is seconds from now, {MIN_EXPIRES} to {MAX_EXPIRES} (366 days), or "
            "null for a link that does not expire."
        )
    outputs = body.get("outputs", "keep")
    if outputs not in ("keep", "strip"):
        raise _bad("outputs must be keep or strip.")
    name = body.get("name", "notebook.ipynb")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or "/" in name or "\0" in name:
        raise _bad(f"name must be a file name (no /) of at most {MAX_NAME} characters.")
    return {"mode": mode, "access": access, "tenants": sorted(set(tenants)), "name": name,
            "expires_in": expires_in, "outputs": outputs == "keep"}  # fmt: skip


def read_environment(value: Any) -> dict[str, Any] | None:
    """What the sharer's kernel reported: {"python": "3.12.3", "packages": {name: version}}."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"python", "packages"}:
        raise _bad('environment must be {"python": VERSION, "packages": {NAME: VERSION}}.')
    python = value.get("python", "")
    if not isinstance(python, str) or len(python) > MAX_VERSION:
        raise _bad(f"environment.python must be a version of at most {MAX_VERSION} characters.")
    packages = value.get("packages") or {}
    if not isinstance(packages, dict) or len(packages) > MAX_PACKAGES:
        raise _bad(f"environment.packages must map at most {MAX_PACKAGES} names to versions.")
    for key, version in packages.items():
        if not PACKAGE_NAME.match(key):
            raise _bad(f"{key[:40]!r} in environment.packages is not a package name.")
        if not isinstance(version, str) or len(version) > MAX_VERSION:
            raise _bad(
                f"the version of {key} must be a string of at most {MAX_VERSION} characters."
            )
    ordered = dict(sorted(packages.items(), key=lambda kv: kv[0].lower()))
    return {"python": python, "packages": ordered}


def read_notebook(value: Any) -> nbformat.NotebookNode:
    """The notebook as nbformat 4, validated, or 400 saying what is wrong with it."""
    if not isinstance(value, dict):
        raise _bad("notebook must be the notebook's JSON (the content of the .ipynb file).")
    if value.get("nbformat") != 4:
        raise _bad(
            f"the notebook is nbformat {str(value.get('nbformat'))[:10]}; share an nbformat 4 "
            "notebook (open and save it in JupyterLab to convert it)."
        )
    notebook = nbformat.from_dict(value)
    try:
        nbformat.validate(notebook)
    except nbformat.ValidationError as error:
        raise _bad(f"the notebook is not valid nbformat 4: {str(error.message)[:300]}") from None
    return notebook


def strip_outputs(notebook: nbformat.NotebookNode) -> None:
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None


def kernel_name_of(body: dict[str, Any], notebook: nbformat.NotebookNode) -> str:
    """The shape to run it on: `kernel_name`, else the notebook's own kernelspec when it is one
    of the gateway's names (python3, python3-gpu-TYPE-xN)."""
    name = body.get("kernel_name")
    if name is not None:
        if not isinstance(name, str) or shape_of_kernel_name(name) is None:
            raise _bad(
                f"kernel_name {str(name)[:80]!r} is not a gateway kernelspec: use python3 (CPU) "
                "or python3-gpu-TYPE-xCOUNT, e.g. python3-gpu-h100-x1."
            )
        return name
    own = str(notebook.metadata.get("kernelspec", {}).get("name", ""))
    if shape_of_kernel_name(own) is not None:
        return own
    raise _bad(
        f"the notebook's kernelspec {own[:80]!r} is not one of this gateway's; send kernel_name: "
        "python3 (CPU) or python3-gpu-TYPE-xCOUNT, e.g. python3-gpu-h100-x1."
    )


class Shares:
    """Share rows in the database, snapshots in `folder` (0700, files 0600), renderings cached."""

    def __init__(self, db: sessionmaker[Session], folder: Path, max_bytes: int) -> None:
        self.db = db
        self.folder = folder
        self.max_bytes = max_bytes
        self._rendered: OrderedDict[str, str] = OrderedDict()  # snapshot digest -> page body
        self._rendering: dict[str, asyncio.Future[str]] = {}

    def too_big(self, size: int) -> ApiError:
        return ApiError(
            413, f"the notebook is {size / 1e6:.1f} MB; a share may be at most "
            f"{self.max_bytes / 1e6:.0f} MB. Share it with outputs stripped, or clear large "
            "outputs first.",
        )  # fmt: skip

    # -- snapshots -------------------------------------------------------------------------

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / digest

    def _store(self, data: bytes) -> str:
        """Write the snapshot under its sha256 (once: equal snapshots share one file)."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not path.exists():
            private_folder(self.folder)
            private_folder(path.parent)
            temp = path.with_name(f".{digest}.{secrets.token_hex(4)}")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temp, path)
        return digest

    def snapshot(self, share: Share) -> bytes:
        return self._path(share.digest).read_bytes()

    # -- the API ---------------------------------------------------------------------------

    def create(self, tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
        options = read_options(body)
        environment = read_environment(body.get("environment"))
        notebook = read_notebook(body.get("notebook"))
        kernel_name = kernel_name_of(body, notebook)
        if not options["outputs"]:
            strip_outputs(notebook)
        data = nbformat.writes(notebook).encode()
        if len(data) > self.max_bytes:
            raise self.too_big(len(data))
        shape = shape_of_kernel_name(kernel_name)
        assert shape is not None  # kernel_name_of checked it
        now = time.time()
        share = Share(
            id=new_share_id(), tenant_id=tenant.id, name=options["name"], digest=self._store(data),
            size=len(data), outputs=options["outputs"], mode=options["mode"],
            access=options["access"], tenants=options["tenants"], kernel_name=kernel_name,
            gpu_type=shape.gpu_type, gpu_count=shape.gpu_count, environment=environment,
            created=now,
            expires=now + options["expires_in"] if options["expires_in"] is not None else None,
        )  # fmt: skip
        with self.db() as s:
            s.add(share)
            s.commit()
        return self.model(share, tenant.name)

    def model(self, share: Share, shared_by: str) -> dict[str, Any]:
        return {
            "id": share.id, "path": f"/s/{share.id}", "name": share.name, "mode": share.mode,
            "access": share.access, "tenants": list(share.tenants), "shared_by": shared_by,
            "kernel_name": share.kernel_name, "gpu_type": share.gpu_type,
            "gpu_count": share.gpu_count, "outputs": "keep" if share.outputs else "strip",
            "size": share.size, "created": iso(share.created),
            "expires": iso(share.expires) if share.expires is not None else None,
            "expired": share.expires is not None and share.expires <= time.time(),
            "views": share.views, "runs": share.runs,
        }  # fmt: skip

    def list_for(self, tenant: Tenant) -> list[dict[str, Any]]:
        with self.db() as s:
            rows = s.scalars(
                select(Share)
                .where(Share.tenant_id == tenant.id, Share.revoked.is_(None))
                .order_by(Share.created.desc())
            ).all()
        return [self.model(row, tenant.name) for row in rows]

    def revoke(self, tenant: Tenant, share_id: str) -> None:
        """Revoke at once; the snapshot file goes too when no other live share holds it."""
        live = (Share.id == share_id, Share.tenant_id == tenant.id, Share.revoked.is_(None))
        with self.db() as s:
            digest = s.scalar(select(Share.digest).where(*live))
            done = s.execute(update(Share).where(*live).values(revoked=time.time()))
            s.commit()
        if digest is None or getattr(done, "rowcount", 0) != 1:
            raise not_found()
        self._delete_unheld({digest})

    # -- snapshots no link can show any more ----------------------------------------------

    @staticmethod
    def live_of(now: float) -> ColumnElement[bool]:
        """A share that can still be opened: not revoked, not expired, its tenant not revoked
        (as `open` decides; the query joins Tenant)."""
        return and_(
            Share.revoked.is_(None),
            or_(Share.expires.is_(None), Share.expires > now),
            Tenant.revoked.is_(False),
        )

    def _delete_unheld(self, digests: set[str], now: float | None = None) -> int:
        """Delete the snapshot files among `digests` that no live share holds; how many went.
        Called on the gateway's one event loop with no await inside, as create() is, so no
        share can start holding a digest between the query and the unlink."""
        if not digests:
            return 0
        now = time.time() if now is None else now
        with self.db() as s:
            held = set(
                s.scalars(
                    select(Share.digest)
                    .join(Tenant, Tenant.id == Share.tenant_id)
                    .where(Share.digest.in_(digests), self.live_of(now))
                    .distinct()
                ).all()
            )
        deleted = 0
        for digest in digests - held:
            path = self._path(digest)
            if path.exists():
                path.unlink(missing_ok=True)
                deleted += 1
            self._rendered.pop(digest, None)
        return deleted

    def sweep(self) -> int:
        """Delete the snapshot files of links that expired, were revoked or whose tenant was
        revoked, where no live link holds the same snapshot; how many files went."""
        now = time.time()
        with self.db() as s:
            dead = set(
                s.scalars(
                    select(Share.digest)
                    .join(Tenant, Tenant.id == Share.tenant_id)
                    .where(not_(self.live_of(now)))
                    .distinct()
                ).all()
            )
        deleted = self._delete_unheld(dead, now)
        if deleted:
            log.info("deleted %d snapshot file(s) of expired or revoked shared links", deleted)
        return deleted

    async def sweep_forever(self, every: float) -> None:
        """The gateway's periodic sweep: a link that expires is found within `every` seconds."""
        while True:
            try:
                self.sweep()
            except Exception:
                log.exception("sweeping the snapshots of ended links failed; trying again later")
            await asyncio.sleep(every)

    def open(self, share_id: str, viewer: Tenant | None) -> tuple[Share, str] | None:
        """The share and its sharer's name if `viewer` (None: no token) may open it now."""
        if not SHARE_ID.match(share_id):
            return None
        with self.db() as s:
            share = s.get(Share, share_id)
            owner = s.get(Tenant, share.tenant_id) if share is not None else None
        if share is None or owner is None or owner.revoked or share.revoked is not None:
            return None
        if share.expires is not None and share.expires <= time.time():
            return None
        if share.access == "anyone" or (viewer is not None and viewer.id == share.tenant_id):
            return share, owner.name
        if viewer is None:
            return None
        if share.access == "gateway" or viewer.name in share.tenants:
            return share, owner.name
        return None

    def count(self, share: Share, what: str) -> None:
        column = Share.views if what == "views" else Share.runs
        with self.db() as s:
            s.execute(update(Share).where(Share.id == share.id).values({column: column + 1}))
            s.commit()

    def copy(self, share: Share, shared_by: str) -> dict[str, Any]:
        """What a viewer's client needs to open its own copy: the snapshot, the shape, the
        packages to compare with its kernel's."""
        environment = share.environment or {}
        return {
            "share": self.model(share, shared_by) | {"views": None, "runs": None},
            "notebook": json.loads(self.snapshot(share)),
            "kernel_name": share.kernel_name,
            "gpu_type": share.gpu_type,
            "gpu_count": share.gpu_count,
            "python": environment.get("python"),
            "packages": environment.get("packages"),
        }

    # -- the page --------------------------------------------------------------------------

    async def rendered(self, share: Share) -> str:
        """The notebook as sanitized HTML, rendered once per snapshot (in a thread: a large
        notebook takes seconds) and kept while the cache has room."""
        cached = self._rendered.get(share.digest)
        if cached is not None:
            self._rendered.move_to_end(share.digest)
            return cached
        pending = self._rendering.get(share.digest)
        if pending is None:
            from .share_page import render_notebook

            data = self.snapshot(share)
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(loop.run_in_executor(None, render_notebook, data))
            self._rendering[share.digest] = pending
            try:
                html = await pending
            finally:
                self._rendering.pop(share.digest, None)
            self._rendered[share.digest] = html
            while sum(len(v) for v in self._rendered.values()) > RENDER_CACHE_BYTES:
                self._rendered.popitem(last=False)
            return html
        return await asyncio.shield(pending)


def not_found() -> ApiError:
    """The one answer for a link that is revoked, expired, not for the caller or never was."""
    return ApiError(
        404, "no shared notebook here: the link may be mistyped, revoked or expired, or shared "
        "only with signed-in tenants (send your tenant token: 'Authorization: token T').",
    )  # fmt: skip
