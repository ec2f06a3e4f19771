package mcp.vault_test

import data.mcp.gateway

backends(id) := {"backends": {id: {"audiences": ["notes-backend"], "scopes": ["notes.read", "notes.write"]}}}

ask(backend, audience, scopes) := d if {
	d := gateway.decision with input.vault as {
		"backend": {"id": backend}, "user": {"issuer": "https://idp", "subject": "alice"},
		"audience": audience, "scopes": scopes, "reason": "nightly sync",
	}
		with data.authz as {"vault": backends("notes-sync")}
}

test_configured_backend_gets_its_scopes if {
	d := ask("notes-sync", "notes-backend", ["notes.read"])
	d.action == "release"
	d.audience == ["notes-backend"]
	d.scopes == ["notes.read"]
}

test_unknown_backend_refused if ask("billing", "notes-backend", ["notes.read"]).reason == "vault_backend_not_allowed"

test_other_audience_refused if ask("notes-sync", "billing", ["notes.read"]).reason == "vault_audience_not_allowed"

test_scope_beyond_the_backends_refused if {
	d := ask("notes-sync", "notes-backend", ["notes.read", "notes.admin"])
	d.action == "reject"
	d.reason == "vault_scope_not_allowed"
	d.status == 403
}

test_no_scope_refused if ask("notes-sync", "notes-backend", []).reason == "vault_scope_required"

test_no_vault_data_refuses_every_backend if {
	d := gateway.decision with input.vault as {
		"backend": {"id": "notes-sync"}, "user": {"issuer": "https://idp", "subject": "alice"},
		"audience": "notes-backend", "scopes": ["notes.read"], "reason": "x",
	}
		with data.authz as {}
	d.reason == "vault_backend_not_allowed"
}

delegate_profile(mode) := {
	"mode": mode,
	"audience": {"accept": ["*"], "reject": [], "match": "any", "missing": "accept"},
	"delegate": {"audience": ["nextcloud-mcp-server"], "scope": ["notes.read", "notes.write"]},
}

delegated(scopes) := d if {
	d := gateway.decision with input.token as {"audiences": ["gw"], "claims": {}, "scopes": scopes, "subject": "alice"}
		with input.profile as delegate_profile("delegate")
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": "list_notes"}
		with input.request as {"method": "POST"}
		with data.authz as {}
}

test_delegate_forwards_the_scopes_the_client_holds if {
	d := delegated(["notes.read", "openid"])
	d.action == "delegate"
	d.audience == ["nextcloud-mcp-server"]
	d.scopes == ["notes.read"]
}

test_delegate_without_a_common_scope_refused if {
	d := delegated(["openid"])
	d.action == "reject"
	d.reason == "delegate_no_common_scope"
}
