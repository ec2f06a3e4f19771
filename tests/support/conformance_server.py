"""An MCP server with the public conformance suite's fixtures, built on the Python SDK.

The suite (`@modelcontextprotocol/conformance`, server scenarios) calls named tools, resources
and prompts (`test_simple_text`, `test://static-text`, `test_prompt_with_arguments`...) and
checks what comes back. The conformance test runs it against this server directly and through
the gateway. Both protocol revisions: the SDK serves 2025-11-25 (initialize, sessions) and
2026-07-28 (stateless, `server/discover`) on one endpoint. An event store makes SSE streams
resumable (`Last-Event-ID`); DNS-rebinding protection accepts only loopback Host/Origin.

    python -m tests.support.conformance_server --port N
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from typing import Any

import uvicorn
from mcp import types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventMessage, EventStore
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import BaseModel, Field

IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
AUDIO = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="


class MemoryEvents(EventStore):
    """Every SSE event kept in order, so a client can resume a stream after its last event id."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, Any]] = []

    async def store_event(self, stream_id: str, message: Any) -> str:
        event_id = str(len(self._events) + 1)
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
        stream = next((s for s, e, _ in self._events if e == last_event_id), None)
        if stream is None:
            return None
        for s, e, message in self._events:
            if s == stream and int(e) > int(last_event_id) and message is not None:
                await send_callback(EventMessage(message, e))
        return stream


class UserResponse(BaseModel):
    response: str = Field(description="User's response")


class Sep1034Defaults(BaseModel):
    name: str = Field(default="John Doe", description="User name")
    age: int = Field(default=30, description="User age")
    score: float = Field(default=95.5, description="User score")
    status: str = Field(default="active", description="User status", json_schema_extra={"enum": ["active", "inactive", "pending"]})
    verified: bool = Field(default=True, description="Verification status")


class Sep1330Enums(BaseModel):
    untitledSingle: str = Field(description="Simple enum without titles", json_schema_extra={"enum": ["active", "inactive", "pending"]})
    titledSingle: str = Field(description="Enum with titled options (oneOf)", json_schema_extra={"oneOf": [
        {"const": "low", "title": "Low Priority"}, {"const": "medium", "title": "Medium Priority"}, {"const": "high", "title": "High Priority"}]})
    untitledMulti: list[str] = Field(description="Multi-select without titles",
                                     json_schema_extra={"items": {"type": "string", "enum": ["read", "write", "execute"]}})
    titledMulti: list[str] = Field(description="Multi-select with titled options", json_schema_extra={"items": {"anyOf": [
        {"const": "feature", "title": "New Feature"}, {"const": "bug", "title": "Bug Fix"}, {"const": "docs", "title": "Documentation"}]}})
    legacyEnum: str = Field(description="Legacy enum with enumNames", json_schema_extra={
        "enum": ["small", "medium", "large"], "enumNames": ["Small Size", "Medium Size", "Large Size"]})


