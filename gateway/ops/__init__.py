"""Ops wing: what operators watch and steer. The decision log (`audit`), Prometheus metrics
(`metrics`) and hot reload (`reload`). Imports the wings below; nothing imports it but the
assembly, the request path and the app.
"""
