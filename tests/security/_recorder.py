"""A real OpenAI-compatible HTTP endpoint (the simulator's) that records every request's headers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dmipro.lm import server as sim_server


class RecordingServer(sim_server.SimHTTPServer):
    """The simulator's HTTP server, keeping the headers of every request it receives."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), {})
        self.RequestHandlerClass = _Recording
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def seen(self) -> list[dict[str, str]]:
        with self.lock:
            return list(self.requests)


class _Recording(sim_server._Handler):
    def do_POST(self) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.requests.append({k.lower(): v for k, v in self.headers.items()})  # type: ignore[attr-defined]
        super().do_POST()

    def do_GET(self) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.requests.append({k.lower(): v for k, v in self.headers.items()})  # type: ignore[attr-defined]
        super().do_GET()


@contextmanager
def recording_server() -> Iterator[RecordingServer]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
