"""Shared notebook links against a real gateway process: share, list, page, copy, revoke, expire,
restart; bad input answered clearly and nothing stored for it."""

from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import Gateway, Reply, start_gateway
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from kernel_gateway.shares import new_share_id

ENVIRONMENT = {"python": "3.12.3", "packages": {"numpy": "2.1.0", "torch": "2.5.1"}}


def notebook(**metadata: Any) -> dict[str, Any]:
    nb = new_notebook(
        cells=[
            new_markdown_cell("# Training run"),
            new_code_cell(
                "print('loss 0.25')",
                execution_count=1,
                outputs=[new_output("stream", name="stdout", text="loss 0.25\n")],
            ),
        ],
        metadata={"kernelspec": {"name": "python3-gpu-h100-x1", "display_name": "H100",
                                 "language": "python"}, **metadata},
    )  # fmt: skip
    return json.loads(nbformat.writes(nb))


def share(gw: Gateway, token: str, **options: Any) -> Reply:
    body = {"notebook": notebook(), "name": "train.ipynb", "environment": ENVIRONMENT, **options}
    return gw.call("POST", "/api/shares", body, token=token)


def page(gw: Gateway, path: str, token: str = "") -> Reply:
    headers = {"Authorization": f"token {token}"} if token else {}
    request = urllib.request.Request(gw.url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.read().decode(), dict(response.headers))
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read().decode(), dict(error.headers))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # Sweeps for the snapshots of ended links every 0.2 s (60 s by default), so that tests
    # await a sweep in well under a second.
    gateway = start_gateway(tmp_path_factory.mktemp("shares"), "--max-share-mb", "1",
                            "--auth-failures-per-minute", "0",
                            "--share-sweep-seconds", "0.2")  # fmt: skip
    gateway.token = gateway.tenant("alice")
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def bob(gw: Gateway) -> str:
    return gw.tenant("bob")


@pytest.fixture(scope="module")
def carol(gw: Gateway) -> str:
    return gw.tenant("carol")


def test_share_lists_renders_copies_and_counts(gw: Gateway, bob: str) -> None:
    made = share(gw, gw.token, mode="run", access="gateway")
    assert made.status == 201, made.body
    link = made.body
    assert len(link["id"]) == 32 and link["path"] == f"/s/{link['id']}"
    assert (link["kernel_name"], link["gpu_type"], link["gpu_count"]) == (
        "python3-gpu-h100-x1", "H100", 1)  # fmt: skip
    assert link["shared_by"] == "alice" and link["expires"] is None

    seen = page(gw, link["path"], bob)
    assert seen.status == 200, seen.body
    assert "loss 0.25" in seen.body and "H100 ×1" in seen.body  # noqa: RUF001
    assert "torch" in seen.body and "2.5.1" in seen.body and "alice" in seen.body
    assert "Open in JupyterLab" in seen.body and f'data-gpupool-share="{link["id"]}"' in seen.body

    copy = gw.call("POST", f"/api/shares/{link['id']}/copies", token=bob)
    assert copy.status == 201, copy.body
    assert copy.body["kernel_name"] == "python3-gpu-h100-x1"
    assert copy.body["packages"] == ENVIRONMENT["packages"]
    assert copy.body["python"] == "3.12.3"
    copied = nbformat.from_dict(copy.body["notebook"])
    nbformat.validate(copied)
    assert "".join(copied.cells[1].outputs[0].text) == "loss 0.25\n"

    listed = gw.call("GET", "/api/shares").body
    mine = next(s for s in listed if s["id"] == link["id"])
    assert (mine["views"], mine["runs"]) == (1, 1)
    assert gw.call("GET", "/api/shares", token=bob).body == []  # only one's own


def test_snapshot_is_private_content_addressed_and_outputs_can_be_stripped(gw: Gateway) -> None:
    nb = notebook()
    kept = share(gw, gw.token, notebook=nb).body
    stripped = share(gw, gw.token, notebook=nb, outputs="strip").body
    assert stripped["outputs"] == "strip" and stripped["size"] < kept["size"]
    folder = gw.state_dir / "shares"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert all(stat.S_IMODE(p.parent.stat().st_mode) == 0o700 for p in files)
    again = share(gw, gw.token, notebook=nb).body  # the same notebook again: the same file
    assert sorted(p for p in folder.rglob("*") if p.is_file()) == files
    assert again["id"] != kept["id"]
    copy = gw.call("POST", f"/api/shares/{stripped['id']}/copies")
    assert copy.status == 403  # a view link; its own sharer gets no copy either
    assert "loss 0.25\n</pre>" in page(gw, kept["path"], gw.token).body
    assert "loss 0.25\n</pre>" not in page(gw, stripped["path"], gw.token).body


