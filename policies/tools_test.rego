package mcp.tools_test

import data.mcp.gateway

# Same conventions as gateway_test.rego: input replaced one key at a time, `with` values
# given as function calls (regopy 1.5.2 ignores references to other rules).

notes_authz(_) := {
	"unlisted": "deny",
	"tools": {
		"list_notes": {"scopes": ["notes.read"]},
		"read_*": {"scopes": ["notes.read"]},
		"create_note": {"scopes": ["notes.write"], "arguments": {"path": {"prefix": "/users/{sub}/"}}},
		"delete_note": {"scopes": ["notes.write"], "arguments": {"id": {"owned_by": "notes"}}},
		"tag_note": {"scopes": ["notes.write"], "arguments": {"tag": {"one_of": ["red", "blue"], "optional": true}}},
		"move_note": {"scopes": ["notes.write"], "arguments": {"id": {"owned_by": "notes"}, "to": {"prefix": "/users/{sub}/"}}},
		"purge_*": {"scopes": ["notes.admin"]},
		"archive_note": {"scopes": ["notes.write", "archive.write"]},
	},
	"scope_implies": {"notes.admin": ["notes.write"], "notes.write": ["notes.read"]},
	"resources": {"notes://*": {"scopes": ["notes.read"]}},
	"prompts": {"summarize": {"scopes": ["notes.read"]}},
	"owners": {"notes": {"1": "alice", "2": "bob"}},
}

token(scopes) := {"audiences": ["mcp-client"], "claims": {}, "scopes": scopes, "subject": "alice"}

open_profile(_) := {"mode": "passthrough", "audience": {"accept": [], "reject": [], "match": "any", "missing": "accept"}}

call(tool, args, scopes) := d if {
	d := gateway.decision with data.authz as notes_authz(0)
		with input.token as token(scopes)
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": tool, "arguments": args}
		with input.request as {"method": "POST"}
}

test_reader_may_read if call("read_note", {"id": 1}, ["notes.read"]).action == "accept"

test_glob_matches_family if call("read_archive", {}, ["notes.read"]).action == "accept"

test_unlisted_tool_refused if call("format_disk", {}, ["notes.read", "notes.write"]).reason == "tool_not_listed"

test_lookalike_name_refused if call("list_nоtes", {}, ["notes.read"]).reason == "invalid_tool_name"

test_unlisted_spec_name_refused if call("list_notes2", {}, ["notes.read"]).reason == "tool_not_listed"

test_reader_steps_up_for_write if {
	d := call("create_note", {"path": "/users/alice/a"}, ["notes.read"])
	d.reason == "insufficient_scope"
	d.status == 403
	d.scopes == ["notes.write"]
}

test_writer_creates_in_own_folder if call("create_note", {"path": "/users/alice/todo"}, ["notes.write"]).action == "accept"

test_writer_refused_in_other_folder if {
	call("create_note", {"path": "/users/bob/todo"}, ["notes.write"]).reason == "argument_not_allowed: path"
}

test_dot_segments_refused if {
	call("create_note", {"path": "/users/alice/../bob/x"}, ["notes.write"]).reason == "argument_not_allowed: path"
}

test_odd_characters_refused if {
	call("create_note", {"path": "/users/alice/a\u0000b"}, ["notes.write"]).reason == "argument_not_allowed: path"
	call("create_note", {"path": "/users/alice/a\\..\\b"}, ["notes.write"]).reason == "argument_not_allowed: path"
}

test_missing_argument_refused if call("create_note", {}, ["notes.write"]).reason == "argument_not_allowed: path"

test_argument_of_wrong_type_refused if {
	call("create_note", {"path": ["/users/alice/x"]}, ["notes.write"]).reason == "argument_not_allowed: path"
}

test_owner_may_delete if call("delete_note", {"id": 1}, ["notes.write"]).action == "accept"

test_non_owner_refused if call("delete_note", {"id": 2}, ["notes.write"]).reason == "argument_not_allowed: id"

test_unknown_id_refused if call("delete_note", {"id": 99}, ["notes.write"]).reason == "argument_not_allowed: id"

test_optional_argument if {
	call("tag_note", {}, ["notes.write"]).action == "accept"
	call("tag_note", {"tag": "red"}, ["notes.write"]).action == "accept"
	call("tag_note", {"tag": "green"}, ["notes.write"]).reason == "argument_not_allowed: tag"
}

