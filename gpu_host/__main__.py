"""`python -m gpu_host` is `gpupool host`."""

from .app import main

main()
