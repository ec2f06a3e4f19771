"""OAuth wing: the gateway as its clients' authorization server (`authorization_server.mode:
proxy`). Client registration and metadata documents (`clients`), the state it keeps
(`store`), signing users in at the IdP with the gateway's own client (`signin`), and the
endpoints' logic (`server`). Imports the auth, mcp and config wings.
"""