def test_anyone_links_open_without_a_token_and_set_no_cookie(gw: Gateway) -> None:
    link = share(gw, gw.token, access="anyone").body
    seen = page(gw, link["path"])
    assert seen.status == 200
    assert "Set-Cookie" not in seen.headers
    assert seen.headers["X-Content-Type-Options"] == "nosniff"
    assert seen.headers["Referrer-Policy"] == "no-referrer"
    assert "sandbox" in seen.headers["Content-Security-Policy"]
    assert "Open in JupyterLab" not in seen.body  # a view link


def test_restricted_revoked_expired_and_unknown_are_the_same_404(
    gw: Gateway, bob: str, carol: str
) -> None:
    never = page(gw, "/s/" + "A" * 32)
    assert never.status == 404
    for_bob = share(gw, gw.token, access="tenants", tenants=["bob"], mode="run").body
    for_tenants = share(gw, gw.token, access="gateway").body
    revoked = share(gw, gw.token, access="anyone").body
    assert gw.call("DELETE", f"/api/shares/{revoked['id']}").status == 204
    expired = share(gw, gw.token, access="anyone", expires_in=3600).body
    # As if an hour went by.
    gw.sql("UPDATE shares SET expires = :t WHERE id = :id", t=time.time() - 1, id=expired["id"])
    assert page(gw, for_bob["path"], bob).status == 200
    assert page(gw, for_bob["path"], gw.token).status == 200  # the sharer
    refusals = [
        page(gw, for_bob["path"], carol),  # another tenant
        page(gw, for_bob["path"]),  # no token
        page(gw, for_bob["path"], "not-a-token"),  # a wrong one
        page(gw, for_tenants["path"]),  # tenants only, no token
        page(gw, revoked["path"]),
        page(gw, expired["path"]),
        page(gw, for_bob["path"] + "?token=" + bob),  # tokens count only in the header
    ]
    assert [r.status for r in refusals] == [404] * len(refusals)
    assert {r.body for r in refusals} == {never.body}
    copies = [gw.call("POST", f"/api/shares/{s['id']}/copies", token=carol)
              for s in (for_bob, revoked, expired)]  # fmt: skip
    copies.append(gw.call("POST", "/api/shares/" + "A" * 32 + "/copies", token=carol))
    assert [c.status for c in copies] == [404] * 4
    assert len({c.body["message"] for c in copies}) == 1
    listed = {s["id"]: s for s in gw.call("GET", "/api/shares").body}
    assert revoked["id"] not in listed and listed[expired["id"]]["expired"] is True
    assert gw.call("DELETE", f"/api/shares/{revoked['id']}").status == 404  # already
    assert gw.call("DELETE", f"/api/shares/{for_bob['id']}", token=bob).status == 404  # not his
    assert page(gw, for_bob["path"], bob).status == 200


def test_a_view_link_gives_another_tenant_no_copy(gw: Gateway, bob: str) -> None:
    link = share(gw, gw.token, mode="view", access="anyone").body
    refused = gw.call("POST", f"/api/shares/{link['id']}/copies", token=bob)
    assert refused.status == 403
    assert "view-only" in refused.body["message"] and "notebook" not in refused.body
    assert gw.call("POST", f"/api/shares/{link['id']}/copies", token="").status == 401


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"notebook": {"nbformat": 4, "cells": "nope"}}, "not valid nbformat 4"),
        ({"notebook": {"nbformat": 3, "worksheets": []}}, "nbformat 4"),
        ({"notebook": "print(1)"}, "notebook's JSON"),
        ({"mode": "edit"}, "mode must be"),
        ({"access": "everyone"}, "access must be"),
        ({"access": "tenants"}, "tenants to share with"),
        ({"access": "tenants", "tenants": ["Not A Name"]}, "not a tenant name"),
        ({"expires_in": 1}, "expires_in"),
        ({"expires_in": True}, "expires_in"),
        ({"outputs": "some"}, "keep or strip"),
        ({"name": "../x.ipynb"}, "file name"),
        ({"kernel_name": "python3-gpu-h100-x1; rm"}, "not a gateway kernelspec"),
        ({"environment": {"packages": {"numpy": 2}}}, "version of numpy"),
        ({"environment": {"packages": {"<script>": "1"}}}, "not a package name"),
        ({"environment": "numpy==2"}, "environment must be"),
    ],
)
def test_bad_requests_are_400_and_store_nothing(
    gw: Gateway, change: dict[str, Any], words: str
) -> None:
    before = gw.call("GET", "/api/shares").body
    reply = share(gw, gw.token, **change)
    assert reply.status == 400, reply.body
    assert words in reply.body["message"]
    assert gw.call("GET", "/api/shares").body == before


