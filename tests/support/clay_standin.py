"""A Clay table webhook on 127.0.0.1 for tests: it records what arrives and when, holds
each request as long as told, counts the requests it holds at once, and answers as told."""

from __future__ import annotations

import http.server
import json
import threading
import time


class ClayStandIn:
    def __init__(self, *, hold: float = 0.0):
        self.arrivals: list[tuple[str, dict]] = []  # (path, body) of accepted requests
        self.times: list[float] = []  # time.time() of each request's arrival, accepted or not
        self.answers: list[tuple[int, dict]] = []  # popped per request; 200 when empty
        self.hold = hold
        self.open = 0
        self.max_open = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                arrived = time.time()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer._lock:
                    outer.times.append(arrived)
                    outer.open += 1
                    outer.max_open = max(outer.max_open, outer.open)
                    status, headers = outer.answers.pop(0) if outer.answers else (200, {})
                try:
                    if outer.hold:
                        time.sleep(outer.hold)
                    if 200 <= status < 300:
                        with outer._lock:
                            outer.arrivals.append((self.path, json.loads(body)))
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                finally:
                    with outer._lock:
                        outer.open -= 1

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def max_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` that fall in any window of ``window`` seconds."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best
