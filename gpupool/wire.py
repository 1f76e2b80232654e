"""The wire contract shared by the host agent, the gateway and the Jupyter extension: limits,
kernelspec names and shapes, kernel states, the time format, and the v1 websocket codec.

A v1 kernel message (`v1.kernel.websocket.jupyter.org`) is one binary websocket message: the
count of offsets (8-byte little endian), the offsets themselves (from the message's start), then
the channel name and the parts (header, parent header, metadata, content, buffers), each from
its offset to the next. Parts are passed as they are (views, never copies) both ways, so a
100 MB buffer is read and written once."""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
MAX_PARTS = 4096  # parts of one message: header, parent, metadata, content and its buffers
# The four JSON parts every Jupyter message has, after the channel name.
JSON_PARTS = 4
# A count of offsets below this is no Jupyter message: channel, four JSON parts, the end.
MIN_OFFSETS = 1 + JSON_PARTS + 1

# The largest websocket message the gateway relays (its default `--max-message-mb`) and its
# clients (the bridge, `%%gpu`, Lab's relay) accept.
MAX_MESSAGE_BYTES = 64 << 20
# GPUs one kernel may hold: the most a real node has. A host may report more (MIG instances).
MAX_GPUS_PER_KERNEL = 8
# GPUs one host may report: 8 GPUs of 7 MIG instances each is 56.
MAX_GPUS_PER_HOST = 256

# Kernelspec names: `python3` runs on a CPU, `python3-gpu-<type>-x<count>` on `count` GPUs of
# `type` (NVML's name, upper case, written lower case here: python3-gpu-h100-x2).
CPU_KERNEL_NAME = "python3"
GPU_KERNEL_PREFIX = "python3-gpu-"
GPU_KERNEL_NAME = re.compile(
    r"python3-gpu-(?P<type>[a-z0-9][a-z0-9.-]{0,31})-x(?P<count>[1-9][0-9]?)"
)
KERNEL_NAMES = "python3, or python3-gpu-<type>-x<count> such as python3-gpu-h100-x1"


class KernelState(str, Enum):
    """A pool kernel's state, as the gateway stores it and its kernel model shows it. Each
    compares equal to its text, so rows and JSON hold the plain words."""

    QUEUED = "queued"  # waiting for GPUs
    STARTING = "starting"  # placed on a host, which starts it
    RUNNING = "running"
    SUSPENDED = "suspended"  # idle: its namespace saved, its GPUs given back
    RESUMING = "resuming"  # shown while a suspended kernel is queued or starting again
    DEAD = "dead"  # ended; its model is kept, with why
    DELETED = "deleted"  # shut down by its owner or revoked; no longer listed

    def __str__(self) -> str:
        return str(self.value)


ENDED = (KernelState.DEAD, KernelState.DELETED)  # a kernel in these never runs again


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # UTC, to the microsecond: 2025-05-01T12:00:00.000000Z
MAX_TIME_TEXT = 64  # characters of a time read from a request


