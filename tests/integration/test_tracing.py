"""OpenTelemetry: a span per request with child spans for its steps, the client's trace
continued, the context passed to the upstream, the trace id in the decision log; off by
default, and then the client's own traceparent still reaches the upstream.

The collector is a minimal OTLP/HTTP receiver (protobuf, decoded with OpenTelemetry's own
message types) running here: no collector binary can be installed from the package registries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import ThreadServer, free_port, make_profile
from tests.integration.test_gateway_e2e import post

CALL = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


class Receiver:
    """Stands in for an OpenTelemetry collector: OTLP/HTTP traces, kept in memory."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_spans:
            for scoped in resource.scope_spans:
                for span in scoped.spans:
                    self.spans.append({"name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                       "parent": span.parent_span_id.hex(),
                                       "attributes": {a.key: a.value.string_value or a.value.int_value for a in span.attributes}})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-protobuf")]})
        await send({"type": "http.response.body", "body": b""})


def test_a_request_is_traced_into_the_clients_trace(gateways: Any, issuer: Any, json_upstream: Any, tmp_path: Path) -> None:
    receiver, port = Receiver(), free_port()
    server = ThreadServer(receiver, port)
    server.start()
    log = tmp_path / "decisions.jsonl"
    try:
        gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url, config={"decision_log": str(log)},
                            env={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
                                 "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "gw-under-test"})
        json_upstream.clear()
        resp = post(gw.mcp_url, issuer.mint(aud=gw.resource), CALL, traceparent=TRACEPARENT)
        assert resp.status_code == 200
        deadline = time.monotonic() + 15
        while not any(s["name"] == "MCP POST" for s in receiver.spans):
            assert time.monotonic() < deadline, receiver.spans
            time.sleep(0.1)
        root = next(s for s in receiver.spans if s["name"] == "MCP POST")
        assert root["trace_id"] == TRACE_ID and root["parent"] == CLIENT_SPAN
        assert root["attributes"]["mcp.decision_id"] == resp.headers["x-decision-id"]
        steps = {s["name"]: s for s in receiver.spans if s["parent"] == root["span_id"]}
        assert {"verify", "policy", "upstream"} <= set(steps)
        assert all(s["trace_id"] == TRACE_ID for s in steps.values())
        sent = dict(json_upstream.requests()[-1]["headers"])["traceparent"]
        assert sent.split("-")[1] == TRACE_ID and sent.split("-")[2] == steps["upstream"]["span_id"]
        line = json.loads(log.read_text().splitlines()[-1])
        assert line["trace_id"] == TRACE_ID
    finally:
        server.stop()


def test_without_tracing_the_clients_traceparent_still_reaches_the_upstream(gateways: Any, issuer: Any, json_upstream: Any) -> None:
    gw = gateways.start(profile=make_profile(issuer), upstream_url=json_upstream.url)
    json_upstream.clear()
    assert post(gw.mcp_url, issuer.mint(aud=gw.resource), CALL, traceparent=TRACEPARENT).status_code == 200
    assert dict(json_upstream.requests()[-1]["headers"])["traceparent"] == TRACEPARENT