def test_a_notebook_of_a_local_kernel_needs_a_shape(gw: Gateway) -> None:
    body = {"notebook": notebook(kernelspec={"name": "conda-env-x", "display_name": "x"})}
    refused = gw.call("POST", "/api/shares", body)
    assert refused.status == 400 and "send kernel_name" in refused.body["message"]
    made = gw.call("POST", "/api/shares", {**body, "kernel_name": "python3"})
    assert made.status == 201 and made.body["gpu_count"] == 0
    assert "not recorded" in page(gw, made.body["path"], gw.token).body


def test_oversized_is_413_before_reading_and_stores_nothing(gw: Gateway) -> None:
    files = sorted((gw.state_dir / "shares").rglob("*"))
    # A Content-Length over the limit is refused from the headers alone: no body is sent.
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /api/shares HTTP/1.1\r\nHost: {host}\r\nAuthorization: token {gw.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 60000000\r\n\r\n".encode()
        )
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "a share may be at most 1 MB" in answer
    # Under the body limit, but over the snapshot limit once written out as a .ipynb: 413 too.
    near = notebook()
    near["cells"][1]["outputs"][0]["text"] = "\n" * 150_000  # a line each, in the file
    reply = gw.call("POST", "/api/shares", {"notebook": near})
    assert reply.status == 413, reply.body
    assert "a share may be at most 1 MB" in reply.body["message"]
    assert sorted((gw.state_dir / "shares").rglob("*")) == files


@pytest.mark.slow
def test_shares_survive_a_restart(tmp_path: Path) -> None:
    first = start_gateway(tmp_path)
    token = first.tenant("alice")
    try:
        link = share(first, token, access="anyone").body
        gone = share(first, token, access="anyone").body
        assert first.call("DELETE", f"/api/shares/{gone['id']}", token=token).status == 204
    finally:
        first.stop()
    second = start_gateway(tmp_path, state=first.state_dir)
    try:
        assert page(second, link["path"]).status == 200
        assert page(second, gone["path"]).status == 404
        assert [s["id"] for s in second.call("GET", "/api/shares", token=token).body] == [
            link["id"]
        ]
    finally:
        second.stop()


def test_a_revoked_tenants_links_end_with_it(gw: Gateway) -> None:
    token = gw.tenant("dave")
    link = share(gw, token, access="anyone", mode="run").body
    assert page(gw, link["path"]).status == 200
    revoked = gw.call("DELETE", "/api/admin/tenants/dave", token=gw.admin_token)
    assert revoked.status == 204
    assert page(gw, link["path"]).status == 404
    assert gw.call("POST", f"/api/shares/{link['id']}/copies").status == 404


def test_revoking_the_last_share_of_a_snapshot_deletes_its_file(gw: Gateway) -> None:
    """Content-addressed: two shares of one notebook hold one file, which goes with the last."""
    nb = notebook(title="revoke-me")  # a snapshot no other test shares
    first, second = (share(gw, gw.token, notebook=nb).body for _ in range(2))
    [(digest,)] = gw.sql("SELECT DISTINCT digest FROM shares WHERE id IN (:a, :b)",
                         a=first["id"], b=second["id"])  # fmt: skip
    path = gw.state_dir / "shares" / digest[:2] / digest
    assert path.is_file()
    assert gw.call("DELETE", f"/api/shares/{first['id']}").status == 204
    assert path.is_file()  # the second share still shows it
    assert page(gw, second["path"], gw.token).status == 200
    assert gw.call("DELETE", f"/api/shares/{second['id']}").status == 204
    assert not path.exists()
    assert page(gw, second["path"], gw.token).status == 404
    # Sharing it again stores it again.
    again = share(gw, gw.token, notebook=nb).body
    assert path.is_file() and page(gw, again["path"], gw.token).status == 200