def iso(ts: float) -> str:
    """A Unix time as the wire writes times (TIME_FORMAT)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime(TIME_FORMAT)


def parse_iso(text: Any) -> float:
    """An ISO 8601 time (`2025-05-01`, `2025-05-01T12:00:00Z`, with an offset or without, which
    means UTC) as a Unix time; ValueError if it is not one or is over MAX_TIME_TEXT long."""
    if not isinstance(text, str):
        raise ValueError(f"a time is ISO 8601 text, not {type(text).__name__}")
    if len(text) > MAX_TIME_TEXT:
        raise ValueError(f"a time is at most {MAX_TIME_TEXT} characters")
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    except (OverflowError, OSError) as error:
        raise ValueError(f"{text[:40]!r} is out of range: {error}") from None


@dataclass(frozen=True)
class Shape:
    """`gpu_count` GPUs of `gpu_type` (NVML's name, upper case; None: any type); a count of 0
    is a CPU kernel. What a kernel asks for, at the host, the gateway and in `%%gpu`."""

    gpu_type: str | None
    gpu_count: int

    def __str__(self) -> str:
        if not self.gpu_count:
            return "CPU"
        return f"{self.gpu_type or 'GPU'} ×{self.gpu_count}"  # noqa: RUF001

    @property
    def kernel_name(self) -> str:
        """Its kernelspec name: python3, or python3-gpu-<type>-x<count>."""
        if not self.gpu_count or self.gpu_type is None:
            return CPU_KERNEL_NAME
        return f"{GPU_KERNEL_PREFIX}{self.gpu_type.lower()}-x{self.gpu_count}"


CPU = Shape(None, 0)


def shape_of_kernel_name(name: str) -> Shape | None:
    """The shape a kernelspec name asks for (the type in upper case); None for a name of
    neither form. The count is as written: the caller checks it against its limit."""
    if name == CPU_KERNEL_NAME:
        return CPU
    found = GPU_KERNEL_NAME.fullmatch(name)
    if found is None:
        return None
    return Shape(found["type"].upper(), int(found["count"]))


def v1_head(channel: bytes, sizes: Sequence[int]) -> bytes:
    """The start of a v1 message whose parts have these byte sizes, up to its parts: the
    offset count, the offsets and the channel name. The parts follow it as they are."""
    offsets = [8 * (len(sizes) + 3), 8 * (len(sizes) + 3) + len(channel)]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + channel


def v1_pieces(channel: str | bytes, parts: Sequence[Any]) -> list[Any]:
    """A v1 message as the pieces to write in order: its head, then the parts themselves (any
    buffer: bytes, memoryview, numpy array; not copied)."""
    name = channel.encode() if isinstance(channel, str) else channel
    return [v1_head(name, [memoryview(part).nbytes for part in parts]), *parts]


def v1_message(channel: str | bytes, parts: Sequence[Any]) -> bytes:
    """A v1 message as one bytes object (the parts copied once, into it)."""
    return b"".join(v1_pieces(channel, parts))


def v1_split(message: Any) -> tuple[str, list[memoryview]]:
    """A v1 message's channel and parts (views into it, not copies). The offset count and the
    offsets are checked against the message's own length before use (jupyter_server's parser
    trusts them: a count of 2**60 keeps a loop busy for good); ValueError, saying what is
    wrong, for anything that is not a v1 message."""
    if isinstance(message, str):
        raise ValueError("it came as text; v1 messages are binary")
    try:
        view = memoryview(message).cast("B")
    except TypeError:
        raise ValueError(f"it is {type(message).__name__}, not contiguous bytes") from None
    count = int.from_bytes(view[:8], "little") if len(view) >= 8 else 0
    if count > MAX_PARTS + 2:
        raise ValueError(f"it has more than {MAX_PARTS} parts")
    if not MIN_OFFSETS <= count <= len(view) // 8 - 1:
        raise ValueError("its part count does not fit the message")
    offsets = struct.unpack_from(f"<{count}Q", view, 8)
    if offsets[0] != 8 * (count + 1) or list(offsets) != sorted(offsets) or offsets[-1] > len(view):
        raise ValueError("its offsets do not fit the message")
    try:
        channel = bytes(view[offsets[0] : offsets[1]]).decode()
    except UnicodeDecodeError:
        raise ValueError("its channel name is not UTF-8") from None
    return channel, [view[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]


def legacy_split(message: Any) -> list[memoryview]:
    """The parts of a binary message in jupyter_server's legacy framing (no subprotocol): a
    4-byte big-endian part count, that many 4-byte big-endian offsets, then the parts (the
    message's JSON, then its buffers), as views. jupyter_server's parser trusts the count (2**31
    of them grows a process by gigabytes); here it and the offsets must fit the message, as in
    `v1_split`. ValueError, saying what is wrong, otherwise."""
    try:
        view = memoryview(message).cast("B")
    except TypeError:
        raise ValueError(f"it is {type(message).__name__}, not contiguous bytes") from None
    count = int.from_bytes(view[:4], "big") if len(view) >= 4 else 0
    if count > MAX_PARTS:
        raise ValueError(f"it has more than {MAX_PARTS} parts")
    if not 1 <= count <= len(view) // 4 - 1:  # the message (JSON), then its buffers
        raise ValueError("its part count does not fit the message")
    offsets = struct.unpack_from(f">{count}I", view, 4)
    if offsets[0] < 4 * (count + 1) or list(offsets) != sorted(offsets) or offsets[-1] > len(view):
        raise ValueError("its offsets do not fit the message")
    ends = [*offsets[1:], len(view)]
    return [view[start:end] for start, end in zip(offsets, ends, strict=True)]


def legacy_binary(pieces: Sequence[Any]) -> bytes:
    """A binary message in the legacy framing: the message's JSON, then its buffers."""
    sizes = [memoryview(piece).nbytes for piece in pieces]
    offsets = [4 * (len(pieces) + 1)]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    head = struct.pack(f">{len(pieces) + 1}I", len(pieces), *offsets)
    return b"".join([head, *pieces])


def frame_head(length: int, mask: bytes = b"") -> bytes:
    """The header of one final binary websocket frame (RFC 6455) of `length` payload bytes;
    with a 4-byte `mask` key (a client's frame), the mask bit set and the key after it."""
    bit = 0x80 if mask else 0
    if length < 126:
        head = bytes([0x82, bit | length])
    elif length < 1 << 16:
        head = bytes([0x82, bit | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x82, bit | 127]) + length.to_bytes(8, "big")
    return head + mask
