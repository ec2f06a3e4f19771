"""MCP wing: what crosses the wire. Parsing requests (`messages`, `jsonstrict`), JSON-RPC
errors and refusals (`jsonrpc`), the upstream relay (`upstream`), filtered listings
(`listings`) and sessions bound to their user (`sessions`). Imports only the config wing.
"""
