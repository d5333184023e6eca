"""The webhook alert sink against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nlpstream.sinks import Alert, SinkWriteError, WebhookAlertSink


class Receiver:
    """A real HTTP server that records POSTed alerts; can answer errors first."""

    def __init__(self, fail_first: int = 0, status: int = 503) -> None:
        self.received: list[tuple[dict, dict]] = []
        self.fail_first = fail_first
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.fail_first > 0:
                    receiver.fail_first -= 1
                    self.send_response(receiver.status)
                    self.end_headers()
                    return
                receiver.received.append((dict(self.headers), json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/nlpstream"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def alert(i: int) -> Alert:
    return Alert(f"id{i}", "window:customer", "window", "t", 0, i, f"m{i}", "acme", 1_790_000_000_000, {"share": 0.8})


def test_posts_each_alert_once_with_idempotency_key(receiver):
    sink = WebhookAlertSink(receiver.url, headers={"Authorization": "Bearer s3cret"})
    sink.write([alert(1), alert(2), alert(1)])
    sink.flush()
    assert [body["id"] for _, body in receiver.received] == ["id1", "id2"]
    headers = receiver.received[0][0]
    assert headers["Idempotency-Key"] == "id1" and headers["Authorization"] == "Bearer s3cret"
    assert receiver.received[0][1]["key"] == "acme"


def test_retries_transient_errors():
    r = Receiver(fail_first=2, status=503)
    try:
        sink = WebhookAlertSink(r.url, backoff_s=0.01)
        sink.write([alert(1)])
        sink.flush()
        assert [body["id"] for _, body in r.received] == ["id1"]
    finally:
        r.close()


def test_refusal_and_unreachable_raise_and_keep_the_alert():
    r = Receiver(fail_first=10, status=400)
    try:
        sink = WebhookAlertSink(r.url, backoff_s=0.01)
        sink.write([alert(1)])
        with pytest.raises(SinkWriteError, match="id1"):
            sink.flush()
        assert r.fail_first == 9, "a 4xx refusal is not retried"
    finally:
        r.close()
    down = WebhookAlertSink(r.url, retries=1, backoff_s=0.01, timeout_s=1)
    down.write([alert(2)])
    with pytest.raises(SinkWriteError):
        down.flush()
    again = Receiver()
    try:
        down.url = again.url  # the receiver is back (elsewhere): the kept alert is delivered
        down.flush()
        assert [body["id"] for _, body in again.received] == ["id2"]
    finally:
        again.close()
