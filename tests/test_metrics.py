"""Metrics endpoint: scraped over HTTP, and the no-op fallbacks with their reasons."""

from __future__ import annotations

import platform
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from ghost_buildpackd import __version__
from ghost_buildpackd.config import MetricsConfig
from ghost_buildpackd.metrics import Metrics, start_metrics
from tests.support.mongo import free_port


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append((level, event, fields))


def get(metrics: Metrics, path: str) -> tuple[int, bytes]:
    """Status code and body of a GET on the metrics listener (error statuses included)."""
    host, port = metrics.address  # type: ignore[misc]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(metrics: Metrics) -> str:
    code, body = get(metrics, "/metrics")
    assert code == 200
    return body.decode()


@pytest.fixture
def served() -> Iterator[Metrics]:
    metrics = start_metrics(MetricsConfig(listen=("127.0.0.1", free_port())), RecordingLog())
    yield metrics
    metrics.close()


def test_counters_histogram_and_gauge_are_scraped(served: Metrics) -> None:
    assert served.enabled
    served.event_received("change_stream")
    served.event_received("change_stream")
    served.event_received("poll")
    served.step_finished("buildimage", "succeeded", 42.0)
    served.step_finished("deploy", "failed", 3.5)
    served.image_deleted()
    served.set_event_lag(7.25)
    text = scrape(served)
    assert 'ghost_buildpackd_events_received_total{source="change_stream"} 2.0' in text
    assert 'ghost_buildpackd_events_received_total{source="poll"} 1.0' in text
    assert 'ghost_buildpackd_steps_total{kind="buildimage",outcome="succeeded"} 1.0' in text
    assert 'ghost_buildpackd_steps_total{kind="deploy",outcome="failed"} 1.0' in text
    assert 'ghost_buildpackd_step_duration_seconds_bucket{kind="buildimage",le="60.0"} 1.0' in text
    assert 'ghost_buildpackd_step_duration_seconds_bucket{kind="buildimage",le="30.0"} 0.0' in text
    assert 'ghost_buildpackd_step_duration_seconds_sum{kind="deploy"} 3.5' in text
    assert "ghost_buildpackd_images_deleted_total 1.0" in text
    assert "ghost_buildpackd_event_lag_seconds 7.25" in text


def test_two_instances_in_one_process_have_their_own_registries(served: Metrics) -> None:
    other = start_metrics(MetricsConfig(listen=("127.0.0.1", free_port())), RecordingLog())
    try:
        other.image_deleted()
        assert "ghost_buildpackd_images_deleted_total 1.0" in scrape(other)
        assert "ghost_buildpackd_images_deleted_total 0.0" in scrape(served)
    finally:
        other.close()


def test_off_when_listen_is_null() -> None:
    log = RecordingLog()
    metrics = start_metrics(MetricsConfig(listen=None), log)
    assert not metrics.enabled
    metrics.event_received("poll")  # no-ops, no error
    metrics.step_finished("deploy", "succeeded", 1.0)
    assert log.events == [("info", "metrics_disabled", {"reason": "metrics.listen is null"})]


def test_off_with_the_reason_when_prometheus_client_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes the import fail
    log = RecordingLog()
    metrics = start_metrics(MetricsConfig(listen=("127.0.0.1", free_port())), log)
    try:
        assert not metrics.enabled
        [(level, event, fields), (_, serving, _)] = log.events
        assert (level, event, serving) == ("warning", "metrics_disabled", "metrics_serving")
        assert "prometheus-client is not installed" in fields["reason"]
        assert get(metrics, "/healthz") == (200, b'{"status": "ok"}\n')  # health is served all the same
        assert get(metrics, "/metrics")[0] == 404
    finally:
        metrics.close()


def test_off_with_the_reason_when_the_port_is_taken(served: Metrics) -> None:
    log = RecordingLog()
    metrics = start_metrics(MetricsConfig(listen=served.address), log)
    assert not metrics.enabled
    [(level, event, fields)] = log.events
    assert (level, event) == ("error", "metrics_disabled")
    assert f"cannot listen on 127.0.0.1:{served.address[1]}" in fields["reason"]  # type: ignore[index]


def test_process_metrics_build_info_and_up_gauges(served: Metrics) -> None:
    served.set_up("mongodb", True)
    served.set_up("lxd", False)
    text = scrape(served)
    assert 'ghost_buildpackd_up{system="mongodb"} 1.0' in text
    assert 'ghost_buildpackd_up{system="lxd"} 0.0' in text
    assert f'ghost_buildpackd_build_info{{python="{platform.python_version()}",version="{__version__}"}} 1.0' in text
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text


def test_unknown_paths_are_404(served: Metrics) -> None:
    for path in ("/", "/metricsx", "/health", "/favicon.ico"):
        assert get(served, path)[0] == 404, path
    assert get(served, "/readyz") == (200, b'{"status": "ok"}\n')