def snapshot_of(gw: Gateway, link: dict[str, Any]) -> Path:
    [(digest,)] = gw.sql("SELECT digest FROM shares WHERE id = :id", id=link["id"])
    return Path(gw.state_dir / "shares" / digest[:2] / digest)


def expire(gw: Gateway, *links: dict[str, Any]) -> None:
    """As if their hour went by (expires_in is at least 60 s)."""
    for link in links:
        gw.sql("UPDATE shares SET expires = :t WHERE id = :id", t=time.time() - 1, id=link["id"])


def test_an_expired_links_snapshot_goes_at_the_next_sweep(gw: Gateway, bob: str) -> None:
    """The file goes once no live link holds it; the link itself answers 404 as before."""
    alone = share(gw, gw.token, notebook=notebook(title="expires-alone"), access="anyone",
                  mode="run", expires_in=3600).body  # fmt: skip
    pair = notebook(title="expires-one-of-two")  # one snapshot file for two links
    first, second = (share(gw, gw.token, notebook=pair, expires_in=3600).body for _ in range(2))
    gone, kept = snapshot_of(gw, alone), snapshot_of(gw, first)
    assert gone.is_file() and kept == snapshot_of(gw, second) and kept.is_file()
    expire(gw, alone, first)
    gw.wait_for(lambda: not gone.exists(), 10, "the sweep to delete the expired snapshot")
    assert kept.is_file()  # the second link still shows it
    assert page(gw, second["path"], bob).status == 200
    never = page(gw, "/s/" + "A" * 32)
    expired = page(gw, alone["path"])
    assert (expired.status, expired.body) == (404, never.body)  # as it answered before
    assert gw.call("POST", f"/api/shares/{alone['id']}/copies", token=bob).status == 404
    listed = {s["id"]: s for s in gw.call("GET", "/api/shares").body}
    assert listed[alone["id"]]["expired"] is True  # its sharer still sees it, expired
    assert gw.call("DELETE", f"/api/shares/{alone['id']}").status == 204  # and may revoke it
    # The last link of the pair expires: the file goes at the next sweep.
    expire(gw, second)
    gw.wait_for(lambda: not kept.exists(), 10, "the sweep to delete the last holder's snapshot")
    assert page(gw, second["path"], bob).status == 404
    # Shared again: stored again.
    again = share(gw, gw.token, notebook=pair).body
    assert kept.is_file() and page(gw, again["path"], bob).status == 200


def test_a_revoked_tenants_snapshots_go_with_it(gw: Gateway) -> None:
    """Revoking a tenant deletes, at once, the snapshots only its links held."""
    token = gw.tenant("erin")
    own = share(gw, token, notebook=notebook(title="erin-only"), access="anyone").body
    common = notebook(title="erin-and-alice")
    theirs = share(gw, token, notebook=common, access="anyone").body
    alices = share(gw, gw.token, notebook=common, access="anyone").body
    own_file, common_file = snapshot_of(gw, own), snapshot_of(gw, theirs)
    assert own_file.is_file() and common_file == snapshot_of(gw, alices)
    assert gw.call("DELETE", "/api/admin/tenants/erin", token=gw.admin_token).status == 204
    assert not own_file.exists()  # deleted by the revocation itself, not a later sweep
    assert common_file.is_file() and page(gw, alices["path"]).status == 200
    assert page(gw, own["path"]).status == 404 and page(gw, theirs["path"]).status == 404


def test_a_bad_sweep_interval_is_refused_at_start(tmp_path: Path) -> None:
    def start(bad: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpupool.cli", "gateway", "--port", "0",
             "--state-dir", str(tmp_path / bad), "--share-sweep-seconds", bad],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    bads = ("0", "-1", "nan", "100000", "soon")
    with ThreadPoolExecutor(len(bads)) as pool:  # each start is mostly imports: side by side
        answers = list(pool.map(start, bads))
    for bad, done in zip(bads, answers, strict=True):
        assert done.returncode != 0, (bad, done.stdout)
        # Out of range: our sentence; not a number: traitlets' own, naming the trait.
        assert re.search(r"share.sweep.seconds", done.stderr), (bad, done.stderr)


def test_share_ids_never_start_with_a_dash() -> None:
    """`gpupool share copy -AbC...` would read the id as an option (1 id in 64 did)."""
    assert not any(new_share_id().startswith("-") for _ in range(2000))
