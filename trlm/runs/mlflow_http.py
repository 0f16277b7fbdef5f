"""MLflow's HTTP client retries where the server says to retry (429, 503), and nowhere else.

MLflow's own policy (mlflow/utils/request_utils.py, `_cached_get_request_session`) retries every
method `MLFLOW_HTTP_REQUEST_MAX_RETRIES` times (default 7, with exponential backoff: about 4
minutes) on 408, 429, 500, 502, 503 and 504, and on every refused connection and read error. So a
store error (a 500) is hidden behind retries of a request that may have half-run (`log_batch`,
`create_run`), and a server that went away mid-run takes minutes to fail. (MLflow's server itself
answers a database `OperationalError`, SQLite's `database is locked` among them, with 503
TEMPORARILY_UNAVAILABLE after rolling back: that one it says to retry, and it is retried.) Here only 429 (Too Many Requests) and 503 (Service Unavailable)
are retried, the answers with which a server says "come back later", honouring their
`Retry-After` (as MLflow does, `MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER`), else MLflow's backoff
(`MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`, `..._JITTER`), at most `MLFLOW_HTTP_REQUEST_MAX_RETRIES`
times. A 500, any other status, a refused or dropped connection and a timeout fail at once: the
error is the server's, reported as it is.

A connection that sat idle in the pool is not reused after `IDLE_S` (1 s): servers close idle
keep-alive connections (uvicorn, which `mlflow server` runs, after 5 s; gunicorn after 2 s), and a
request sent on one just as the server closes it dies with `Connection reset by peer` although the
server never read it. Under load (16 pipelines on 2 cores: a step's log call comes 5 s after the
last) that race lost a pipeline's `log_batch`; a fresh connection costs a TCP handshake instead.

This replaces MLflow's (private) session factory, through which every MLflow HTTP call goes
(REST store, `mlflow-artifacts` transfers, model registry); tests/test_mlflow_http.py checks the
behaviour through `MlflowClient` against a local server, so an MLflow release that moves it fails
there, and here it warns and leaves MLflow's policy in place.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
IDLE_S = 1.0  # below any server's keep-alive timeout


def retry_only_when_told() -> None:
    """Install the policy in this process (idempotent). Called before any MLflow client is made."""
    from mlflow.utils import request_utils

    current = getattr(request_utils, "_get_request_session", None)
    if getattr(current, "trlm_policy", False):
        return
    if current is None or getattr(request_utils, "TCPKeepAliveHTTPAdapter", None) is None:
        log.warning("MLflow's HTTP session factory moved (mlflow %s): its own retry policy stays in place "
                    "(it retries 500s and lost connections for minutes)", _mlflow_version())
        return

    def session(max_retries, backoff_factor, backoff_jitter, retry_codes, raise_on_status, respect_retry_after_header=True):
        codes = frozenset(retry_codes or ()) & RETRY_STATUSES
        return _session(max_retries, backoff_factor, backoff_jitter, codes, raise_on_status, bool(respect_retry_after_header), os.getpid())

    session.trlm_policy = True
    request_utils._get_request_session = session


@lru_cache(maxsize=64)
def _session(max_retries: int, backoff_factor: float, backoff_jitter: float, codes: frozenset[int], raise_on_status: bool,
             respect_retry_after: bool, _pid: int):
    """One session per settings and process (as MLflow's: a forked child must not share sockets)."""
    import requests
    from mlflow.environment_variables import MLFLOW_HTTP_POOL_CONNECTIONS, MLFLOW_HTTP_POOL_MAXSIZE
    from urllib3.util import Retry

    retry = Retry(
        total=max_retries, status=max_retries, status_forcelist=codes,
        connect=0, read=0, other=0, redirect=max_retries,  # no retry where the server said nothing
        allowed_methods=None,  # a 429/503 means the request was not handled: any method may be sent again
        backoff_factor=backoff_factor, backoff_jitter=backoff_jitter,
        respect_retry_after_header=respect_retry_after, raise_on_status=raise_on_status,
    )
    adapter = _FreshConnections(pool_connections=MLFLOW_HTTP_POOL_CONNECTIONS.get(), pool_maxsize=MLFLOW_HTTP_POOL_MAXSIZE.get(),
                                      max_retries=retry)
    s = requests.Session()
    s.mount("https://", adapter)
    s.mount("http://", adapter)
    return s


def _fresh_pool(base):
    """`base` (urllib3's HTTP(S)ConnectionPool) that closes a pooled connection idle for over IDLE_S
    before reusing it (it reconnects on use), as urllib3 itself does with one the server has closed."""
    import time

    class Pool(base):
        def _get_conn(self, timeout=None):
            conn = super()._get_conn(timeout)
            idle_since = getattr(conn, "trlm_idle_since", None)
            if idle_since is not None and time.monotonic() - idle_since > IDLE_S:
                conn.close()
            return conn

        def _put_conn(self, conn):
            if conn is not None:
                conn.trlm_idle_since = time.monotonic()
            super()._put_conn(conn)

    Pool.__name__ = f"Fresh{base.__name__}"
    return Pool


@lru_cache(maxsize=1)
def _adapter_class():
    from mlflow.utils.request_utils import TCPKeepAliveHTTPAdapter
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    pools = {"http": _fresh_pool(HTTPConnectionPool), "https": _fresh_pool(HTTPSConnectionPool)}

    class FreshConnections(TCPKeepAliveHTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, *args, **kwargs):
            manager = super().proxy_manager_for(*args, **kwargs)
            manager.pool_classes_by_scheme = pools
            return manager

    return FreshConnections


def _FreshConnections(**kwargs):
    return _adapter_class()(**kwargs)


def _mlflow_version() -> str:
    try:
        import mlflow

        return mlflow.__version__
    except Exception:  # noqa: BLE001
        return "?"
