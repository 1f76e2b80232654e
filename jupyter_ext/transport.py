"""The bytes under a GPU kernel's websocket: a TCP socket, with TLS done in memory when the
gateway's URL is https.

One thread reads the socket while another writes it. A plain socket allows that; a TLS session
does not (OpenSSL's rule: one thread in a session at a time, or a record read while writing can
corrupt it). So TLS runs over memory buffers: the session is touched only under a lock and only
in memory, and the socket itself is read and written at once. A writer never holds the session's
lock while it waits on the network, so the reader goes on draining the peer meanwhile (it waits
for a writer only to send a small record of its own, such as a pong, between two messages)."""

from __future__ import annotations

import socket
import ssl
import threading

READ_BYTES = 1 << 20
WRITE_BYTES = 256 << 10  # written at a time, so that a socket timeout means no progress


def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), WRITE_BYTES):
        sock.sendall(view[start : start + WRITE_BYTES])


class Transport:
    """A plain TCP socket."""

    reads_into = True  # `recv_into` fills a caller's buffer with no copy in between

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self) -> bytes:
        """Bytes that arrived (waits for some); b"" at the end of the stream."""
        return self.sock.recv(READ_BYTES)

    def recv_into(self, view: memoryview) -> int:
        """Bytes that arrived, into `view` (waits for some); 0 at the end of the stream."""
        return self.sock.recv_into(view)

    def send(self, data: bytes) -> None:
        """All of `data`, in order with other sends (callers take turns)."""
        send_all(self.sock, data)

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def end_writing(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def shutdown(self) -> None:
        """End both directions: a thread waiting in `recv` gets b"" and returns."""
        self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


class TlsTransport(Transport):
    """TLS over a TCP socket, the session in memory. The handshake runs in the constructor;
    the certificate is checked against the system's trust store (SSL_CERT_FILE, where set)."""

    reads_into = False  # decrypted records come as bytes: use `recv`

    def __init__(
        self, sock: socket.socket, server_hostname: str, context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(sock)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        context = context or ssl.create_default_context()
        self.session = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=server_hostname
        )
        self.state = threading.Lock()  # the session: memory work only, never held on the network
        self.sending = threading.Lock()  # records go out in the order the session made them
        self._handshake()

    def _handshake(self) -> None:
        while True:
            try:
                self.session.do_handshake()
            except ssl.SSLWantReadError:
                self._send_made()
                data = self.sock.recv(READ_BYTES)
                if not data:
                    raise ConnectionError(
                        "the gateway closed the connection during the TLS handshake"
                    ) from None
                self.incoming.write(data)
                continue
            self._send_made()
            return

    def recv(self) -> bytes:
        while True:
            plain: list[bytes] = []
            ended = False
            with self.state:
                while True:
                    try:
                        plain.append(self.session.read(READ_BYTES))
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:  # the peer's close_notify
                        ended = True
                        break
                made = self.outgoing.pending
            if made and self.sending.acquire(blocking=False):
                try:  # records the session made while reading (e.g. a key update's answer)
                    self._send_made()
                finally:
                    self.sending.release()
            if plain:
                return b"".join(plain)
            if ended:
                return b""
            raw = self.sock.recv(READ_BYTES)
            if not raw:
                return b""
            with self.state:
                self.incoming.write(raw)

    def send(self, data: bytes) -> None:
        with self.sending:
            with self.state:
                view = memoryview(data)
                while view:
                    view = view[self.session.write(view) :]
            # What a reader left behind goes too (it does not wait for this lock).
            self._send_made()

    def _send_made(self) -> None:
        """Send what the session has made so far; with `sending` held, or before any thread."""
        while True:
            with self.state:
                out = self.outgoing.read()
            if not out:
                return
            send_all(self.sock, out)
