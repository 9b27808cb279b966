"""Optional Prometheus endpoint (`metrics.listen`).

prometheus-client is an optional dependency (the `metrics` extra) and is
imported only when an endpoint is configured. Whenever metrics are off, or
cannot be served, the daemon gets the no-op `Metrics` and the log says why:
metrics never stop the daemon's real work.
"""

from __future__ import annotations

from typing import Any

from .config import MetricsConfig

PREFIX = "ghost_buildpackd"
# Steps last from seconds (a buildpack) to tens of minutes (a salt highstate).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class Metrics:
    """What the daemon counts. This base class records nothing (metrics off)."""

    enabled = False
    address: tuple[str, int] | None = None

    def event_received(self, source: str) -> None:
        """A job change reached the daemon; `source` is `change_stream` or `poll`."""

    def step_finished(self, kind: str, outcome: str, seconds: float) -> None:
        """A step ended in a terminal state (`outcome`) after `seconds`."""

    def image_deleted(self) -> None:
        """The reconciler deleted an image whose AMI was pruned."""

    def set_event_lag(self, seconds: float) -> None:
        """Newest job change in the database minus the newest one the daemon has seen."""

    def close(self) -> None:
        """Stop serving (tests, shutdown)."""


class PrometheusMetrics(Metrics):
    """Metrics in a private registry, served in Prometheus text format over HTTP."""

    enabled = True

    def __init__(self, host: str, port: int):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()  # private: several instances may live in one process
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
        served = prom.start_http_server(port, addr=host, registry=self.registry)
        # prometheus-client >= 0.19 returns (server, thread); older versions return None.
        self._server = served[0] if served else None
        bound = self._server.server_address[:2] if self._server else (host, port)
        self.address = (str(bound[0]), int(bound[1]))

    def event_received(self, source: str) -> None:
        self._events.labels(source=source).inc()

    def step_finished(self, kind: str, outcome: str, seconds: float) -> None:
        self._steps.labels(kind=kind, outcome=outcome).inc()
        self._durations.labels(kind=kind).observe(max(0.0, seconds))

    def image_deleted(self) -> None:
        self._deleted.inc()

    def set_event_lag(self, seconds: float) -> None:
        self._lag.set(max(0.0, seconds))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_metrics(config: MetricsConfig, log: Any) -> Metrics:
    """Serve metrics on `metrics.listen`, or return the no-op Metrics and log why."""
    if config.listen is None:
        log.info("metrics_disabled", reason="metrics.listen is null")
        return Metrics()
    host, port = config.listen
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        log.warning(
            "metrics_disabled",
            reason="prometheus-client is not installed (pip install 'ghost-buildpackd[metrics]')",
            listen=f"{host}:{port}",
        )
        return Metrics()
    try:
        metrics = PrometheusMetrics(host, port)
    except OSError as error:
        log.error("metrics_disabled", reason=f"cannot listen on {host}:{port}: {error.strerror or error}")
        return Metrics()
    log.info("metrics_serving", listen=f"{metrics.address[0]}:{metrics.address[1]}")  # type: ignore[index]
    return metrics
