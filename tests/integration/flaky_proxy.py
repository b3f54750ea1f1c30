"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a loopback S3 server (tests only).

`flaky_proxy(upstream, faults=N)` forwards every request to `upstream` and, for the first
`faults` faults, answers every `every`-th request with a fault instead, cycling through
`kinds`: `503` (S3's SlowDown throttling answer), `500` (InternalError), `reset` (the
connection is closed with a TCP reset, nothing answered). `deny=True` answers every request
403 AccessDenied (a permanent error). Bounded and self-stopping: at most `faults` faults, the
server thread stops when the `with` block ends, and it listens on loopback only.
"""
from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}


class FaultCounter:
    def __init__(self, faults: int, kinds: tuple[str, ...], every: int, deny: bool):
        self.faults, self.kinds, self.every, self.deny = faults, kinds, every, deny
        self.requests = 0
        self.injected: dict[str, int] = {}
        self.lock = threading.Lock()

    def next_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.deny:
                kind = "403"
            elif sum(self.injected.values()) < self.faults and self.requests % self.every == 0:
                kind = self.kinds[sum(self.injected.values()) % len(self.kinds)]
            else:
                return None
            self.injected[kind] = self.injected.get(kind, 0) + 1
            return kind


def _handler(upstream: str, counter: FaultCounter):
    target = urlparse(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

        def _forward(self) -> None:
            body = self._body()
            kind = counter.next_fault()
            if kind == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if kind is not None:
                status, code, message = _ERRORS[kind]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                       f'</Message><RequestId>fault-{counter.requests}</RequestId></Error>').encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else resp.getheader("Content-Length", "0")))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@contextlib.contextmanager
def flaky_proxy(upstream: str, *, faults: int = 0, kinds: tuple[str, ...] = ("503", "500", "reset"),
                every: int = 2, deny: bool = False) -> Iterator[tuple[str, FaultCounter]]:
    """(proxy endpoint http://127.0.0.1:PORT, its FaultCounter) while the block runs."""
    counter = FaultCounter(faults, kinds, every, deny)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, counter))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counter
    finally:
        server.shutdown()
        server.server_close()
