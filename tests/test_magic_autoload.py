"""`%%gpu` in a user's own local kernels with nothing to configure: the IPython kernel config
that gpupool installs (`etc/ipython/ipython_kernel_config.json`, wheel shared-data and `make
install`) makes every ipykernel of that Python environment load the magic at start, without
`%load_ext`. A real local ipykernel, started by jupyter_client from a Python environment of its
own (a venv whose `sys.prefix/etc/ipython` holds the shipped file), reaches the embedded stack
with GPUPOOL_URL/GPUPOOL_TOKEN or the file `gpupool login` writes, takes `%gpu default` (what
JupyterLab's settings send), and without a gateway says so in one line and keeps working."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Gateway, free_port
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

SHIPPED = REPO / "jupyter-config" / "ipython-config" / "ipython_kernel_config.json"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def python_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python environment as installing gpupool leaves it: a venv (its own sys.prefix) with the
    shipped kernel config in etc/ipython, whose site-packages reach this environment's."""
    venv = tmp_path_factory.mktemp("env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    here = sysconfig.get_paths()["purelib"]
    (site / "reach.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    (venv / "etc" / "ipython").mkdir(parents=True)
    shutil.copy(SHIPPED, venv / "etc" / "ipython" / SHIPPED.name)
    return venv


class LocalKernel:
    """The user's `python3` of that environment, as Lab's kernel manager starts it."""

    def __init__(self, venv: Path, folder: Path, env: dict[str, str]) -> None:
        kernels = folder / "kernels"
        (kernels / "python3").mkdir(parents=True, exist_ok=True)
        python = str(venv / "bin" / "python")
        spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (ipykernel)", "language": "python"}  # fmt: skip
        (kernels / "python3" / "kernel.json").write_text(json.dumps(spec))
        self.km = KernelManager(
            kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
        )
        began = time.monotonic()
        self.km.start_kernel(env=env, cwd=str(folder))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.ready_s = time.monotonic() - began

    def run(self, code: str, timeout: float = 120) -> tuple[str, str, list[str]]:
        """Execute `code`: (status, the text it printed or displayed, its error's traceback)."""
        text: list[str] = []
        traceback: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                text.append(content["text"])
            elif msg["msg_type"] in ("display_data", "execute_result", "update_display_data"):
                text.append(str(content.get("data", {}).get("text/plain", "")) + "\n")
            elif msg["msg_type"] == "error":
                traceback.extend(ANSI.sub("", line) for line in content["traceback"])

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"]["status"], "".join(text), traceback

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def user_env(folder: Path, **extra: str) -> dict[str, str]:
    """No GPUPOOL_* unless given: a user's own environment, their own IPython and config dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_", "JUPYTER_"))}
    env.update({
        "HOME": str(folder), "IPYTHONDIR": str(folder / "ipython"),
        "XDG_CONFIG_HOME": str(folder / "config"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    })  # fmt: skip
    env.update(extra)
    return env


@pytest.fixture
def kernels(python_env: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[LocalKernel] = []

    def start(**env: str) -> LocalKernel:
        kernel = LocalKernel(python_env, tmp_path, user_env(tmp_path, **env))
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        kernel.stop()


def no_kernels_left(stack: Gateway) -> None:
    stack.wait_for(lambda: stack.call("GET", "/api/kernels").body == [], 15, "no kernels left")


def test_the_shipped_config_names_the_extension() -> None:
    config = json.loads(SHIPPED.read_text())
    assert config == {"InteractiveShellApp": {"extra_extensions": ["jupyter_ext"]}}


def test_a_local_kernel_has_gpu_without_load_ext(stack: Gateway, kernels: Any) -> None:
    kernel = kernels(GPUPOOL_URL=stack.url, GPUPOOL_TOKEN=stack.token)
    # Loaded lazily: the magic is there, the companion's modules are not, nothing was asked.
    status, text, _ = kernel.run(
        "import sys\nprint(sorted(m for m in ('jupyter_ext.magics', 'jupyter_ext.companion', "
        "'websockets', 'urllib.request') if m in sys.modules))"
    )
    assert status == "ok" and text.strip() == "['jupyter_ext.magics']", text
    assert stack.call("GET", "/api/kernels").body == []
    status, text, error = kernel.run(
        '%%gpu\nimport os; print(os.environ["CUDA_VISIBLE_DEVICES"])'
    )  # fmt: skip
    assert status == "ok", (text, error)
    assert re.search(r"^GPU-\S+$", text, re.MULTILINE), text
    assert stack.token not in text
    status, text, _ = kernel.run("%gpu release")
    assert status == "ok" and "shut down the H100 ×1 GPU kernel" in text, text  # noqa: RUF001
    no_kernels_left(stack)


def test_gpu_default_sets_the_shape_and_idle_timeout(stack: Gateway, kernels: Any) -> None:
    """What JupyterLab's settings send to each local kernel (kernelsetup.ts): a cell that names
    no shape runs on the default; its GPU kernel gets the idle timeout."""
    kernel = kernels(GPUPOOL_URL=stack.url, GPUPOOL_TOKEN=stack.token)
    status, text, _ = kernel.run("%gpu default --reset H100:2 --idle-timeout 77")
    assert status == "ok" and "run on H100 ×2" in text and "after 77 s idle" in text, text  # noqa: RUF001
    status, text, error = kernel.run(
        "%%gpu\nimport os\ngpus = os.environ['CUDA_VISIBLE_DEVICES'].split(',')"
    )
    assert status == "ok", (text, error)
    assert kernel.run("print(len(gpus))")[1].strip() == "2"
    (model,) = stack.call("GET", "/api/kernels").body
    assert (model["gpupool"]["gpu_count"], model["gpupool"]["idle_timeout"]) == (2, 77)
    # A new default never ends the GPU kernel that holds the variables: it applies to the next.
    status, text, _ = kernel.run("%gpu default --reset")
    assert status == "ok" and "run on H100 ×1" in text and "H100 ×2 GPU kernel" in text, text  # noqa: RUF001
    status, text, error = kernel.run("%%gpu\nprint(len(gpus))")
    # (the run's footer line comes after the cell's own output)
    assert status == "ok" and text.splitlines()[0] == "2", (text, error)
    assert [k["id"] for k in stack.call("GET", "/api/kernels").body] == [model["id"]]
    # A shape the cell names is what it gets; -t alone is one GPU.
    status, text, error = kernel.run(
        "%%gpu -t H100\nimport os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])"
    )
    assert status == "ok" and "," not in text.strip().splitlines()[-1], (text, error)
    (model,) = stack.call("GET", "/api/kernels").body
    assert (model["gpupool"]["gpu_count"], model["gpupool"]["idle_timeout"]) == (1, 600)
    status, text, error = kernel.run("%gpu default H1 00")
    assert status == "error" and "UsageError: unrecognized arguments: 00" in text, (text, error)
    kernel.run("%gpu release")
    no_kernels_left(stack)


def test_the_login_file_is_enough(stack: Gateway, kernels: Any, tmp_path: Path) -> None:
    """No GPUPOOL_* in the environment: the file `gpupool login` writes (0600) names both."""
    saved = tmp_path / "config" / "gpupool" / "credentials"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps({"url": stack.url, "token": stack.token}))
    saved.chmod(0o600)
    kernel = kernels()
    status, text, error = kernel.run('%%gpu\nimport os; print(os.environ["CUDA_VISIBLE_DEVICES"])')
    assert status == "ok" and "GPU-" in text, (text, error)
    kernel.run("%gpu release")
    no_kernels_left(stack)


def test_without_a_gateway_one_line_and_the_kernel_works(kernels: Any) -> None:
    kernel = kernels()
    status, text, error = kernel.run("%%gpu\nprint('never runs')")
    assert status == "error" and len(error) == 1, error
    assert "GPUPOOL_URL and GPUPOOL_TOKEN are not set" in error[0], error
    assert "gpupool login --url URL" in error[0] and "never runs" not in text
    assert kernel.run("x = 20\nprint(x + 1)")[1].strip() == "21"
    # A gateway that does not answer: one line too, naming what to check.
    unreachable = f"http://127.0.0.1:{free_port()}"
    status, text, error = kernel.run(
        f"import os\nos.environ['GPUPOOL_URL'] = {unreachable!r}\n"
        "os.environ['GPUPOOL_TOKEN'] = 'not-a-real-token'"
    )
    assert status == "ok", error
    status, text, error = kernel.run("%%gpu\nprint('never runs')")
    assert status == "error" and len(error) == 1, error
    assert f"cannot reach the gateway at {unreachable}" in error[0], error
    assert "Is the gateway running, and is GPUPOOL_URL right?" in error[0]
    assert "not-a-real-token" not in error[0]
    assert kernel.run("print(x * 2)")[1].strip() == "40"
    status, text, _ = kernel.run("%gpu status")
    assert status == "ok" and "no GPU kernel yet" in text, text
