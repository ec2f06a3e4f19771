# The gateway's default policy: one decision for every MCP request.
#
# Input and output are documented in docs/policy.md. The token has already been
# verified (signature, issuer, expiry) before this runs; this policy applies the
# profile's audience rules, the per-name rules of tools.rego (data.authz), and turns
# the profile's mode into an action.
package mcp.gateway

default decision := {"action": "reject", "reason": "no_rule_matched", "status": 403}

# Ordered: the first matching branch is the decision. A vault request (input.vault, from
# POST /vault/token) is judged by vault.rego alone.
decision := vault_decision if {
	input.vault
} else := reject(problem, 401) if {
	problem := audience_problem
} else := reject("unknown_message_kind", 400) if {
	not known_request
} else := reject("unknown_method", 400) if {
	not known_method
} else := reject("invalid_tool_name", 400) if {
	invalid_tool_name
} else := reject(problem, 403) if {
	problem := catalogue_problem
} else := reject(problem, 403) if {
	problem := client_problem
} else := reject(problem, 403) if {
	problem := claim_problem
} else := step_up if {
	count(missing) > 0
} else := reject(problem, 403) if {
	problem := argument_problem
} else := reject(problem, 403) if {
	problem := custom_problem
} else := with_limits(with_listing(allow))

allow := {"action": "accept", "reason": "allowed"} if {
	input.profile.mode == "passthrough"
}

allow := {
	"action": "exchange",
	"reason": "allowed",
	"audience": object.get(input.profile, ["exchange", "audience"], []),
	"scopes": object.get(input.profile, ["exchange", "scope"], []),
} if {
	input.profile.mode == "exchange"
}

allow := {
	"action": "delegate",
	"reason": "allowed",
	"audience": input.profile.delegate.audience,
	"scopes": delegate_scopes,
} if {
	input.profile.mode == "delegate"
	count(delegate_scopes) > 0
}

allow := reject("delegate_no_common_scope", 403) if {
	input.profile.mode == "delegate"
	count(delegate_scopes) == 0
}

reject(reason, status) := {"action": "reject", "reason": reason, "status": status}

# For the gateway's decision cache (docs/policy.md): this policy reads only input and
# data, and never the input paths below, so equal inputs without them decide alike.
# tests/unit/test_decision_cache.py checks the promise. Drop a path here before a rule
# starts reading it.
decision_cache := {
	"pure": true,
	"ignore": [
		["mcp", "id"],
		["mcp", "params"],
		["mcp", "session_id"],
		["request", "headers"],
		["request", "remote_addr"],
		["request", "path"],
		["gateway"],
	],
}

# POSTed JSON-RPC messages, and the GET stream / DELETE session requests.
# (Written with `some ... ==` rather than `x in {...}`: regopy 1.5.2 crashes on membership
# tests of input values when a Rego unit test replaces input with `with input as`.)
known_request if {
	some kind in ["request", "notification", "response"]
	input.mcp.kind == kind
}

known_request if {
	input.mcp.kind == null
	some method in ["GET", "DELETE"]
	input.request.method == method
}

# Methods: data.mcp_methods (policies/mcp-methods.yaml) lists what a client may send.
# A bundle without that list lets every method through, as before it existed.
known_method if not is_object(data.mcp_methods)

known_method if input.mcp.kind == "response"

known_method if input.mcp.kind == null

known_method if {
	input.mcp.kind == "request"
	some method in data.mcp_methods.requests
	method == input.mcp.method
}

known_method if {
	input.mcp.kind == "notification"
	some method in data.mcp_methods.notifications
	method == input.mcp.method
}

# Tool names: data.mcp_names.tools (policies/mcp-names.yaml) says what one may look like.
# (trim, not regex: linear whatever the name, nothing compiled per evaluation.)
invalid_tool_name if {
	input.mcp.method == "tools/call"
	rules := data.mcp_names.tools
	not name_fits(input.mcp.tool, rules)
}

name_fits(name, rules) if {
	is_string(name)
	count(name) >= object.get(rules, "min_length", 1)
	count(name) <= object.get(rules, "max_length", 128)
	trim(name, rules.characters) == ""
}

# --- Audience rules (profile data: input.profile.audience) -------------------

rules := input.profile.audience

# The token's audiences; a token without `aud` may borrow a claim (missing: claim:NAME).
audiences := input.token.audiences if count(input.token.audiences) > 0

audiences := [value] if {
	count(input.token.audiences) == 0
	startswith(rules.missing, "claim:")
	value := input.token.claims[substring(rules.missing, 6, -1)]
	is_string(value)
}

default audiences := []

matches(pattern, _) if pattern == "*"

matches(pattern, value) if pattern == value

refused_audience if {
	some aud in audiences
	some pattern in rules.reject
	matches(pattern, aud)
}

accepted(aud) if {
	some pattern in rules.accept
	matches(pattern, aud)
}

audiences_accepted if count(rules.accept) == 0

audiences_accepted if {
	rules.match == "any"
	some aud in audiences
	accepted(aud)
}

audiences_accepted if {
	rules.match == "all"
	every aud in audiences {
		accepted(aud)
	}
}

audience_problem := "audience_missing" if {
	count(audiences) == 0
	rules.missing != "accept"
} else := "audience_forbidden" if {
	refused_audience
} else := "audience_not_accepted" if {
	count(audiences) > 0
	not audiences_accepted
}
