"""MLflow's client retries where the tracking server says to retry (429, 503, honouring Retry-After)
and nowhere else: a 500 (SQLite's `database is locked` under load) and a lost connection fail at
once, with the server's error, instead of minutes of retried, possibly half-run requests.

Against a tiny local HTTP server that answers from a script, through the pipeline's own `Tracker`
and `MlflowClient` calls. MLflow's own policy would retry the 500 and the refused connection."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

EXPERIMENT = {"experiment": {"experiment_id": "1", "name": "bench", "artifact_location": "mlflow-artifacts:/bench", "lifecycle_stage": "active",
                             "tags": [{"key": "mlflow.experimentKind", "value": "custom_model_development"}]}}


@pytest.fixture()
def scripted(monkeypatch):
    """A server answering each request with the next (status, headers) of `script` (then 200 with the
    experiment); `seen` lists the paths requested. Retries are fast but many (what MLflow would do)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    state = {"script": [], "seen": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Content-Length"):
                self.rfile.read(int(self.headers["Content-Length"]))
            state["seen"].append(self.path)
            status, headers = state["script"].pop(0) if state["script"] else (200, {})
            ok = EXPERIMENT if "get-by-name" in self.path else {}
            body = json.dumps(ok if status == 200 else {"error_code": "INTERNAL_ERROR", "message": f"scripted {status}"}).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def _tracker(url, tmp_path):
    from trlm.runs.tracking import Tracker

    return Tracker(url, "bench", tmp_path / "home")


def test_503_and_429_are_retried_honouring_retry_after(scripted, tmp_path):
    from mlflow.entities import Metric

    scripted["script"] = [(503, {"Retry-After": "1"}), (429, {"Retry-After": "1"})]
    t0 = time.monotonic()
    tracker = _tracker(scripted["url"], tmp_path)
    assert tracker.experiment_id == "1"
    assert len(scripted["seen"]) == 3 and time.monotonic() - t0 >= 2.0, "two waits of the server's Retry-After, then the answer"

    scripted["seen"].clear()
    scripted["script"] = [(503, {})]  # no Retry-After: the client's own backoff
    tracker.client.log_batch("r1", metrics=[Metric("loss", 1.0, 0, 1)])
    assert scripted["seen"] == ["/api/2.0/mlflow/runs/log-batch"] * 2


def test_a_500_fails_at_once_with_the_servers_message(scripted, tmp_path):
    from mlflow.exceptions import MlflowException

    scripted["script"] = [(500, {})] * 5
    with pytest.raises(MlflowException, match="scripted 500"):
        _tracker(scripted["url"], tmp_path)
    assert len(scripted["seen"]) == 1, "a 500 is not retried (MLflow's own policy sends it 4 times here)"


@pytest.mark.parametrize("status", [400, 404, 502, 504])
def test_other_statuses_are_not_retried(scripted, tmp_path, status):
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    tracker = _tracker(scripted["url"], tmp_path)
    scripted["seen"].clear()
    scripted["script"] = [(status, {})] * 5
    with pytest.raises(MlflowException):
        tracker.client.log_batch("r1", metrics=[Metric("loss", 1.0, 0, 1)])
    assert len(scripted["seen"]) == 1


def test_a_refused_connection_fails_at_once(monkeypatch, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from trlm.runs.mlflow_http import retry_only_when_told

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    retry_only_when_told()
    t0 = time.monotonic()
    with pytest.raises(MlflowException):
        MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name("bench")
    assert time.monotonic() - t0 < 3, "no backoff on a refused connection (MLflow's own: 4 + 8 s here)"


def test_max_retries_zero_still_means_no_retry(scripted, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    scripted["script"] = [(503, {"Retry-After": "1"})]
    with pytest.raises(MlflowException):
        _tracker(scripted["url"], tmp_path)
    assert len(scripted["seen"]) == 1


@pytest.fixture()
def closes_idle_connections():
    """A server that answers the first request on a connection, keeps it open, and resets it when a
    later request arrives on it: a server closing an idle keep-alive connection just as the client
    reuses it (uvicorn after 5 s). `connections` counts the connections accepted."""
    state = {"connections": 0, "requests": 0}
    listener = socket.create_server(("127.0.0.1", 0))

    def read_request(conn) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        return True

    def serve(conn):
        with conn:
            if not read_request(conn):
                return
            state["requests"] += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}")
            if read_request(conn):  # a request on the idle connection: reset it, unanswered
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            state["connections"] += 1
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{listener.getsockname()[1]}"
    yield state
    listener.close()


def test_an_idle_connection_is_not_reused(closes_idle_connections, monkeypatch):
    """Found by bench/bench_service.py: with 16 pipelines on 2 cores one `log_batch` hit a connection
    uvicorn closed at its keep-alive timeout (`Connection reset by peer`), and its pipeline failed."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from trlm.runs.mlflow_http import IDLE_S, retry_only_when_told

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    retry_only_when_told()
    client = MlflowClient(closes_idle_connections["url"])
    client.log_batch("r1", metrics=[Metric("loss", 1.0, 0, 1)])
    time.sleep(IDLE_S + 0.5)
    client.log_batch("r1", metrics=[Metric("loss", 0.5, 0, 2)])
    assert closes_idle_connections == {**closes_idle_connections, "connections": 2, "requests": 2}
