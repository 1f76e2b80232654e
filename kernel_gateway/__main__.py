"""`python -m kernel_gateway` is `gpupool`."""

from .cli import main

main()
