"""`gpupool share` against the embedded stack: share a notebook with the packages asked of a real
running kernel, list, copy, revoke; its --help; bad input said in a sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
from conftest import Gateway
from nbformat.v4 import new_code_cell, new_notebook, new_output


def gpupool_share(
    stack: Gateway, folder: Path, *args: str, token: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    env.update(GPUPOOL_URL=stack.url, GPUPOOL_TOKEN=token or stack.token,
               XDG_CONFIG_HOME=str(folder / "config"))  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "jupyter_ext.share_cli", *args],
        capture_output=True, text=True, env=env, cwd=folder, timeout=120,
    )  # fmt: skip


def write_notebook(path: Path, kernel: str = "python3-gpu-h100-x1") -> Path:
    nb = new_notebook(
        cells=[new_code_cell("1+1", execution_count=1, outputs=[
            new_output("execute_result", execution_count=1, data={"text/plain": "2"})])],
        metadata={"kernelspec": {"name": kernel, "display_name": kernel, "language": "python"}},
    )  # fmt: skip
    path.write_text(nbformat.writes(nb))
    return path


def test_help_of_each_command(stack: Gateway, tmp_path: Path) -> None:
    for args in (["--help"], ["list", "--help"], ["revoke", "--help"], ["copy", "--help"]):
        done = gpupool_share(stack, tmp_path, *args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: gpupool share")
    assert "--strip-outputs" in gpupool_share(stack, tmp_path, "--help").stdout


def test_share_with_packages_asked_of_a_running_kernel(stack: Gateway, tmp_path: Path) -> None:
    kernel = stack.create(name="python3")
    stack.wait_for(
        lambda: stack.call("GET", f"/api/kernels/{kernel['id']}").body["gpupool"]["state"]
        == "running", what="a CPU kernel running",
    )  # fmt: skip
    notebook = write_notebook(tmp_path / "train.ipynb")
    done = gpupool_share(stack, tmp_path, str(notebook), "--run", "--expires", "7d",
                         "--kernel", kernel["id"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    link = done.stdout.splitlines()[0]
    share_id = link.rsplit("/s/", 1)[1]
    assert link == f"{stack.url}/s/{share_id}"
    assert "run link to train.ipynb on python3, for any tenant" in done.stdout
    copied = stack.call("POST", f"/api/shares/{share_id}/copies", token=stack.tenant("viewer"))
    assert copied.status == 201, copied.body
    assert copied.body["kernel_name"] == "python3"  # the kernel's shape, not the file's
    assert "ipykernel" in copied.body["packages"]  # what that kernel has installed
    assert copied.body["python"].count(".") == 2

    listed = gpupool_share(stack, tmp_path, "list")
    assert share_id in listed.stdout and "VIEWS" in listed.stdout

    out = tmp_path / "copy.ipynb"
    done = gpupool_share(stack, tmp_path, "copy", link, "-o", str(out),  # the link, pasted
                         "--kernel", kernel["id"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "your kernel has the same package versions" in done.stdout
    saved = nbformat.read(out, as_version=4)
    assert saved.metadata.kernelspec.name == "python3"
    assert gpupool_share(stack, tmp_path, "copy", share_id, "-o", str(out)).returncode == 1

    assert gpupool_share(stack, tmp_path, "revoke", share_id).returncode == 0
    gone = gpupool_share(stack, tmp_path, "revoke", share_id)
    assert gone.returncode == 1 and "404" in gone.stderr
    stack.call("DELETE", f"/api/kernels/{kernel['id']}")


def test_access_options_and_stripped_outputs(stack: Gateway, tmp_path: Path) -> None:
    notebook = write_notebook(tmp_path / "n.ipynb")
    done = gpupool_share(stack, tmp_path, str(notebook), "--tenants", "alice,bob",
                         "--strip-outputs")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "view link" in done.stdout and "for tenants alice, bob" in done.stdout
    assert "no package list (pass --kernel ID)" in done.stdout
    shares = stack.call("GET", "/api/shares").body
    made = next(s for s in shares if done.stdout.startswith(f"{stack.url}{s['path']}"))
    assert (made["access"], made["outputs"], made["tenants"]) == ("tenants", "strip",
                                                                  ["alice", "bob"])  # fmt: skip
    anyone = gpupool_share(stack, tmp_path, str(notebook), "--anyone")
    assert "for anyone with the link" in anyone.stdout


def test_bad_input_is_a_sentence(stack: Gateway, tmp_path: Path) -> None:
    (tmp_path / "bad.ipynb").write_text("not json")
    local = write_notebook(tmp_path / "local.ipynb", kernel="conda-env-x")
    cases = [
        ([str(tmp_path / "missing.ipynb")], "no file"),
        ([str(tmp_path / "bad.ipynb")], "is not a notebook"),
        ([str(local)], "send kernel_name"),
        ([str(local), "--expires", "soon"], "--expires 'soon'"),
        ([str(local), "--kernel", "0" * 8 + "-0000-0000-0000-" + "0" * 12], "you have no kernel"),
    ]
    for args, words in cases:
        done = gpupool_share(stack, tmp_path, *args)
        assert done.returncode == 1 and words in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    wrong = gpupool_share(stack, tmp_path, "list", token="wrong")
    assert wrong.returncode == 1 and "does not accept this tenant token" in wrong.stderr
