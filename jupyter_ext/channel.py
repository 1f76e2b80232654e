"""A GPU kernel's websocket, spoken in the binary `v1.kernel.websocket.jupyter.org` protocol so
that message buffers travel as raw bytes.

The magic's thread writes its frames to the socket itself: a small `%%gpu` cell's message is on
the wire without waking another thread. One reader thread per websocket reads frames and hands
each message to the queue of the request it answers (messages nobody waits for are dropped at
once, so a chatty kernel between cells costs no memory here). The websocket protocol itself
(handshake, masking, ping and close) is `websockets`' sans-I/O `ClientProtocol`."""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from gpupool.wire import MAX_MESSAGE_BYTES, V1_PROTOCOL, frame_head, v1_pieces, v1_split

from .transport import TlsTransport, Transport

try:  # websockets' C masking; the same function in pure Python where it was not built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

SMALL_FRAME = 256 << 10  # a frame below this is joined and masked in one go
IO_TIMEOUT_S = 60.0  # a read or a 256 KiB write that takes this long: the gateway is gone
BUSY = {"execution_state": "busy"}  # a status message's content
CLOSED = {"msg_type": "_closed"}  # what a waiting queue receives when the websocket ends


def masked_frame(pieces: Sequence[Any], key: bytes) -> list[bytes]:
    """One client binary frame (final, masked with the 4-byte `key`) carrying `pieces` end to
    end, as chunks to write in order. A large payload is masked piece by piece, the key turned
    to each piece's offset, so each byte is copied once; websockets' own frame would join the
    pieces, mask them and copy the result twice more."""
    views = [memoryview(p).cast("B") for p in pieces]
    length = sum(len(v) for v in views)
    head = frame_head(length, key)
    if length < SMALL_FRAME:
        return [head + apply_mask(b"".join(views), key)]
    chunks = [head]
    offset = 0
    for view in views:
        turn = offset % 4
        chunks.append(apply_mask(view, key[turn:] + key[:turn]))
        offset += len(view)
    return chunks


def decode(
    frame: bytes | bytearray, split: tuple[str, list[memoryview]] | None = None
) -> dict[str, Any]:
    """A v1 frame (or its `v1_split` already made) as a message dict; buffers are views into
    the frame (no copies)."""
    channel, parts = split if split is not None else v1_split(frame)
    header, parent, metadata, content = (json.loads(bytes(p)) for p in parts[:4])
    return {
        "channel": channel,
        "header": header,
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
        "buffers": parts[4:],
        "msg_type": header.get("msg_type"),
    }


