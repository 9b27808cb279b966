"""The operations endpoint (`metrics.listen`): Prometheus metrics and health checks.

One small HTTP server answers:
- `/metrics`: Prometheus text format (needs the `metrics` extra, prometheus-client);
- `/healthz`: 200 while the daemon's loops make progress, else 503 naming the stalled ones;
- `/readyz`: 200 while MongoDB and LXD answer, else 503 naming which does not;
- anything else: 404.

prometheus-client is imported only when an endpoint is configured. Without it,
or when metrics cannot be served, the daemon gets the no-op `Metrics` and the
log says why: metrics never stop the daemon's real work. The health checks
are served whether or not prometheus-client is installed.

The loops that count (intake, runner, retention) see only `MetricsRecorder`,
the protocol of what they record.
"""

from __future__ import annotations

import json
import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from . import __version__
from .config import MetricsConfig
from .logs import Logger

PREFIX = "ghost_buildpackd"
# Steps last from seconds (a buildpack) to tens of minutes (a salt highstate).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# Systems the daemon depends on, each with an up gauge.
SYSTEMS = ("mongodb", "lxd")


class Health(Protocol):
    """What /healthz and /readyz ask; each returns the problems found, none when healthy."""

    def liveness(self) -> list[str]: ...

    def readiness(self) -> list[str]: ...


class MetricsRecorder(Protocol):
    """What the daemon's loops record: `Metrics` (no-op) and `PrometheusMetrics` have it."""

    def event_received(self, source: str) -> None: ...

    def step_finished(self, kind: str, outcome: str, seconds: float) -> None: ...

    def image_deleted(self) -> None: ...


class AlwaysHealthy:
    """The health of a process with no daemon in it (tests of the endpoint alone)."""

    def liveness(self) -> list[str]:
        return []

    def readiness(self) -> list[str]:
        return []


class Metrics:
    """What the daemon counts. This base class records nothing (metrics off)."""

    enabled = False
    address: tuple[str, int] | None = None
    _server: ThreadingHTTPServer | None = None

    def event_received(self, source: str) -> None:
        """A job change reached the daemon; `source` is `change_stream` or `poll`."""

    def step_finished(self, kind: str, outcome: str, seconds: float) -> None:
        """A step ended in a terminal state (`outcome`) after `seconds`."""

    def image_deleted(self) -> None:
        """The reconciler deleted an image whose AMI was pruned."""

    def set_event_lag(self, seconds: float) -> None:
        """Newest job change in the database minus the newest one the daemon has seen."""

    def set_up(self, system: str, up: bool) -> None:
        """Whether `system` (one of SYSTEMS) answered the daemon's last probe."""

    def exposition(self) -> tuple[bytes, str] | None:
        """The metrics in Prometheus text format and its content type; None when metrics are off."""
        return None

    def close(self) -> None:
        """Stop serving (tests, shutdown)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class PrometheusMetrics(Metrics):
    """Metrics in a private registry (several instances may live in one process), with process metrics."""

    enabled = True

    def __init__(self) -> None:
        import prometheus_client as prom

        self._prom = prom
        self.registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, _resident_memory_bytes, _open_fds
        prom.PlatformCollector(registry=self.registry)  # python_info
        prom.GCCollector(registry=self.registry)
        prom.Gauge(
            f"{PREFIX}_build_info",
            "Always 1; the labels say which version runs on which Python",
            ["version", "python"],
            registry=self.registry,
        ).labels(version=__version__, python=platform.python_version()).set(1)
        self._up = prom.Gauge(
            f"{PREFIX}_up",
            "1 when the system (mongodb, lxd) answered the daemon's last probe, else 0",
            ["system"],
            registry=self.registry,
        )
        self._events = prom.Counter(
            f"{PREFIX}_events_received",
            "Job changes received, by source (change_stream or poll)",
            ["source"],
            registry=self.registry,
        )
        self._steps = prom.Counter(
            f"{PREFIX}_steps",
            "Steps finished, by kind (buildimage, deploy) and outcome (terminal state)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self._durations = prom.Histogram(
            f"{PREFIX}_step_duration_seconds",
            "Time from a step's start to its end, by kind",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._deleted = prom.Counter(
            f"{PREFIX}_images_deleted",
            "Container images deleted by the reconciler (their AMIs were pruned)",
            registry=self.registry,
        )
        self._lag = prom.Gauge(
            f"{PREFIX}_event_lag_seconds",
            "Newest job change in MongoDB minus the newest change the daemon has seen",
            registry=self.registry,
        )

    def event_received(self, source: str) -> None:
        self._events.labels(source=source).inc()

    def step_finished(self, kind: str, outcome: str, seconds: float) -> None:
        self._steps.labels(kind=kind, outcome=outcome).inc()
        self._durations.labels(kind=kind).observe(max(0.0, seconds))

    def image_deleted(self) -> None:
        self._deleted.inc()

    def set_event_lag(self, seconds: float) -> None:
        self._lag.set(max(0.0, seconds))

    def set_up(self, system: str, up: bool) -> None:
        self._up.labels(system=system).set(1 if up else 0)

    def exposition(self) -> tuple[bytes, str] | None:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


def _handler(metrics: Metrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                served = metrics.exposition()
                if served is None:
                    self._answer(404, b"metrics are off: prometheus-client is not installed\n", "text/plain")
                else:
                    self._answer(200, *served)
            elif path in ("/healthz", "/readyz"):
                problems = health.liveness() if path == "/healthz" else health.readiness()
                body = {"status": "failing", "problems": problems} if problems else {"status": "ok"}
                self._answer(503 if problems else 200, json.dumps(body).encode() + b"\n", "application/json")
            else:
                self._answer(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _answer(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes and probes every few seconds would flood the daemon's log: not logged."""

    return Handler


def _serve(metrics: Metrics, health: Health, host: str, port: int) -> None:
    server = ThreadingHTTPServer((host, port), _handler(metrics, health))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    metrics._server = server
    bound = server.server_address
    metrics.address = (str(bound[0]), int(bound[1]))


def start_metrics(config: MetricsConfig, log: Logger, health: Health | None = None) -> Metrics:
    """Serve metrics and health on `metrics.listen`, or return the no-op Metrics and log why."""
    if config.listen is None:
        log.info("metrics_disabled", reason="metrics.listen is null")
        return Metrics()
    host, port = config.listen
    try:
        metrics: Metrics = PrometheusMetrics()
    except ImportError:
        log.warning(
            "metrics_disabled",
            reason="prometheus-client is not installed (pip install 'ghost-buildpackd[metrics]'); "
            "/healthz and /readyz are served",
            listen=f"{host}:{port}",
        )
        metrics = Metrics()
    try:
        _serve(metrics, health or AlwaysHealthy(), host, port)
    except OSError as error:
        log.error("metrics_disabled", reason=f"cannot listen on {host}:{port}: {error.strerror or error}")
        return Metrics()
    log.info("metrics_serving", listen=f"{metrics.address[0]}:{metrics.address[1]}")  # type: ignore[index]
    return metrics