test_resource_and_prompt_rules if {
	r := gateway.decision with data.authz as notes_authz(0)
		with input.token as token([])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "resources/read", "resource_uri": "notes://1"}
		with input.request as {"method": "POST"}
	r.reason == "insufficient_scope"
	p := gateway.decision with data.authz as notes_authz(0)
		with input.token as token([])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "prompts/get", "prompt": "other"}
		with input.request as {"method": "POST"}
	p.reason == "prompt_not_listed"
}

listing(scopes) := d if {
	d := gateway.decision with data.authz as notes_authz(0)
		with input.token as token(scopes)
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/list"}
		with input.request as {"method": "POST"}
		with input.listing as {"catalogue": "tools", "names": ["list_notes", "create_note", "purge_all", "format_disk"]}
}

test_listing_filtered_per_scopes if {
	sort(listing(["notes.read"]).visible) == ["list_notes"]
	sort(listing(["notes.read", "notes.write"]).visible) == ["create_note", "list_notes"]
	listing([]).visible == []
}

test_no_data_changes_nothing if {
	d := gateway.decision with input.token as token([])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": "anything"}
		with input.request as {"method": "POST"}
		with data.authz as {}
	d.action == "accept"
}

# Two failing arguments: one decision naming the first by name, never a rule conflict.
test_two_failing_arguments_do_not_conflict if {
	d := call("move_note", {"id": 2, "to": "/users/bob/x"}, ["notes.write"])
	d.reason == "argument_not_allowed: id"
	d.status == 403
}

test_owned_by_accepts_an_integer_or_its_string if {
	call("delete_note", {"id": 1}, ["notes.write"]).action == "accept"
	call("delete_note", {"id": "1"}, ["notes.write"]).action == "accept"
}

test_owned_by_refuses_fractions_and_huge_numbers if {
	call("delete_note", {"id": 1.5}, ["notes.write"]).reason == "argument_not_allowed: id"
	call("delete_note", {"id": 1e20}, ["notes.write"]).reason == "argument_not_allowed: id"
	call("delete_note", {"id": true}, ["notes.write"]).reason == "argument_not_allowed: id"
}

# Every name a request carries is judged, not only the method's own (input.mcp.targets).
with_targets(method, targets, scopes) := d if {
	d := gateway.decision with data.authz as notes_authz(0)
		with input.token as token(scopes)
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": method, "targets": targets}
		with input.request as {"method": "POST"}
}

test_completion_on_a_hidden_prompt_is_refused if {
	d := with_targets("completion/complete", [{"catalogue": "prompts", "name": "secret_prompt"}], ["notes.read"])
	d.reason == "prompt_not_listed"
}

test_subscription_to_an_allowed_resource_is_accepted if {
	with_targets("resources/subscribe", [{"catalogue": "resources", "name": "notes://1"}], ["notes.read"]).action == "accept"
}

test_one_hidden_uri_among_several_refuses_the_listen if {
	targets := [{"catalogue": "resources", "name": "notes://1"}, {"catalogue": "resources", "name": "files:///etc/passwd"}]
	with_targets("subscriptions/listen", targets, ["notes.read"]).reason == "resource_not_listed"
}

test_every_target_needs_its_scopes if {
	d := with_targets("subscriptions/listen", [{"catalogue": "resources", "name": "notes://1"}], [])
	d.reason == "insufficient_scope"
	d.scopes == ["notes.read"]
}

test_a_broader_scope_covers_what_it_implies_transitively if {
	call("list_notes", {}, ["notes.admin"]).action == "accept" # admin → write → read
	call("read_note", {"id": 1}, ["notes.write"]).action == "accept"
	call("purge_all", {}, ["notes.write"]).scopes == ["notes.admin"] # never upwards
}

test_every_missing_scope_is_named_in_one_step_up if {
	d := call("archive_note", {}, ["notes.read"])
	d.reason == "insufficient_scope"
	d.scopes == ["archive.write", "notes.write"]
}

test_an_implied_scope_is_not_asked_for_again if call("archive_note", {}, ["notes.admin"]).scopes == ["archive.write"]

# --- A team's rules as data (examples/team-rules.yaml) ------------------------

