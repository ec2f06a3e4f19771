"""OpenTelemetry traces: a span per MCP request, child spans for its steps, W3C trace context
taken from the client and passed to the upstream.

Configured only by the standard `OTEL_*` variables (`OTEL_TRACES_EXPORTER=otlp`,
`OTEL_EXPORTER_OTLP_ENDPOINT` or `..._TRACES_ENDPOINT`, `OTEL_SERVICE_NAME`...); off by
default. When off, nothing of the SDK is imported and every call here is a constant-time
no-op, so tracing costs nothing unless it is asked for. A client's `traceparent` (and
`tracestate`) is always passed on to the upstream, traced or not, so traces join across
the gateway either way.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

TRACE_HEADERS = ("traceparent", "tracestate")


def enabled_by_env() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """The gateway's tracer, or a no-op one (`enabled` False)."""

    def __init__(self) -> None:
        self.enabled = enabled_by_env()
        self._tracer: Any = None
        self._provider: Any = None
        if self.enabled:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "mcp-authz-gateway")})
            self._provider = TracerProvider(resource=resource)
            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            self._tracer = self._provider.get_tracer("mcp-authz-gateway")

    def request(self, headers: list[tuple[bytes, bytes]], method: str) -> AbstractContextManager[Any]:
        """The span of one MCP request, a child of the client's trace context when it sent one."""
        if not self.enabled:
            return nullcontext()
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers if k.lower() in (b"traceparent", b"tracestate")}
        return self._tracer.start_as_current_span(f"MCP {method}", context=extract(carrier), kind=SpanKind.SERVER)

    def step(self, name: str) -> AbstractContextManager[Any]:
        """A child span for one step (verify, policy, exchange, upstream)."""
        if not self.enabled:
            return nullcontext()
        return self._tracer.start_as_current_span(name)

    def annotate(self, **attributes: Any) -> None:
        if not self.enabled:
            return
        from opentelemetry import trace

        span = trace.get_current_span()
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(f"mcp.{key}", value)

    def trace_id(self) -> str | None:
        """The current trace's id (32 hex), for the decision log; None when off."""
        if not self.enabled:
            return None
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        return f"{context.trace_id:032x}" if context.is_valid else None

    def outgoing(self, client_headers: dict[str, str]) -> dict[str, str]:
        """The trace context headers for the upstream: this gateway's span when tracing, else
        the client's own (so a trace still joins across a gateway that does not trace)."""
        if not self.enabled:
            return {k: client_headers[k] for k in TRACE_HEADERS if k in client_headers}
        from opentelemetry.propagate import inject

        carrier: dict[str, str] = {}
        inject(carrier)
        return carrier

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