class FrameReader:
    """Frames from the gateway off the wire. A whole binary frame within the size limit comes
    back as its payload, read into a buffer allocated once at its size (from the socket itself
    where the transport allows: no copy in between). Every other frame (text, fragments, ping,
    pong, close) comes back as its raw bytes, for websockets' protocol to read and answer; so
    does everything after a frame this reader does not take apart (over the limit, reserved
    bits, masked), so that the protocol refuses it as it always has. websockets' own reading
    copies each byte twice more (into its buffer and out of it)."""

    def __init__(self, wire: Transport, pending: bytes = b"") -> None:
        self.wire = wire
        self.buffer = bytearray(pending)  # received, not yet taken
        self.fragmented = False  # in a message that came in fragments: the protocol's
        self.handing_over = False  # from now on, everything goes to the protocol

    def _recv(self) -> bytes:
        while True:
            try:
                return self.wire.recv()
            except TimeoutError:
                continue  # nothing came for a while; that is fine

    def _fill(self, count: int) -> bool:
        """At least `count` bytes in the buffer; False at the end of the stream."""
        while len(self.buffer) < count:
            data = self._recv()
            if not data:
                return False
            self.buffer += data
        return True

    def _take(self, count: int) -> bytes:
        taken = bytes(self.buffer[:count])
        del self.buffer[:count]
        return taken

    def next(self) -> tuple[bytearray | None, bytes]:
        """(a whole binary frame's payload, b"") or (None, raw bytes for the protocol); raw
        b"" is the end of the stream."""
        if self.handing_over:
            return None, self._take(len(self.buffer)) if self.buffer else self._recv()
        if not self._fill(2):
            return None, self._take(len(self.buffer))
        first, second = self.buffer[0], self.buffer[1]
        size = second & 0x7F
        head = 2 + (2 if size == 126 else 8 if size == 127 else 0)
        if not self._fill(head):
            return None, self._take(len(self.buffer))
        length = int.from_bytes(self.buffer[2:head], "big") if head > 2 else size
        opcode, fin = first & 0x0F, bool(first & 0x80)
        whole = length + head + (4 if second & 0x80 else 0)
        if first & 0x70 or second & 0x80 or length > MAX_MESSAGE_BYTES:
            self.handing_over = True  # the protocol refuses it, and closes
            return None, self._take(len(self.buffer))
        if opcode != Opcode.BINARY.value or not fin or self.fragmented:
            if opcode in (Opcode.TEXT.value, Opcode.BINARY.value):
                self.fragmented = not fin
            elif opcode == Opcode.CONT.value and fin:
                self.fragmented = False
            if not self._fill(whole):
                return None, self._take(len(self.buffer))
            return None, self._take(whole)
        del self.buffer[:head]
        payload = bytearray(length)
        view = memoryview(payload)
        have = min(len(self.buffer), length)
        view[:have] = self.buffer[:have]
        del self.buffer[:have]
        while have < length:
            if self.wire.reads_into:
                try:
                    got = self.wire.recv_into(view[have:])
                except TimeoutError:
                    continue
            else:
                data = self._recv()
                got = min(len(data), length - have)
                view[have : have + got] = data[:got]
                self.buffer += data[got:]
            if not got:
                return None, b""  # the end of the stream, in the middle of a frame
            have += got
        return payload, b""


