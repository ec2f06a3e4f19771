package mcp.gateway_test

import data.mcp.gateway

# Tests override input one top-level key at a time (`with input.token as ...`):
# regopy 1.5.2 crashes when `with input as X` replaces the whole input and the policy
# then calls a builtin, and it ignores a `with` value that is a reference to another
# rule (use a literal or a function call). OPA runs every form alike. See docs/policy.md.

token(aud) := {"audiences": aud, "claims": {"client_id": "cognito-app"}, "scopes": [], "subject": "alice"}

profile(rules, mode) := {"mode": mode, "audience": rules, "exchange": {"audience": ["nextcloud"], "scope": []}}

# (`with data.authz as {}`: these tests are about audiences, whatever per-tool data a
# deployment adds; the bundle's tests run with the deployment's data files too.)
decide(aud, rules, mode) := d if {
	d := gateway.decision with input.token as token(aud)
		with input.profile as profile(rules, mode)
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": "list_notes"}
		with input.request as {"method": "POST"}
		with data.authz as {}
}

strict := {"accept": ["mcp-client"], "reject": [], "match": "any", "missing": "reject"}

flexible := {"accept": ["*"], "reject": ["nextcloud"], "match": "any", "missing": "accept"}

resource_too := {"accept": ["mcp-client", "http://gw/mcp"], "reject": ["nextcloud"], "match": "any", "missing": "accept"}

unified := {"accept": ["mcp-client", "http://gw", "http://gw/mcp"], "reject": [], "match": "all", "missing": "reject"}

fallback := object.union(unified, {"missing": "claim:client_id"})

reason(aud, rules) := decide(aud, rules, "passthrough").reason

# A. strict client id
test_strict_accepts_client_id if reason(["mcp-client", "account"], strict) == "allowed"

test_strict_rejects_other if reason(["account"], strict) == "audience_not_accepted"

test_strict_rejects_missing if reason([], strict) == "audience_missing"

# B. flexible
test_flexible_accepts_anything if reason(["whatever"], flexible) == "allowed"

test_flexible_rejects_backend_token if reason(["mcp-client", "nextcloud"], flexible) == "audience_forbidden"

test_flexible_accepts_missing if reason([], flexible) == "allowed"

# C. resource URL too
test_resource_url_accepted if reason(["http://gw/mcp"], resource_too) == "allowed"

test_resource_rejects_nextcloud if reason(["nextcloud"], resource_too) == "audience_forbidden"

test_resource_rejects_foreign if reason(["foreign"], resource_too) == "audience_not_accepted"

# D. unified: every audience must be one of ours
test_unified_accepts_all_known if reason(["mcp-client", "http://gw"], unified) == "allowed"

test_unified_rejects_mixed if reason(["mcp-client", "foreign"], unified) == "audience_not_accepted"

test_unified_rejects_missing if reason([], unified) == "audience_missing"

# E. no-aud fallback to the client_id claim
test_fallback_uses_client_id_claim if {
	rules := object.union(fallback, {"accept": ["cognito-app"]})
	reason([], rules) == "allowed"
}

test_fallback_claim_not_accepted if reason([], fallback) == "audience_not_accepted"

# Audience refusals are 401: the token was not issued for this resource.
test_audience_refusal_is_401 if {
	d := decide(["account"], strict, "passthrough")
	d.action == "reject"
	d.status == 401
}

# Modes
test_passthrough_accepts if {
	d := decide(["mcp-client"], strict, "passthrough")
	d.action == "accept"
}

test_exchange_mode_asks_for_exchange if {
	d := decide(["mcp-client"], strict, "exchange")
	d.action == "exchange"
	d.audience == ["nextcloud"]
}

# GET streams and DELETE are judged like calls; unknown shapes are refused.
test_get_stream_allowed if {
	d := gateway.decision with input.token as token(["mcp-client"])
		with input.profile as profile(strict, "passthrough")
		with input.mcp as {"kind": null}
		with input.request as {"method": "GET"}
	d.action == "accept"
}

test_unknown_kind_refused if {
	d := gateway.decision with input.token as token(["mcp-client"])
		with input.profile as profile(strict, "passthrough")
		with input.mcp as {"kind": null}
		with input.request as {"method": "PUT"}
	d.reason == "unknown_message_kind"
}

# Methods outside data.mcp_methods are refused; responses to the server's requests pass.
method_decision(kind, method) := d if {
	d := gateway.decision with input.token as token(["mcp-client"])
		with input.profile as profile(strict, "passthrough")
		with input.mcp as {"kind": kind, "method": method}
		with input.request as {"method": "POST"}
}

test_unknown_methods_refused if {
	method_decision("request", "tools/delete").reason == "unknown_method"
	method_decision("request", "tools/call ").reason == "unknown_method"
	method_decision("notification", "notifications/anything").reason == "unknown_method"
	method_decision("request", "ping").reason == "allowed"
	method_decision("notification", "notifications/initialized").reason == "allowed"
	method_decision("response", null).reason == "allowed"
}

# Tool names outside the specification's character set are refused (data.mcp_names).
named(tool) := d if {
	d := gateway.decision with input.token as token(["mcp-client"])
		with input.profile as profile(strict, "passthrough")
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": tool}
		with input.request as {"method": "POST"}
		with data.authz as {}
}

test_spec_tool_names_are_fine if {
	named("list_notes").reason == "allowed"
	named("notes.v2-list").reason == "allowed"
}

test_odd_tool_names_are_refused if {
	long := "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
	count(long) == 129
	every name in ["a\"b", "a\\b", "a\nb", "", "list notes", "liste_é", long] {
		named(name).reason == "invalid_tool_name"
		named(name).status == 400
	}
}
