"""gpupool's notebook side: the %%gpu IPython extension and the Jupyter server extension."""

__version__ = "0.1.0"
