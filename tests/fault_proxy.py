"""A loopback HTTP proxy in front of the test S3 server that fails on cue, deterministically.

Requests are numbered in the order they arrive (0, 1, ...). ``fail_from(n, how)`` makes request n
and every later one fail, as an endpoint that died would: ``"503"`` answers them with an S3
``ServiceUnavailable`` error, ``"drop"`` closes the connection without an answer. A failed request
never reaches the server. ``before(n, callback)`` runs ``callback`` (for example another writer,
talking to the server directly) before request n is forwarded, so an interleaving of two clients
is fixed by request numbers, not by timing.
"""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Callable
from typing import Self

# Headers that describe one hop, not the request: the proxy sets its own.
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
}
FAULTS = ("503", "drop")
_UNAVAILABLE = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
    b"<Message>injected fault</Message></Error>"
)


class FaultProxy:
    """See the module docstring. Use as a context manager; ``endpoint`` is its host:port."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.requests: list[str] = []  # "METHOD path" of every request, failed ones too
        self.failed = 0
        self._fail_from: int | None = None
        self._how = "503"
        self._hooks: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real S3 endpoint

            def _handle(self):
                proxy._serve(self)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self._server.server_port}"

    def fail_from(self, n: int, how: str = "503") -> Self:
        assert how in FAULTS, how
        self._fail_from, self._how = n, how
        return self

    def before(self, n: int, callback: Callable[[], None]) -> Self:
        self._hooks[n] = callback
        return self

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            index = len(self.requests)
            self.requests.append(f"{handler.command} {handler.path}")
            failing = self._fail_from is not None and index >= self._fail_from
            hook = self._hooks.pop(index, None)
            self.failed += failing
        if hook is not None:
            hook()
        if failing and self._how == "drop":
            handler.close_connection = True
            return
        if failing:
            self._answer(handler, 503, {"Content-Type": "application/xml"}, _UNAVAILABLE)
            return
        self._forward(handler, body)

    def _forward(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_HEADERS}
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            upstream.request(handler.command, handler.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            answer = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS}
        finally:
            upstream.close()
        self._answer(handler, response.status, answer, data)

    @staticmethod
    def _answer(handler, status: int, headers: dict, data: bytes) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            if name.lower() != "content-length":
                handler.send_header(name, value)
        # A HEAD answer carries the object's length but no body.
        length = next((v for k, v in headers.items() if k.lower() == "content-length"), None)
        if handler.command != "HEAD" or length is None:
            length = str(len(data))
        handler.send_header("Content-Length", length)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
