"""The one v1 websocket codec (`gpupool.wire`): what it writes jupyter_server reads and the
other way round, parts are views and never copies, and every frame that is not a v1 message
(malformed, truncated, oversized, too many parts) is a ValueError that says why, found without
reading more than the message holds."""

from __future__ import annotations

import array
import random
import time

import pytest
from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from kernel_ws import NOT_V1_MESSAGES
from kernel_ws import v1_head as head
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from websockets.utils import apply_mask

from gpupool import wire
from gpupool.wire import (
    CPU,
    GPU_KERNEL_PREFIX,
    MAX_PARTS,
    KernelState,
    Shape,
    frame_head,
    iso,
    legacy_binary,
    legacy_split,
    parse_iso,
    shape_of_kernel_name,
    v1_head,
    v1_message,
    v1_pieces,
    v1_split,
)

PARTS = [b'{"msg_id": "1"}', b"{}", b"{}", b'{"code": "1+1"}']


def test_a_message_splits_back_into_its_channel_and_parts_as_views() -> None:
    message = v1_message("shell", [*PARTS, b"\x00" * 1000, b""])
    channel, parts = v1_split(message)
    assert channel == "shell"
    assert [bytes(p) for p in parts] == [*PARTS, b"\x00" * 1000, b""]
    assert all(isinstance(p, memoryview) and p.obj is message for p in parts)


def test_jupyter_server_reads_ours_and_we_read_jupyter_servers() -> None:
    buffers = [b"\x01\x02", bytes(range(256)) * 40]
    ours = v1_message(b"iopub", [*PARTS, *buffers])
    assert deserialize_msg_from_ws_v1(ours) == ("iopub", [*PARTS, *buffers])
    theirs = serialize_msg_to_ws_v1([*PARTS, *buffers], "control")
    channel, parts = v1_split(theirs)
    assert (channel, [bytes(p) for p in parts]) == ("control", [*PARTS, *buffers])


def test_pieces_are_the_parts_themselves_measured_in_bytes() -> None:
    """No copy of a buffer: a 100 MB numpy array goes out as it is. Sizes are in bytes, not
    items (an array of doubles is 8 bytes an item)."""
    doubles = array.array("d", [1.5] * 1000)
    view = memoryview(b"abcdef")[2:]
    pieces = v1_pieces("shell", [*PARTS, doubles, view])
    assert pieces[1:] == [*PARTS, doubles, view] and pieces[-2] is doubles
    joined = b"".join(bytes(memoryview(p).cast("B")) for p in pieces)
    channel, parts = v1_split(joined)
    assert (
        channel == "shell" and bytes(parts[4]) == doubles.tobytes() and bytes(parts[5]) == b"cdef"
    )
    assert pieces[0] == v1_head(b"shell", [len(p) for p in PARTS] + [8000, 4])


def test_a_bytearray_or_a_view_is_read_in_place() -> None:
    message = bytearray(v1_message("stdin", PARTS))
    channel, parts = v1_split(message)
    assert channel == "stdin" and parts[0].obj is message
    assert v1_split(memoryview(message))[0] == "stdin"


GOOD = v1_message("shell", PARTS)
START = 8 * 7  # the offsets of a message of 4 parts start after 7 words


def at(*deltas: int) -> bytes:
    """The head of a 4-part message whose offsets are START plus these."""
    return head([START + d for d in deltas])


# Each: a message that is not a v1 message, and what the refusal says.
NOT_V1 = {
    "text": ("text", "it came as text"),
    "none": (None, "it is NoneType, not contiguous bytes"),
    "strided-view": (memoryview(bytes(64))[::2], "not contiguous bytes"),
    "empty": (b"", "part count does not fit"),
    "short": (b"\x06\0\0", "part count does not fit"),
    "too-few-parts": (head([16] * 5), "part count does not fit"),  # no content part
    "count-2**60": ((2**60).to_bytes(8, "little") + bytes(64), f"more than {MAX_PARTS} parts"),
    "count-past-end": ((7).to_bytes(8, "little") + bytes(40), "part count does not fit"),
    "first-offset-late": (at(8, 8, 8, 8, 8, 8) + bytes(16), "offsets do not fit"),
    "first-offset-early": (at(-8, 0, 0, 0, 0, 0) + bytes(8), "offsets do not fit"),
    "offsets-go-back": (at(0, 5, 7, 6, 8, 8) + bytes(8), "offsets do not fit"),
    "last-offset-past-end": (at(0, 5, 6, 7, 8, 99) + bytes(8), "offsets do not fit"),
    "channel-not-utf8": (at(0, 2, 3, 4, 5, 6) + b"\xff\xfe0000", "not UTF-8"),
}


