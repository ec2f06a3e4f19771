"""The demo upstream MCP server for `mcp-authz-gateway dev`: a small notes service.

Built with the MCP SDK's MCPServer, so it speaks both transport revisions exactly as a
real upstream does. Notes live in memory. It trusts the gateway in front of it: it does
not verify tokens itself (a real upstream should; the tests' upstream does).
"""

from __future__ import annotations

import itertools
from typing import Any

from mcp.server.mcpserver import Context, MCPServer


def build_notes_server(name: str = "notes") -> MCPServer:
    server = MCPServer(name, instructions="A small notes service behind mcp-authz-gateway.")
    notes: dict[int, dict[str, Any]] = {1: {"id": 1, "title": "welcome", "body": "Notes live in memory."}}
    ids = itertools.count(2)

    @server.tool(description="List the notes (id and title).")
    def list_notes() -> list[dict[str, Any]]:
        return [{"id": n["id"], "title": n["title"]} for n in notes.values()]

    @server.tool(description="Read one note by id.")
    def read_note(id: int) -> dict[str, Any]:
        if id not in notes:
            raise ValueError(f"no note {id}")
        return notes[id]

    @server.tool(description="Create a note in a folder (path); returns its id.")
    def create_note(title: str, body: str = "", path: str = "/") -> dict[str, Any]:
        note = {"id": next(ids), "title": title, "body": body, "path": path}
        notes[note["id"]] = note
        return {"id": note["id"]}

    @server.tool(description="Delete a note by id.")
    def delete_note(id: int) -> str:
        if notes.pop(id, None) is None:
            raise ValueError(f"no note {id}")
        return f"deleted {id}"

    @server.tool(description="Delete every note (an administrator's tool).")
    def purge_notes() -> str:
        count = len(notes)
        notes.clear()
        return f"purged {count}"

    @server.resource("notes://index", description="Every note's id and title.")
    def index() -> str:
        return "\n".join(f"{n['id']}: {n['title']}" for n in notes.values())

    @server.resource("notes://{id}", description="One note's body.")
    def note_body(id: str) -> str:
        note = notes.get(int(id)) if id.isdigit() else None
        if note is None:
            raise ValueError(f"no note {id}")
        return note["body"]

    @server.prompt(description="Ask for a summary of every note.")
    def summarize_notes() -> str:
        return "Summarize these notes:\n" + "\n".join(n["title"] for n in notes.values())

    @server.tool(description="Count to n, reporting progress as it goes (shows SSE streaming).")
    async def count(n: int, ctx: Context) -> str:
        for i in range(n):
            await ctx.report_progress(i + 1, n, f"counted {i + 1}")
        return f"counted to {n}"

    return server
