"""What the gateway answers itself for a suspended kernel, so that asking does not resume it.

A JupyterLab tab that reconnects (a laptop waking, a network blip, a notebook opened again) asks
`kernel_info_request` on its new websocket (jupyter_server asks it on shell and control too), and
the notebook asks `history_request`. Resuming the kernel for those would hold and bill a GPU
until the next idle suspend for questions whose answers need no kernel: the host saves the
kernel's own `kernel_info_reply` content with its checkpoint, and the gateway answers from it;
history and comms are empty, as they are in the new kernel process a resume starts. Each answer
is framed as a kernel sends it (status busy, the reply, status idle). Any other message (a cell,
a completion, an inspection) resumes the kernel."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from gpupool.wire import V1_PROTOCOL, iso, v1_message, v1_split

MAX_KERNEL_INFO_BYTES = 16 << 10  # an ipykernel's reply is about 1 KiB
MAX_HEADER_BYTES = 64 << 10
PROTOCOL_VERSION = "5.3"
JSON_KEYS = ("header", "parent_header", "metadata", "content")
# request -> its reply's type, and its content (kernel_info's is the one kept at the checkpoint)
ANSWERED: dict[str, tuple[str, dict[str, Any] | None]] = {
    "kernel_info_request": ("kernel_info_reply", None),
    "history_request": ("history_reply", {"status": "ok", "history": []}),
    "comm_info_request": ("comm_info_reply", {"status": "ok", "comms": {}}),
}


def kept_kernel_info(saved: dict[str, Any]) -> dict[str, Any]:
    """The kernel_info reply content a host's checkpoint answer carries, if it is one worth
    keeping (a JSON object with status ok, within the size limit); else {}."""
    info = saved.get("kernel_info")
    if not isinstance(info, dict) or info.get("status") != "ok":
        return {}
    try:
        size = len(json.dumps(info))
    except (TypeError, ValueError):
        return {}
    return info if size <= MAX_KERNEL_INFO_BYTES else {}


def request_of(message: str | bytes, protocol: str | None) -> tuple[str, dict[str, Any]] | None:
    """The channel and header of a client's message; None for anything malformed (the kernel,
    once resumed, answers that as it would)."""
    channel: Any
    try:
        if protocol == V1_PROTOCOL:
            channel, parts = v1_split(message)
            if len(parts[0]) > MAX_HEADER_BYTES:
                return None
            header = json.loads(bytes(parts[0]))
        elif isinstance(message, str):
            data = json.loads(message)
            if not isinstance(data, dict):
                return None
            channel, header = data.get("channel"), data.get("header")
        else:
            return None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(channel, str) or not isinstance(header, dict):
        return None
    return channel, header


def answerable(message: str | bytes, protocol: str | None) -> tuple[str, dict[str, Any]] | None:
    """The channel and header of `message` if it is a request the gateway answers for a
    suspended kernel (on shell or control); else None."""
    request = request_of(message, protocol)
    if request is None or request[0] not in ("shell", "control"):
        return None
    return request if request[1].get("msg_type") in ANSWERED else None


def answer(
    channel: str,
    request: dict[str, Any],
    kernel_info: dict[str, Any],
    kernel_id: str,
    protocol: str | None,
) -> list[str | bytes]:
    """The messages a kernel sends for `request` (the header of a request `answerable` took,
    asked on `channel`), in the websocket's framing: status busy, the reply, status idle."""
    reply_type, content = ANSWERED[str(request.get("msg_type"))]
    parent = {key: request[key] for key in ("msg_id", "msg_type", "session", "username", "date",
                                             "version") if key in request}  # fmt: skip
    sent = [
        ("iopub", "status", {"execution_state": "busy"}),
        (channel, reply_type, kernel_info if content is None else content),
        ("iopub", "status", {"execution_state": "idle"}),
    ]
    messages: list[str | bytes] = []
    for on, msg_type, content in sent:
        header = {
            "msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": kernel_id,
            "username": "gpupool", "date": iso(time.time()), "version": PROTOCOL_VERSION,
        }  # fmt: skip
        parts = [header, parent, {}, content]
        if protocol == V1_PROTOCOL:
            messages.append(v1_message(on, [json.dumps(p).encode() for p in parts]))
        else:
            framed = dict(zip(JSON_KEYS, parts, strict=True))
            # as jupyter_server frames a kernel's message: its header's id and type beside it
            ids = {"msg_id": header["msg_id"], "msg_type": msg_type}
            messages.append(json.dumps({**framed, **ids, "channel": on, "buffers": []}))
    return messages