def build() -> MCPServer:
    subscriptions: set[str] = set()

    async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
        return types.EmptyResult()

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        subscriptions.add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        subscriptions.discard(str(params.uri))
        return types.EmptyResult()

    mcp = MCPServer("mcp-conformance-test-server")
    lowlevel = mcp._lowlevel_server  # noqa: SLF001 - the SDK has no public hook for these three yet
    lowlevel.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)

    @mcp.tool()
    def test_simple_text() -> str:
        """Tests simple text content response"""
        return "This is a simple text response for testing."

    @mcp.tool()
    def test_image_content() -> list[types.ImageContent]:
        """Tests image content response"""
        return [types.ImageContent(type="image", data=IMAGE, mime_type="image/png")]

    @mcp.tool()
    def test_audio_content() -> list[types.AudioContent]:
        """Tests audio content response"""
        return [types.AudioContent(type="audio", data=AUDIO, mime_type="audio/wav")]

    @mcp.tool()
    def test_embedded_resource() -> list[types.EmbeddedResource]:
        """Tests embedded resource content response"""
        return [types.EmbeddedResource(type="resource", resource=types.TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."))]

    @mcp.tool()
    def test_multiple_content_types() -> list[types.TextContent | types.ImageContent | types.EmbeddedResource]:
        """Tests response with multiple content types (text, image, resource)"""
        return [
            types.TextContent(type="text", text="Multiple content types test:"),
            types.ImageContent(type="image", data=IMAGE, mime_type="image/png"),
            types.EmbeddedResource(type="resource", resource=types.TextResourceContents(
                uri="test://mixed-content-resource", mime_type="application/json", text='{"test": "data", "value": 123}')),
        ]

    @mcp.tool()
    async def test_tool_with_logging(ctx: Context) -> str:
        """Tests tool that emits log messages during execution"""
        for text in ("Tool execution started", "Tool processing data", "Tool execution completed"):
            await ctx.info(text)
            await asyncio.sleep(0.05)
        return "Tool with logging executed successfully"

    @mcp.tool()
    async def test_tool_with_progress(ctx: Context) -> str:
        """Tests tool that reports progress notifications"""
        for step in (0, 50, 100):
            await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
            await asyncio.sleep(0.05)
        meta = ctx.request_context.meta if ctx.request_context else None
        return str(getattr(meta, "progress_token", None) or 0)

    @mcp.tool()
    async def test_error_handling() -> str:
        """Tests error response handling"""
        raise RuntimeError("This tool intentionally returns an error for testing")

    @mcp.tool()
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Tests server-initiated sampling (LLM completion request)"""
        result = await ctx.session.create_message(
            messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))], max_tokens=100)
        text = result.content.text if getattr(result.content, "type", None) == "text" else "No response"
        return f"LLM response: {text}"

    @mcp.tool()
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Tests server-initiated elicitation (user input request)"""
        result = await ctx.elicit(message=message, schema=UserResponse)
        content = result.data.model_dump_json() if result.action == "accept" else "{}"
        return f"User response: action={result.action}, content={content}"

    @mcp.tool()
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Tests elicitation with default values for all primitive types (SEP-1034)"""
        result = await ctx.elicit(message="Please provide user information", schema=Sep1034Defaults)
        content = result.data.model_dump_json() if result.action == "accept" else "{}"
        return f"Elicitation result: action={result.action}, content={content}"

    @mcp.tool()
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Tests elicitation with enum schema variations per SEP-1330"""
        result = await ctx.elicit(message="Please select values using different enum schema types", schema=Sep1330Enums)
        content = result.data.model_dump_json() if result.action == "accept" else "{}"
        return f"Elicitation completed: action={result.action}, content={content}"

    @mcp.tool()
    async def test_reconnection(ctx: Context) -> str:
        """Tests SSE polling by closing stream mid-call (SEP-1699)"""
        await ctx.info("Before disconnect")
        await ctx.close_sse_stream()
        await asyncio.sleep(0.2)
        await ctx.info("After reconnect")
        return "Reconnection test completed"

    # --- 2026-07-28 multi-round requests (SEP-2322): InputRequiredResult, requestState ------
    # The SDK seals requestState (RequestStateSecurity.ephemeral): a tampered state never
    # reaches the tool, the boundary answers -32602.

    def elicit(message: str, field: str, kind: str = "string") -> dict[str, Any]:
        return {"method": "elicitation/create", "params": {"message": message, "requestedSchema": {
            "type": "object", "properties": {field: {"type": kind}}, "required": [field]}}}

    def sample(text: str, max_tokens: int) -> dict[str, Any]:
        return {"method": "sampling/createMessage", "params": {
            "messages": [{"role": "user", "content": {"type": "text", "text": text}}], "maxTokens": max_tokens}}

    roots = {"method": "roots/list", "params": {}}

    def answers(ctx: Context) -> dict[str, Any]:
        out = {}
        for key, value in (ctx.input_responses or {}).items():
            out[key] = value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value
        return out

    def accepted(answer: Any, field: str) -> Any:
        content = answer.get("content") if isinstance(answer, dict) else None
        return content.get(field) if isinstance(content, dict) else None

    def need(requests: dict[str, Any], state: str | None = None) -> types.InputRequiredResult:
        return types.InputRequiredResult(input_requests=requests, request_state=state)

    def text(value: str) -> types.CallToolResult:
        return types.CallToolResult(content=[types.TextContent(type="text", text=value)])

    @mcp.tool()
    async def test_input_required_result_elicitation(ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        """MRTR: one elicitation, then a greeting"""
        name = accepted(answers(ctx).get("user_name"), "name")
        if not isinstance(name, str):
            return need({"user_name": elicit("What is your name?", "name")})
        return text(f"Hello, {name}!")

    @mcp.tool()
    async def test_input_required_result_sampling(ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        """MRTR: one sampling request, then its text"""
        answer = answers(ctx).get("capital_question")
        if not isinstance(answer, dict):
            return need({"capital_question": sample("What is the capital of France?", 100)})
        content = answer.get("content")
        return text(f"The model said: {content.get('text') if isinstance(content, dict) else content}")

    @mcp.tool()
    async def test_input_required_result_list_roots(ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        """MRTR: the client's roots, then a list of them"""
        answer = answers(ctx).get("client_roots")
        if not isinstance(answer, dict) or not isinstance(answer.get("roots"), list):
            return need({"client_roots": roots})
        return text("Roots: " + ", ".join(str(r.get("uri")) for r in answer["roots"] if isinstance(r, dict)))

    @mcp.tool()
    async def test_input_required_result_request_state(ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        """MRTR: requestState round trip"""
        if ctx.request_state != "confirm-round-1" or "confirm" not in answers(ctx):
            return need({"confirm": elicit("Please confirm", "ok", "boolean")}, "confirm-round-1")
        return text("state-ok: confirmed")

    @mcp.tool()
    async def test_input_required_result_multiple_inputs(ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        """MRTR: three input requests at once"""
        got = answers(ctx)
        if ctx.request_state != "multi-1" or not {"user_name", "greeting", "client_roots"} <= got.keys():
            return need({"user_name": elicit("What is your name?", "name"), "greeting": sample("Generate a greeting", 50),
                         "client_roots": roots}, "multi-1")
        return text("All inputs received")

    @mcp.tool()
    async def test_input_required_result_multi_round(ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        """MRTR: two rounds, the state evolving"""
        got = answers(ctx)
        if ctx.request_state == "round-2" and "step2" in got:
            return text("Completed both rounds")
        if ctx.request_state == "round-1" and "step1" in got:
            return need({"step2": elicit("Step 2: What is your favorite color?", "color")}, "round-2")
        return need({"step1": elicit("Step 1: What is your name?", "name")}, "round-1")

    @mcp.tool()
    async def test_input_required_result_tampered_state(ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        """MRTR: integrity-protected requestState (sealed by the SDK)"""
        if ctx.request_state != "sealed-1":
            return need({"confirm": elicit("Please confirm", "ok", "boolean")}, "sealed-1")
        return text("state intact")

    @mcp.prompt()
    async def test_input_required_result_prompt(ctx: Context) -> list[dict[str, Any]] | types.InputRequiredResult:
        """MRTR on prompts/get"""
        context = accepted(answers(ctx).get("user_context"), "context")
        if not isinstance(context, str):
            return need({"user_context": elicit("What context should the prompt use?", "context")})
        return [{"role": "user", "content": {"type": "text", "text": f"Use this context: {context}"}}]

    @mcp.resource("test://static-text")
    def static_text() -> str:
        """A static text resource for testing"""
        return "This is the content of the static text resource."

    @mcp.resource("test://static-binary")
    def static_binary() -> bytes:
        """A static binary resource (image) for testing"""
        return base64.b64decode(IMAGE)

    @mcp.resource("test://template/{id}/data")
    def template(id: str) -> str:  # noqa: A002 - the template's parameter name
        """A resource template with parameter substitution"""
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @mcp.resource("test://watched-resource")
    def watched() -> str:
        """A resource that can be subscribed to for updates"""
        return "Watched resource content"

    @mcp.prompt()
    def test_simple_prompt() -> list[dict[str, Any]]:
        """A simple prompt without arguments"""
        return [{"role": "user", "content": {"type": "text", "text": "This is a simple prompt for testing."}}]

    @mcp.prompt()
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[dict[str, Any]]:
        """A prompt with required arguments"""
        return [{"role": "user", "content": {"type": "text", "text": f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"}}]

    @mcp.prompt()
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[dict[str, Any]]:  # noqa: N803 - the suite's name
        """A prompt that includes an embedded resource"""
        return [
            {"role": "user", "content": {"type": "resource", "resource": {
                "uri": resourceUri, "mimeType": "text/plain", "text": "Embedded resource content for testing."}}},
            {"role": "user", "content": {"type": "text", "text": "Please process the embedded resource above."}},
        ]

    @mcp.prompt()
    def test_prompt_with_image() -> list[dict[str, Any]]:
        """A prompt that includes image content"""
        return [
            {"role": "user", "content": {"type": "image", "data": IMAGE, "mimeType": "image/png"}},
            {"role": "user", "content": {"type": "text", "text": "Please analyze the image above."}},
        ]

    @mcp.completion()
    async def complete(ref: Any, argument: Any, context: Any) -> types.Completion:
        return types.Completion(values=[], total=0, has_more=False)

    return mcp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
    app = build().streamable_http_app(event_store=MemoryEvents(), retry_interval=100, transport_security=security)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
