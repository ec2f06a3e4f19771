"""The `dev` demo: an embedded issuer (`issuer`), the notes MCP server (`notes_server`) and the
command that runs them with a gateway in front (`demo`). Not used by `serve`.
"""
