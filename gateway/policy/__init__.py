"""Policy wing: the input contract (`input`), the Decision and engine interface (`decision`),
bundles and their Rego tests, the engines (embedded, remote OPA) with the decision cache,
and `explain`. Imports only the auth, mcp and config wings.
"""
