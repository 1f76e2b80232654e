"""A GPU shape (type and count) and its kernelspec name: what `%%gpu` asks the pool for.

Kept apart from `companion.py` so that loading the magic costs no websocket or HTTP imports."""

from __future__ import annotations

import re
from dataclasses import dataclass

# TYPE or TYPE:COUNT, as `%gpu default` and the Lab setting `defaultShape` take it.
SHAPE_TEXT = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31})(?::([1-9][0-9]{0,2}))?")


def kernel_name(gpu_type: str, gpu_count: int) -> str:
    """The kernelspec of a GPU shape, as the gateway names it."""
    return f"python3-gpu-{gpu_type.lower()}-x{gpu_count}"


@dataclass(frozen=True)
class Shape:
    gpu_type: str
    gpu_count: int

    def __str__(self) -> str:
        return f"{self.gpu_type} ×{self.gpu_count}"  # noqa: RUF001

    @property
    def kernel_name(self) -> str:
        return kernel_name(self.gpu_type, self.gpu_count)


def parse_shape(text: str) -> Shape:
    """TYPE ("H100", one GPU) or TYPE:COUNT ("H100:2"); ValueError saying the form otherwise."""
    found = SHAPE_TEXT.fullmatch(text.strip())
    if not found:
        raise ValueError(f"{text.strip()[:40]!r} is not a GPU shape: write TYPE or TYPE:COUNT, "
                         "e.g. H100 or H100:2")  # fmt: skip
    return Shape(found.group(1), int(found.group(2) or 1))