team_authz(_) := {
	"tools": {
		"list_notes": {"scopes": ["notes.read"]},
		"read_*": {"scopes": ["notes.read"]},
		"create_note": {"scopes": ["notes.write"], "arguments": {"title": {"not_contains": "password", "pattern": "[A-Za-z0-9 ._-]{1,80}"}}},
		"purge_*": {"scopes": ["notes.write"], "claims": {"groups": {"contains": "notes-admins"}}},
	},
	"clients": {"untrusted-agent": {"tools": ["list_notes", "read_*"]}},
}

team_token(client, groups) := {
	"audiences": ["mcp-client"], "claims": {"groups": groups, "azp": client}, "client_id": client,
	"scopes": ["notes.read", "notes.write"], "subject": "alice",
}

team_call(tool, args, client, groups) := d if {
	d := gateway.decision with data.authz as team_authz(0)
		with input.token as team_token(client, groups)
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": tool, "arguments": args}
		with input.request as {"method": "POST"}
}

test_only_admins_purge if {
	team_call("purge_all", {}, "mcp-client", ["notes-admins", "staff"]).action == "accept"
	team_call("purge_all", {}, "mcp-client", ["staff"]).reason == "claim_not_allowed: groups"
	team_call("purge_all", {}, "mcp-client", null).reason == "claim_not_allowed: groups"
}

test_no_password_in_a_title if {
	team_call("create_note", {"title": "shopping list"}, "mcp-client", []).action == "accept"
	team_call("create_note", {"title": "my PassWord is x"}, "mcp-client", []).reason == "argument_not_allowed: title"
	team_call("create_note", {"title": "semi;colon"}, "mcp-client", []).reason == "argument_not_allowed: title"
}

test_the_untrusted_agent_only_reads if {
	team_call("read_note", {}, "untrusted-agent", []).action == "accept"
	team_call("create_note", {"title": "x"}, "untrusted-agent", []).reason == "client_not_allowed"
	d := gateway.decision with data.authz as team_authz(0)
		with input.token as team_token("untrusted-agent", [])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/list"}
		with input.request as {"method": "POST"}
		with input.listing as {"catalogue": "tools", "names": ["list_notes", "read_note", "create_note", "purge_all"]}
	d.visible == ["list_notes", "read_note"]
}

test_a_teams_own_deny_rule_refuses if {
	d := team_call("read_note", {}, "mcp-client", []) with data.mcp.custom.deny as {"maintenance_window"}
	d.reason == "maintenance_window"
	d.status == 403
}

test_claim_one_of_and_not_one_of if {
	rules := {"tools": {"read_*": {"claims": {"azp": {"one_of": ["web", "cli"]}, "acr": {"not_one_of": ["weak"]}}}}}
	allowed := gateway.decision with data.authz as rules
		with input.token as team_token("cli", [])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": "read_note"}
		with input.request as {"method": "POST"}
	allowed.action == "accept"
	other := gateway.decision with data.authz as rules
		with input.token as team_token("agent", [])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": "read_note"}
		with input.request as {"method": "POST"}
	other.reason == "claim_not_allowed: azp"
}

test_a_limited_clients_other_catalogues_are_closed if {
	d := gateway.decision with data.authz as team_authz(0)
		with input.token as team_token("untrusted-agent", [])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "prompts/get", "prompt": "summarize"}
		with input.request as {"method": "POST"}
	d.reason == "client_not_allowed"
}

test_an_allowed_request_names_the_limits_it_counts_against if {
	rules := {
		"tools": {"list_notes": {}, "purge_*": {}},
		"limits": {"tools/call": {"per_subject": "60/minute"}, "purge_*": {"per_subject": "1/hour", "per_client": "5/day"}},
	}
	d := gateway.decision with data.authz as rules
		with input.token as team_token("cli", [])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/call", "tool": "purge_all"}
		with input.request as {"method": "POST"}
	d.action == "accept"
	{l | some l in d.limits} == {
		{"name": "tools/call", "per": "per_subject", "rate": "60/minute"},
		{"name": "purge_*", "per": "per_subject", "rate": "1/hour"},
		{"name": "purge_*", "per": "per_client", "rate": "5/day"},
	}
	other := gateway.decision with data.authz as rules
		with input.token as team_token("cli", [])
		with input.profile as open_profile(0)
		with input.mcp as {"kind": "request", "method": "tools/list"}
		with input.request as {"method": "POST"}
	not other.limits
}
