"""gpupool's GPU host agent: one machine's GPUs, its kernel processes and their warm pool."""

__version__ = "0.1.0"
