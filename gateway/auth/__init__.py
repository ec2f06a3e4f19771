"""Auth wing: who is calling. Bearer verification (`tokens`: JWT + JWKS), introspection of
opaque tokens, token exchange (RFC 8693), IdP discovery and client authentication (`idp`),
and the protected-resource metadata with its challenges (`metadata`). Imports mcp and config.
"""
