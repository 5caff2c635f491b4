"""A fault-injecting HTTP proxy on 127.0.0.1, put in front of moto's S3 server to make storage flaky
for real: every client gr2 uses on S3 (Lance's object_store, pyarrow's S3FileSystem, s3fs, boto3)
talks to it as it would to S3, and sees 500s, 503 SlowDown, reset connections, replies cut short and stalled replies.

A test tool, not part of gr2: tests import it (`from faultproxy import FaultProxy`, tests/ is on
pytest's path); benchmarks/reliability.py loads this file by its path.

    with FaultProxy(upstream, rates={"500": 0.05, "reset": 0.05}, seed=0) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
        proxy.injected  # {"500": 12, "reset": 9, ...}
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# 500 InternalError; 503 SlowDown; a connection reset before any reply (the request was applied);
# a reply cut half-way, then reset; a reply stalled for `stall_s`.
KINDS = ("500", "503", "reset", "cut", "stall")

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>")
_INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
             b"<Message>We encountered an internal error. Please try again.</Message>"
             b"<RequestId>faultproxy</RequestId></Error>")
# Hop-by-hop headers the proxy answers itself rather than passing on.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}


def _checked(rates: dict[str, float]) -> dict[str, float]:
    if set(rates) - set(KINDS) or sum(rates.values()) > 1:
        raise ValueError(f"rates {rates}: kinds are {KINDS} and their rates sum to at most 1")
    return dict(rates)


class FaultProxy:
    """Forwards HTTP to `upstream`; a request draws one fault kind at its `rates` (per kind, summing to
    at most 1) from a generator seeded with `seed`. `stall_s` is how long a stalled reply waits:
    below the clients' read timeouts it only slows them; above, it makes them time out and retry."""

    def __init__(self, upstream: str, rates: dict[str, float] | None = None, seed: int = 0, stall_s: float = 1.0):
        self.upstream = urlsplit(upstream)
        self.rates, self.stall_s = _checked(rates or {}), stall_s
        self.injected: Counter = Counter()
        self.requests = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # a client that gave up, or a connection we reset on purpose, is no error of the proxy's
        self._server.handle_error = lambda request, address: None
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_rates(self, rates: dict[str, float]) -> None:
        """Change the fault rates from now on (e.g. to none for a re-run on a healthy store)."""
        with self._lock:
            self.rates = _checked(rates)

    def reset_counts(self) -> None:
        """Start counting requests and injected faults afresh (one job's worth)."""
        with self._lock:
            self.injected.clear()
            self.requests = 0

    def _draw(self) -> str | None:
        """The fault this request gets, if any; counted as injected."""
        with self._lock:
            self.requests += 1
            r, edge = self._rng.random(), 0.0
            for kind in KINDS:
                edge += self.rates.get(kind, 0.0)
                if r < edge:
                    self.injected[kind] += 1
                    return kind
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; also answers Expect: 100-continue

            def log_message(self, *args):  # one line per request otherwise
                pass

            def _forward(self):
                body = self._body()
                fault = proxy._draw()
                if fault == "500":
                    return self._error(500, _INTERNAL)
                if fault == "503":
                    return self._error(503, _SLOW_DOWN)
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                status, reason, headers, payload = self._upstream(body)
                if fault in ("reset", "cut"):
                    # The request was applied upstream; the client gets no reply, or one cut half-way
                    # that it must not take for a whole one.
                    reply = self._serialize(status, reason, headers, payload)
                    return self._reset(reply[: len(reply) // 2] if fault == "cut" else b"")
                self.wfile.write(self._serialize(status, reason, headers, payload))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _forward

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _upstream(self, body: bytes):
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                    return resp.status, resp.reason, resp.getheaders(), payload
                finally:
                    conn.close()

            def _serialize(self, status, reason, headers, payload) -> bytes:
                lines = [f"HTTP/1.1 {status} {reason}"]
                lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP and k.lower() != "content-length"]
                # a HEAD reply states the object's length without carrying it
                length = next((v for k, v in headers if k.lower() == "content-length"), None)
                lines.append(f"Content-Length: {length if self.command == 'HEAD' and length else len(payload)}")
                head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                return head + (b"" if self.command == "HEAD" else payload)

            def _error(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _reset(self, partial: bytes):
                self.wfile.write(partial)
                self.wfile.flush()
                # SO_LINGER 0: close with a TCP RST, as a dropped connection looks to the client
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

        return Handler
