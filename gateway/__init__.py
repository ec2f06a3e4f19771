"""mcp-authz-gateway: verify the bearer token, ask the Rego policy, forward or refuse."""

__version__ = "0.1.0"
