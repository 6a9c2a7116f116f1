"""A service's own metrics, declared through its node's: what /metrics then shows."""

from __future__ import annotations

from prometheus_client import generate_latest

from uns.metrics import ServiceMetrics


def exposition(m: ServiceMetrics) -> str:
    return generate_latest(m.registry).decode()


def test_the_service_label_is_built_in_and_zeros_are_there_from_the_start():
    m = ServiceMetrics("press-watch")
    reads = m.counter(
        "uns_press_reads_total", "Reads, by result", ["result"], zeros=("ok", "error")
    )
    reads.labels("ok").inc(3)
    text = exposition(m)
    assert 'uns_press_reads_total{result="ok",service="press-watch"} 3.0' in text
    assert 'uns_press_reads_total{result="error",service="press-watch"} 0.0' in text


def test_a_metric_with_no_other_label_is_one_series_once_bound():
    m = ServiceMetrics("press-watch")
    up = m.gauge("uns_press_session_up", "1 while up").labels()
    latency = m.histogram("uns_press_latency_seconds", "Latency", buckets=(0.1, 1.0)).labels()
    up.set(1)
    latency.observe(0.5)
    text = exposition(m)
    assert 'uns_press_session_up{service="press-watch"} 1.0' in text
    assert 'uns_press_latency_seconds_bucket{le="1.0",service="press-watch"} 1.0' in text
    assert 'uns_press_latency_seconds_bucket{le="0.1",service="press-watch"} 0.0' in text


def test_an_unbound_gauge_is_absent_until_set_and_a_series_can_be_removed():
    """A certificate's days left means nothing before it is read: no 0 to alert on."""
    m = ServiceMetrics("press-watch")
    days = m.gauge("uns_press_cert_days_left", "Days until the certificate expires")
    info = m.gauge("uns_press_model_info", "1 per model", ["name", "version"])
    assert "uns_press_cert_days_left{" not in exposition(m)
    days.labels().set(30)
    info.labels("press", "1").set(1)
    info.labels("press", "2").set(1)
    info.remove("press", "1")
    text = exposition(m)
    assert 'uns_press_cert_days_left{service="press-watch"} 30.0' in text
    assert 'version="1"' not in text and 'version="2"' in text