@pytest.mark.parametrize(("message", "why"), NOT_V1.values(), ids=NOT_V1.keys())
def test_what_is_not_a_v1_message_is_refused_saying_why(message: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        v1_split(message)


@pytest.mark.parametrize("message", NOT_V1_MESSAGES)
def test_the_frames_the_host_tests_send_are_refused_here_too(message: bytes) -> None:
    """tests/security sends these to a host, which closes with 1007; the codec is why."""
    with pytest.raises(ValueError):
        v1_split(message)


def test_every_truncation_of_a_message_is_refused() -> None:
    for end in range(len(GOOD)):
        with pytest.raises(ValueError):
            v1_split(GOOD[:end])


def test_at_most_max_parts_parts() -> None:
    """MAX_PARTS parts (the four JSON parts and their buffers) pass; one more is refused before
    its offsets are read."""
    most = v1_message("shell", [*PARTS, *[b"x"] * (MAX_PARTS - 4)])
    assert len(v1_split(most)[1]) == MAX_PARTS
    with pytest.raises(ValueError, match=f"more than {MAX_PARTS} parts"):
        v1_split(v1_message("shell", [*PARTS, *[b"x"] * (MAX_PARTS - 3)]))


def test_random_and_oversized_counts_fail_fast_and_only_with_value_error() -> None:
    """Random bytes, and random bytes behind a huge part count or huge offsets: never another
    exception, never a long loop (the count is bounded before anything is read)."""
    rng = random.Random(12)
    started = time.monotonic()
    for _ in range(2000):
        size = rng.randrange(0, 200)
        noise = rng.randbytes(size)
        for message in (noise, (6).to_bytes(8, "little") + noise, head([2**63] * 6) + noise):
            try:
                channel, parts = v1_split(message)
            except ValueError:
                continue
            assert len(parts) >= 4 and isinstance(channel, str)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 200_000])
def test_frame_heads_are_what_websockets_reads(length: int) -> None:
    """A server's head (unmasked) read by websockets' client, a client's (masked, the key
    after the head and the payload masked with it) by its server."""
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    client = ClientProtocol(parse_uri("ws://localhost/"), state=State.OPEN, max_size=None)
    client.receive_data(frame_head(length) + payload)
    (got,) = client.events_received()
    assert got.opcode is Opcode.BINARY and got.fin and got.data == payload

    key = b"\x12\x34\x56\x78"
    server = ServerProtocol(state=State.OPEN, max_size=None)
    server.receive_data(frame_head(length, key) + apply_mask(payload, key))
    (got,) = server.events_received()
    assert got.opcode is Opcode.BINARY and got.fin and got.data == payload


def test_one_kernel_holds_at_most_a_nodes_gpus() -> None:
    assert wire.MAX_GPUS_PER_KERNEL == 8
    assert wire.MAX_GPUS_PER_KERNEL <= wire.MAX_GPUS_PER_HOST


def test_kernelspec_names_read_back_as_written() -> None:
    assert shape_of_kernel_name("python3") == CPU and CPU.kernel_name == "python3"
    for gpu_type, count in [("H100", 1), ("A10G", 8), ("MIG-1G.10GB", 2)]:
        name = Shape(gpu_type, count).kernel_name
        assert name.startswith(GPU_KERNEL_PREFIX)
        assert shape_of_kernel_name(name) == Shape(gpu_type, count)
    assert Shape("H100", 0).kernel_name == Shape(None, 2).kernel_name == "python3"
    assert str(Shape("H100", 2)) == "H100 ×2" and str(CPU) == "CPU"  # noqa: RUF001
    too_long_type = "python3-gpu-" + "a" * 33 + "-x1"
    for other in ["python2", "python3-gpu-h100-x", "python3-gpu-h100-x1\n", "python3-gpu--x1",
                  "python3-gpu-h/100-x1", "python3-gpu-h100-x100", too_long_type,
                  "Python3-gpu-h100-x1", "python3-gpu-h_100-x1", "",
                  "python3-gpu-h100-x0", "python3-gpu-h100-x08"]:  # fmt: skip
        assert shape_of_kernel_name(other) is None, other


def test_every_package_refuses_more_gpus_than_one_kernel_may_hold() -> None:
    """The one limit, said with its number by the host, the gateway and the magic."""
    from gpu_host.kernel_request import RequestError, parse_kernel_request
    from jupyter_ext.shapes import parse_shape
    from kernel_gateway.errors import ApiError
    from kernel_gateway.kernels import read_shape

    most = wire.MAX_GPUS_PER_KERNEL
    assert parse_kernel_request(b'{"name": "python3-gpu-h100-x8"}').shape.gpu_count == most
    with pytest.raises(RequestError, match=f"it must be from 0 to {most}"):
        parse_kernel_request(b'{"name": "python3-gpu-h100-x9"}')
    with pytest.raises(RequestError, match=f"from 0 to {most}"):
        parse_kernel_request(b'{"gpu_type": "H100", "gpu_count": 9}')
    assert read_shape("python3-gpu-h100-x8", {}).gpu_count == most
    with pytest.raises(ApiError, match=f"at most {most}: ask for fewer"):
        read_shape("python3-gpu-h100-x9", {})
    with pytest.raises(ApiError, match=f"from 0 to {most}"):
        read_shape("python3-gpu-h100-x1", {"KERNEL_GPU_COUNT": "9"})
    assert parse_shape("H100:8").gpu_count == most
    with pytest.raises(ValueError, match=f"at most {most}: ask for fewer"):
        parse_shape("H100:9")


