"""MCP wing: what crosses the wire. Parsing requests (`messages`, `jsonstrict`), JSON-RPC
errors and refusals (`jsonrpc`), the upstream relay (`upstream`), the guard every answer
passes (`answers`: listings filtered, foreign ids dropped) and sessions bound to their user,
with one request per id at a time (`sessions`). Imports only the state and config wings.
"""
