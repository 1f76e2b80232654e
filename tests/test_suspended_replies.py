"""What the gateway answers for a suspended kernel (kernel_gateway/suspended_replies.py), with
malformed, oversized and hostile input: anything that is not a plain kernel_info_request is left
to the kernel (which the message then resumes), and a kept reply is bounded."""

from __future__ import annotations

import json

import pytest
from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1

from gpupool.wire import V1_PROTOCOL, v1_message
from kernel_gateway.suspended_replies import (
    MAX_KERNEL_INFO_BYTES,
    answer,
    answerable,
    kept_kernel_info,
)

HEADER = {"msg_id": "m1", "msg_type": "kernel_info_request", "session": "s", "username": "u",
          "date": "2026-12-03T00:00:00.000000Z", "version": "5.3"}  # fmt: skip
INFO = {"status": "ok", "implementation": "ipython", "language_info": {"name": "python"}}


def v1(channel: str, header: object) -> bytes:
    return v1_message(channel, [json.dumps(header).encode(), b"{}", b"{}", b"{}"])


def legacy(channel: str, header: object) -> str:
    return json.dumps({"channel": channel, "header": header, "parent_header": {},
                       "metadata": {}, "content": {}, "buffers": []})  # fmt: skip


def test_what_a_reconnecting_tab_asks_is_recognised_in_both_framings() -> None:
    assert answerable(v1("shell", HEADER), V1_PROTOCOL) == ("shell", HEADER)
    assert answerable(legacy("shell", HEADER), None) == ("shell", HEADER)
    assert answerable(v1("control", HEADER), V1_PROTOCOL) == ("control", HEADER)
    history = {**HEADER, "msg_type": "history_request"}
    assert answerable(v1("shell", history), V1_PROTOCOL) == ("shell", history)


@pytest.mark.parametrize(
    ("message", "protocol"),
    [
        (v1("iopub", HEADER), V1_PROTOCOL),  # not a request channel
        (v1("shell", {**HEADER, "msg_type": "execute_request"}), V1_PROTOCOL),
        (v1("shell", ["not", "a", "header"]), V1_PROTOCOL),
        (v1_message("shell", [b"{not json", b"{}", b"{}", b"{}"]), V1_PROTOCOL),
        (v1_message("shell", [b'"' + b"x" * (70 << 10) + b'"', b"{}", b"{}", b"{}"]), V1_PROTOCOL),
        ((1 << 60).to_bytes(8, "little") + b"\0" * 64, V1_PROTOCOL),  # a hostile part count
        (b"\xff" * 3, V1_PROTOCOL),
        (legacy("shell", HEADER), V1_PROTOCOL),  # text on a v1 socket
        (v1("shell", HEADER), None),  # binary on a legacy socket
        ("[1, 2]", None),
        ("{" * 100_000, None),  # deep nesting
        ("not json", None),
        (legacy("iopub", HEADER), None),
    ],
)
def test_anything_else_is_left_to_the_kernel(message: str | bytes, protocol: str | None) -> None:
    assert answerable(message, protocol) is None


@pytest.mark.parametrize("protocol", [V1_PROTOCOL, None])
def test_the_answer_is_what_a_kernel_sends(protocol: str | None) -> None:
    messages = answer("control", HEADER, INFO, "k1", protocol)
    decoded = []
    for message in messages:
        if protocol == V1_PROTOCOL:
            assert isinstance(message, bytes)
            channel, parts = deserialize_msg_from_ws_v1(message)
            header, parent, _, content = (json.loads(p) for p in parts)
        else:
            assert isinstance(message, str)
            data = json.loads(message)
            channel, header, parent, content = (
                data["channel"], data["header"], data["parent_header"], data["content"]
            )  # fmt: skip
            assert data["msg_type"] == header["msg_type"]
        assert parent == HEADER and header["session"] == "k1" and header["date"].endswith("Z")
        decoded.append((channel, header["msg_type"], content))
    assert decoded == [
        ("iopub", "status", {"execution_state": "busy"}),
        ("control", "kernel_info_reply", INFO),
        ("iopub", "status", {"execution_state": "idle"}),
    ]


def test_history_and_comms_are_empty_as_in_the_kernel_a_resume_starts() -> None:
    for asked, reply, content in [
        ("history_request", "history_reply", {"status": "ok", "history": []}),
        ("comm_info_request", "comm_info_reply", {"status": "ok", "comms": {}}),
    ]:
        [_, answered, _] = answer("shell", {**HEADER, "msg_type": asked}, INFO, "k1", None)
        data = json.loads(answered)
        assert (data["msg_type"], data["content"]) == (reply, content)


def test_only_a_bounded_ok_reply_is_kept() -> None:
    assert kept_kernel_info({"kernel_info": INFO}) == INFO
    assert kept_kernel_info({}) == {}
    assert kept_kernel_info({"kernel_info": "text"}) == {}
    assert kept_kernel_info({"kernel_info": {"status": "error"}}) == {}
    huge = {**INFO, "banner": "x" * MAX_KERNEL_INFO_BYTES}
    assert kept_kernel_info({"kernel_info": huge}) == {}
