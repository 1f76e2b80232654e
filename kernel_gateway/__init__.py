"""gpupool's gateway: the one front door for tenants, over a pool of GPU hosts."""

from pathlib import Path

__version__ = "0.1.0"

# Jupyter Kernel Gateway uses the same import name; pip installing both into one environment
# mixes their files in this folder, and neither works. Say so instead of failing later.
if (Path(__file__).parent / "gatewayapp.py").exists():
    raise ImportError(
        "Jupyter Kernel Gateway (jupyter-kernel-gateway) is installed in the same environment as "
        "gpupool and shares its import name `kernel_gateway`: install them in separate "
        "virtual environments."
    )
