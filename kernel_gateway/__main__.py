"""`python -m kernel_gateway` is `gpupool`."""

from gpupool.cli import main

main()
