"""State wing: what the gateway shares between processes (today one Redis connection helper,
used by the session bindings and the authorization server's store). Imports only config.
"""