class KernelChannel:
    """The websocket of one kernel at the gateway."""

    def __init__(self, gateway_url: str, token: str, kernel_id: str) -> None:
        self.url = (
            gateway_url.rstrip("/").replace("http", "ws", 1)
            + f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
        )
        self.token = token
        self.session = uuid.uuid4().hex
        self.closed_reason = ""
        self._wire: Transport | None = None
        self._protocol: ClientProtocol | None = None
        self._state = threading.Lock()  # the protocol object: short calls only
        self._writing = threading.Lock()  # one writer on the socket at a time
        self._waiters: dict[str, queue.Queue[dict[str, Any]]] = {}

    @property
    def open(self) -> bool:
        protocol = self._protocol
        return protocol is not None and protocol.state is State.OPEN and not self.closed_reason

    def connect(self, timeout: float = 30) -> None:
        """Open the websocket, or raise ConnectionError saying why not."""
        uri = parse_uri(self.url)
        sock = socket.create_connection((uri.host, uri.port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle wait
            wire = TlsTransport(sock, uri.host) if uri.secure else Transport(sock)
            protocol = ClientProtocol(
                uri, subprotocols=[Subprotocol(V1_PROTOCOL)], max_size=MAX_MESSAGE_BYTES
            )
            request = protocol.connect()
            request.headers["Authorization"] = f"token {self.token}"
            protocol.send_request(request)
            wire.send(b"".join(protocol.data_to_send()))
            response, early, leftover = self._handshake(wire, protocol)
        except BaseException:
            sock.close()
            raise
        if protocol.handshake_exc is not None or protocol.subprotocol != V1_PROTOCOL:
            sock.close()
            raise ConnectionError(self._refusal(response, protocol))
        wire.settimeout(IO_TIMEOUT_S)
        self._wire, self._protocol = wire, protocol
        threading.Thread(
            target=self._read,
            args=(wire, protocol, early, leftover),
            name="gpupool-websocket",
            daemon=True,
        ).start()

    @staticmethod
    def _handshake(
        wire: Transport, protocol: ClientProtocol
    ) -> tuple[Response | None, list, bytes]:
        """Read until the handshake's answer. A 101 goes to the protocol up to its blank line;
        what came after it (frames) is returned as bytes, for `FrameReader`. Any other answer
        goes to the protocol whole (its body says why), with the events that followed it."""
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = wire.recv()
            if not data:
                break
            head += data
        end = head.find(b"\r\n\r\n")
        if end >= 0 and head.startswith(b"HTTP/1.1 101 "):
            protocol.receive_data(head[: end + 4])
            events = protocol.events_received()
            response = next((e for e in events if isinstance(e, Response)), None)
            return response, [], head[end + 4 :]
        # Not a 101 (or no answer): the protocol reads it all, as it came.
        ended = not head
        if ended:
            protocol.receive_eof()
        else:
            protocol.receive_data(head)
        while True:
            events = protocol.events_received()
            for index, event in enumerate(events):
                if isinstance(event, Response):
                    return event, events[index + 1 :], b""
            if ended:
                return None, [], b""
            data = wire.recv()
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
                ended = True

    def _refusal(self, response: Response | None, protocol: ClientProtocol) -> str:
        """Why the gateway did not open the websocket, in its own words where it gave them."""
        if response is None:
            return "the gateway closed the connection before answering the websocket request"
        if response.status_code != 101:
            message = ""
            try:
                message = str(json.loads(response.body or b"{}").get("message") or "")
            except (ValueError, AttributeError):
                pass
            return (
                f"the gateway refused the GPU kernel's websocket ({response.status_code} "
                f"{response.reason_phrase}){': ' + message if message else ''}"
            )
        if protocol.subprotocol != V1_PROTOCOL:
            return (
                f"the gateway did not accept the {V1_PROTOCOL} websocket protocol, which %%gpu "
                "needs to send variables as raw bytes; upgrade the gateway"
            )
        return f"the websocket handshake failed: {protocol.handshake_exc}"

    def _read(
        self, wire: Transport, protocol: ClientProtocol, early: list, leftover: bytes
    ) -> None:
        """The reader thread: frames to messages, messages to the queue of their request. A
        whole binary frame (every v1 message the gateway sends) is read by `FrameReader`
        straight into a buffer of its size; the protocol reads the rest."""
        pieces: list[bytes] = []  # a message that came in fragments
        binary = True  # what the message being put together is; v1 messages are binary
        reason = ""
        events: list = list(early)
        frames = FrameReader(wire, leftover)
        try:
            while True:
                for event in events:
                    if event.opcode in (Opcode.BINARY, Opcode.TEXT):
                        binary, pieces = event.opcode is Opcode.BINARY, []
                    elif event.opcode is not Opcode.CONT:
                        continue  # ping, pong, close: the protocol has answered them
                    if binary:
                        pieces.append(event.data)
                    if event.fin:
                        if binary:
                            self._deliver(b"".join(pieces))
                        pieces = []
                events = []
                if protocol.state is State.CLOSED:
                    break
                try:
                    message, data = frames.next()
                except OSError as error:
                    reason = f"the connection broke ({error})"
                    message, data = None, b""
                if message is not None:
                    self._deliver(message)
                    continue
                with self._state:
                    if data:
                        protocol.receive_data(data)
                    else:
                        protocol.receive_eof()
                    events = protocol.events_received()
                    out = protocol.data_to_send()
                if out:
                    self._write(out)  # a pong, or the answer to a close
                if not data:
                    break
        except Exception as error:  # a bug here must not leave a cell waiting forever
            reason = f"reading the GPU kernel's websocket failed ({error!r})"
        finally:
            self.closed_reason = self.closed_reason or self._closed_text(protocol, reason)
            for waiting in list(self._waiters.values()):
                waiting.put(CLOSED)
            wire.close()

    @staticmethod
    def _closed_text(protocol: ClientProtocol, reason: str) -> str:
        received = protocol.close_rcvd
        if received is not None:
            reason = received.reason or f"code {received.code}"
        elif protocol.close_sent is not None and protocol.close_sent.code == 1009:
            reason = f"a message was over {MAX_MESSAGE_BYTES >> 20} MiB"
        return f"the GPU kernel's websocket closed ({reason or 'no reason given'})"

    def _deliver(self, frame: bytes | bytearray) -> None:
        """Hand a message to the request it answers. Its parent is read first, so a message
        nobody waits for (the idle after a cell, a background thread's output) costs little;
        `busy` is dropped too: every request makes one and none needs it."""
        try:
            channel, parts = v1_split(frame)
            parent = json.loads(bytes(parts[1]))
            listener = self._waiters.get(parent.get("msg_id", "")) if parent else None
            if listener is None or (len(parts[3]) < 64 and json.loads(bytes(parts[3])) == BUSY):
                return
            msg = decode(frame, (channel, parts))
        except (ValueError, AttributeError, UnicodeDecodeError):
            return  # not a v1 message: nothing can be waiting for it
        listener.put(msg)

    def _write(self, chunks: list[bytes]) -> None:
        wire = self._wire
        if wire is None:
            raise ConnectionError(self.closed_reason or "the GPU kernel's websocket is not open")
        with self._writing:
            for chunk in chunks:
                if chunk:
                    wire.send(chunk)
                else:  # the protocol's end of stream: half-close
                    wire.end_writing()

    def send(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        buffers: Sequence[Any] = (),
        listen: bool = True,
    ) -> tuple[str, queue.Queue[dict[str, Any]] | None]:
        """Send a message; with `listen`, the messages whose parent it is arrive on the queue
        returned (call `forget` with the id when done)."""
        if not self.open:
            raise ConnectionError(self.closed_reason or "the GPU kernel's websocket is not open")
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": self.session,
            "username": "gpupool",
            "date": datetime.now(timezone.utc).isoformat(),
            "version": "5.3",
        }
        parts = [json.dumps(x).encode() for x in (header, {}, {}, content)]
        chunks = masked_frame(v1_pieces(channel, [*parts, *buffers]), os.urandom(4))
        waiting: queue.Queue[dict[str, Any]] | None = None
        try:
            if listen:
                waiting = self._waiters[msg_id] = queue.Queue()
            # The reader says CLOSED to the queues there when it ends, after noting why: a
            # queue put here after that is told by this check instead.
            if self.closed_reason:
                raise ConnectionError(self.closed_reason)
            # Data frames are made here, control frames (pong, close) by the protocol: each
            # goes out whole, under the one writer lock.
            with self._writing:
                with self._state:
                    protocol = self._protocol
                    if protocol is None or protocol.state is not State.OPEN:
                        raise ConnectionError(self.closed_reason or "the websocket is closing")
                assert self._wire is not None
                try:
                    for chunk in chunks:
                        self._wire.send(chunk)
                except BaseException as error:
                    # Part of a frame may be out (Ctrl-C in the middle of a large one): what
                    # followed on this socket would be read as its rest. The next cell opens
                    # a new websocket. (A failed write is said below, with the other errors.)
                    if not isinstance(error, OSError):
                        self.closed_reason = self.closed_reason or (
                            "a message to the GPU kernel was cut off when it was interrupted"
                        )
                        self._shutdown()
                    raise
        except OSError as error:
            self.forget(msg_id)
            self.closed_reason = self.closed_reason or f"sending to the GPU kernel failed ({error})"
            self._shutdown()
            raise ConnectionError(self.closed_reason) from error
        except BaseException:
            self.forget(msg_id)
            raise
        return msg_id, waiting

    def forget(self, msg_id: str) -> None:
        self._waiters.pop(msg_id, None)

    def close(self) -> None:
        """Say goodbye to the gateway and stop the reader; never waits for an answer."""
        self.closed_reason = self.closed_reason or "closed by this kernel"
        protocol = self._protocol
        if protocol is not None and self._wire is not None:
            try:
                with self._state:
                    if protocol.state is State.OPEN:
                        protocol.send_close(1000, "closed by the notebook kernel")
                    out = protocol.data_to_send()
                self._wire.settimeout(1.0)  # a goodbye, not worth waiting for
                self._write([chunk for chunk in out if chunk])
            except OSError:
                pass
        self._shutdown()

    def _shutdown(self) -> None:
        """End the socket both ways: the reader thread's recv returns and it exits."""
        wire = self._wire
        if wire is not None:
            try:
                wire.shutdown()
            except OSError:
                pass
