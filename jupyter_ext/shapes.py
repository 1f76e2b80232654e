"""A GPU shape (gpupool.wire.Shape) as `%%gpu` and the Lab setting write it: TYPE or TYPE:COUNT.

Kept apart from `companion.py` so that loading the magic costs no websocket or HTTP imports."""

from __future__ import annotations

import re

from gpupool.wire import MAX_GPUS_PER_KERNEL, Shape

# TYPE or TYPE:COUNT, as `%gpu default` and the Lab setting `defaultShape` take it.
SHAPE_TEXT = re.compile(r"([A-Za-z0-9][A-Za-z0-9.-]{0,31})(?::([1-9][0-9]{0,2}))?")


def parse_shape(text: str) -> Shape:
    """TYPE ("H100", one GPU) or TYPE:COUNT ("H100:2"); ValueError saying the form otherwise."""
    found = SHAPE_TEXT.fullmatch(text.strip())
    if not found:
        raise ValueError(f"{text.strip()[:40]!r} is not a GPU shape: write TYPE or TYPE:COUNT, "
                         "e.g. H100 or H100:2")  # fmt: skip
    count = int(found.group(2) or 1)
    if count > MAX_GPUS_PER_KERNEL:
        raise ValueError(f"{text.strip()} asks for {count} GPUs; one kernel may hold at most "
                         f"{MAX_GPUS_PER_KERNEL}: ask for fewer")  # fmt: skip
    return Shape(found.group(1).upper(), count)  # as NVML names it: -t h100 is the H100
