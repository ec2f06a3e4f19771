"""The step histogram kept as plain counts renders as the Prometheus histogram it replaced."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.metrics import Metrics


def test_step_times_render_cumulative_buckets_sum_and_count() -> None:
    metrics = Metrics()
    for seconds in (0.00005, 0.0003, 0.0003, 0.002, 20.0):  # the last beyond every bucket
        metrics.step_seconds.observe("policy", seconds)
    with metrics.timed("verify"):
        pass
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples}
    bucket = lambda le: samples[("mcp_gateway_step_seconds_bucket", (("le", le), ("step", "policy")))]  # noqa: E731
    assert bucket("0.0001") == 1
    assert bucket("0.00025") == 1
    assert bucket("0.0005") == 3
    assert bucket("0.0025") == 4
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert samples[("mcp_gateway_step_seconds_count", (("step", "policy"),))] == 5
    assert abs(samples[("mcp_gateway_step_seconds_sum", (("step", "policy"),))] - 20.00265) < 1e-9
    assert samples[("mcp_gateway_step_seconds_count", (("step", "verify"),))] == 1