def test_a_shape_typed_in_lower_case_is_the_same_shape() -> None:
    """`%%gpu -t h100` asks for the H100 the companion already is (no restart, no lost state)."""
    from jupyter_ext.shapes import parse_shape

    assert parse_shape("h100:2") == parse_shape("H100:2") == Shape("H100", 2)


def test_kernel_states_are_their_words_in_rows_json_and_text() -> None:
    """A str enum: equal to its word, hashed as it (dict lookups by the row's plain text),
    written as it by json, f-strings and SQLite."""
    import json
    import sqlite3

    words = ["queued", "starting", "running", "suspended", "resuming", "dead", "deleted"]
    assert [state.value for state in KernelState] == words
    for state in KernelState:
        assert state == state.value and {state: 1}[state.value] == 1
        assert f"{state}" == str(state) == state.value
        assert json.dumps({"state": state}) == f'{{"state": "{state.value}"}}'
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE k (state TEXT)")
    db.execute("INSERT INTO k VALUES (?)", (KernelState.DELETED,))
    assert db.execute("SELECT state FROM k WHERE state = ?", ("deleted",)).fetchall() == [
        ("deleted",)
    ]


def test_times_are_written_one_way_and_read_in_any_iso_form() -> None:
    ts = 1_746_100_800.25  # 2025-05-01T12:00:00.25Z
    assert iso(ts) == "2025-05-01T12:00:00.250000Z"
    assert parse_iso(iso(ts)) == ts
    assert parse_iso("2025-05-01T12:00:00.25Z") == ts
    assert parse_iso("2025-05-01T14:00:00.25+02:00") == ts
    assert parse_iso("2025-05-01T12:00:00.25") == ts  # no offset: UTC
    assert parse_iso("2025-05-01") == ts - 12 * 3600 - 0.25
    for bad in ["", "yesterday", "2025-13-01", "2025-05-01T25:00Z", "9" * 65, None, 1.5]:
        with pytest.raises(ValueError):
            parse_iso(bad)
    with pytest.raises(ValueError, match="at most 64 characters"):
        parse_iso("2025-05-01" + " " * 60)


def legacy_head(offsets: list[int]) -> bytes:
    return b"".join(n.to_bytes(4, "big") for n in (len(offsets), *offsets))


def test_the_legacy_binary_framing_reads_and_writes_as_jupyter_server() -> None:
    from jupyter_server.services.kernels.connection.base import (
        deserialize_binary_message,
        serialize_binary_message,
    )

    msg = {"header": {"msg_id": "1"}, "parent_header": {}, "metadata": {}, "content": {},
           "channel": "iopub", "buffers": [b"\x00\x01", memoryview(b"two")]}  # fmt: skip
    theirs = serialize_binary_message(dict(msg))
    pieces = legacy_split(theirs)
    assert [bytes(p) for p in pieces[1:]] == [b"\x00\x01", b"two"]
    assert all(p.obj is theirs for p in pieces)
    ours = legacy_binary([bytes(pieces[0]), b"\x00\x01", memoryview(b"two")])
    assert ours == theirs
    back = deserialize_binary_message(ours)
    assert back["channel"] == "iopub"
    assert [bytes(b) for b in back["buffers"]] == [b"\x00\x01", b"two"]


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"\x7f\xff\xff\xff" + bytes(16), f"more than {MAX_PARTS} parts"),  # 2**31 parts
        ((7).to_bytes(4, "big") + bytes(12), "part count does not fit"),
        (b"", "part count does not fit"),
        (legacy_head([]), "part count does not fit"),
        (legacy_head([8, 10**6]), "offsets do not fit"),  # past the end
        (legacy_head([12, 8]) + b"{}{}", "offsets do not fit"),  # going back
        (legacy_head([4, 8]) + b"{}{}", "offsets do not fit"),  # into the offsets
        (None, "not contiguous bytes"),
    ],
    ids=["2**31", "count-past-end", "empty", "no-parts", "past-end", "back", "overlap", "none"],
)
def test_what_is_not_a_legacy_binary_message_is_refused_saying_why(
    message: object, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        legacy_split(message)
