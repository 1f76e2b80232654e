"""gpupool's gateway: the one front door for tenants, over a pool of GPU hosts."""

__version__ = "0.1.0"
