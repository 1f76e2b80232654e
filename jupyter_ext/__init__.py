"""gpupool's notebook side: the %%gpu IPython extension and the Jupyter server extension.

The extension registers `%%gpu` (run a cell on a companion GPU kernel from the gpupool gateway)
and `%gpu status|release|usage|pull|default`. Every ipykernel of the Python environment gpupool
is installed in loads it at start (`etc/ipython/ipython_kernel_config.json`, installed with the
package, lists it in `InteractiveShellApp.extra_extensions`); elsewhere, `%load_ext jupyter_ext`.
Loading imports nothing heavy and reaches no gateway. The gateway's URL and token come from
`c.GpuMagics.gateway_url` / `c.GpuMagics.token`, else GPUPOOL_URL and GPUPOOL_TOKEN, else the
file `gpupool login` writes."""

from __future__ import annotations

import atexit
from typing import Any

__version__ = "0.1.0"

_magics: Any = None


def load_ipython_extension(ipython: Any) -> None:
    global _magics
    from .magics import GpuMagics

    _magics = GpuMagics(ipython)
    ipython.register_magics(_magics)


def unload_ipython_extension(ipython: Any) -> None:
    """`%unload_ext jupyter_ext`: the GPU kernel is shut down and the magics removed."""
    global _magics
    magics, _magics = _magics, None
    if magics is None:
        return
    magics.shutdown()
    atexit.unregister(magics.shutdown)
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("gpu", None)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """The Jupyter server extension: /gpupool/ routes for the Lab front end. The shares routes
    build on the others' handlers, so they load second, from a module of their own."""
    return [{"module": "jupyter_ext.server_extension"}, {"module": "jupyter_ext.lab_shares"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The prebuilt Lab front end (built from labextension/ into jupyter_ext/labextension)."""
    return [{"src": "labextension", "dest": "@gpupool/labextension"}]
