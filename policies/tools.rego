# Per-name rules for tools, resources and prompts, read from the bundle's data.
#
# The data (data.authz, any data file of the bundle; see docs/policy.md) maps names,
# exact or glob, to the scopes they need and to rules on their arguments. Every entry
# whose pattern matches a name applies. Without data.authz nothing here refuses
# anything, so the gateway behaves as before for bundles that have no such file.
package mcp.gateway

authz := data.authz if is_object(data.authz)

default authz := {}

# --- What a request names ---------------------------------------------------

# The gateway lists every name a request carries in input.mcp.targets ({catalogue, name}):
# a tool call, a prompt, a resource read, but also a completion on a prompt or a resource
# template, a (un)subscription, a listen stream's resource subscriptions. Without it (an
# input written by hand), the method's own name is the target.
target := {"catalogue": "tools", "name": input.mcp.tool} if input.mcp.method == "tools/call"

target := {"catalogue": "resources", "name": input.mcp.resource_uri} if input.mcp.method == "resources/read"

target := {"catalogue": "prompts", "name": input.mcp.prompt} if input.mcp.method == "prompts/get"

has_targets if is_array(input.mcp.targets)

targets := input.mcp.targets if has_targets

targets := [target] if {
	not has_targets
	target
}

default targets := []

# `null` delimiters: `*` matches every character (OPA's `[]` would stop at ".").
name_matches(pattern, name) if pattern == name

name_matches(pattern, name) if glob.match(pattern, null, name)

# (`req := rules[pattern]` rather than `some pattern, req in rules`: regopy 1.5.2 does
# not compile the two-variable `some ... in` inside a comprehension.)
requirements(catalogue, name) := [req |
	rules := object.get(authz, catalogue, {})
	req := rules[pattern]
	name_matches(pattern, name)
]

# A catalogue with a section in the data lists what may be used; a name no entry
# matches is refused unless `unlisted: allow`.
unlisted(catalogue, name) if {
	is_object(authz[catalogue])
	count(requirements(catalogue, name)) == 0
	object.get(authz, "unlisted", "deny") != "allow"
}

token_scopes contains scope if some scope in input.token.scopes

# Scope hierarchies (`scope_implies` in the data: a scope → the narrower scopes it includes,
# e.g. notes.admin → [notes.write], notes.write → [notes.read]): a token holds every scope its
# scopes imply, transitively, and only what none of them covers is missing. (graph.reachable
# lists the scopes that have entries; their entries add the leaves.)
scope_implies := object.get(authz, "scope_implies", {})

broader_scopes := graph.reachable(scope_implies, token_scopes_granted) if is_object(scope_implies)

token_scopes_granted := {scope | some scope in input.token.scopes}

token_scopes contains scope if {
	some broader in broader_scopes
	some scope in object.get(scope_implies, broader, [])
}

missing_scopes(catalogue, name) := {scope |
	some req in requirements(catalogue, name)
	some scope in object.get(req, "scopes", [])
	not token_scopes[scope]
}

usable(catalogue, name) if {
	not unlisted(catalogue, name)
	count(missing_scopes(catalogue, name)) == 0
	not client_refused(catalogue, name)
	count(failing_claims(requirements(catalogue, name))) == 0
}

# --- Who may use a name: the calling client, the caller's claims --------------

# `clients.<client id>.<catalogue>`: the only names (exact or glob) that client may use in
# that catalogue; a client not listed is not limited here. The client is the token's
# client_id (azp or client_id).
client_refused(catalogue, name) if {
	allowed := authz.clients[input.token.client_id][catalogue]
	not any_matches(allowed, name)
}

client_refused(catalogue, _) if {
	limits := authz.clients[input.token.client_id]
	is_object(limits)
	not limits[catalogue]
}

any_matches(patterns, name) if {
	some pattern in patterns
	name_matches(pattern, name)
}

client_problem := "client_not_allowed" if {
	some t in targets
	client_refused(t.catalogue, t.name)
}

# `claims.<claim>` on an entry: conditions on the caller's token, all of which must hold
# (contains: a list claim holds the value, or a string claim equals it; one_of / not_one_of:
# the claim's value is / is not in the list). An unknown condition fails (closed).
known_claim_checks := {"contains", "one_of", "not_one_of"}

failing_claims(entries) := {claim |
	some req in entries
	conditions := object.get(req, "claims", {})[claim]
	not claim_ok(conditions, object.get(input.token.claims, claim, null))
}

claim_ok(conditions, value) if {
	every check in object.keys(conditions) {
		known_claim_checks[check]
		claim_check_ok(check, conditions[check], value)
	}
}

claim_check_ok("contains", want, value) if {
	is_array(value)
	some item in value
	item == want
}

claim_check_ok("contains", want, value) if value == want

claim_check_ok("one_of", want, value) if {
	value != null
	some allowed in want
	allowed == value
}

claim_check_ok("not_one_of", refused, value) if {
	every r in refused {
		r != value
	}
}

claim_problem := concat("", ["claim_not_allowed: ", min(claims)]) if {
	claims := {claim | some entries in target_entries; some claim in failing_claims(entries)}
	count(claims) > 0
}

# --- A team's own rules, without editing these files ------------------------

# A package `mcp.custom` beside the shipped files may define `deny`, a set of reasons
# (strings); any reason refuses the request (403, the smallest reason named). It reads the
# same input (and data) as this policy.
custom_problem := min(custom_reasons) if count(custom_reasons) > 0

custom_reasons := {reason | some reason in data.mcp.custom.deny; is_string(reason)}

# --- The request's problems, in the order the decision checks them ----------

# Each target's entries, found once (a rule is evaluated once per query; a function call is
# not remembered, and matching every pattern is the policy's main cost).
target_entries := [requirements(t.catalogue, t.name) | some t in targets]

# The entries whose argument rules apply: the tool's or the prompt's own.
target_requirements := target_entries[0] if input.mcp.method in {"tools/call", "prompts/get"}

default target_requirements := []

# (concat, not sprintf: sprintf is provided by the host in OPA's WebAssembly, and a
# decision must not depend on a host's number formatting.)
unlisted_targets contains concat("", [trim_suffix(t.catalogue, "s"), "_not_listed"]) if {
	some i, t in targets
	is_object(authz[t.catalogue])
	count(target_entries[i]) == 0
	object.get(authz, "unlisted", "deny") != "allow"
}

catalogue_problem := min(unlisted_targets) if count(unlisted_targets) > 0

missing := {scope |
	some entries in target_entries
	some req in entries
	some scope in object.get(req, "scopes", [])
	not token_scopes[scope]
}

arguments := input.mcp.arguments if is_object(input.mcp.arguments)

default arguments := {}

# Each argument rule is an object of checks; all must hold. An unknown check refuses.
# Every failing argument is collected; the decision names the first (by name), so two
# failing arguments never make two conflicting values of one rule.
failing_arguments contains name if {
	some req in target_requirements
	checks := object.get(req, "arguments", {})[name]
	not argument_ok(checks, object.get(arguments, name, null))
}

argument_problem := concat("", ["argument_not_allowed: ", min(failing_arguments)]) if count(failing_arguments) > 0

known_checks := {"optional", "prefix", "one_of", "owned_by", "max_length", "not_contains", "pattern"}

argument_ok(checks, null) if checks.optional == true

argument_ok(checks, value) if {
	value != null
	every check in object.keys(checks) {
		known_checks[check]
		check_ok(check, checks[check], value)
	}
}

check_ok("optional", _, _)

# A path under a prefix ({sub} is the caller): plain ASCII, no "." or ".." segment.
# (trim and split, not regex: linear, and nothing to compile on every evaluation.)
path_characters := "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~/ -"

check_ok("prefix", want, value) if {
	is_string(value)
	startswith(value, replace(want, "{sub}", input.token.subject))
	trim(value, path_characters) == ""
	every segment in split(value, "/") {
		segment != "."
		segment != ".."
	}
}

check_ok("one_of", want, value) if {
	some allowed in want
	allowed == value
}

# The value is a key of data.authz.owners[<collection>] whose owner is the caller: a
# string as it is, an integer in decimal (1 and "1" name the same note; 1.5 names none).
check_ok("owned_by", collection, value) if {
	authz.owners[collection][owner_key(value)] == input.token.subject
}

check_ok("max_length", limit, value) if {
	is_string(value)
	count(value) <= limit
}

# A string that does not contain the text, whatever the letter case.
check_ok("not_contains", text, value) if {
	is_string(value)
	not contains(lower(value), lower(text))
}

# A string the whole of which matches the regular expression (RE2: linear time, whatever
# the value; anchored here, so `[a-z]+` means the whole value).
check_ok("pattern", expression, value) if {
	is_string(value)
	regex.match(concat("", ["^(?:", expression, ")$"]), value)
}

owner_key(value) := value if is_string(value)

owner_key(value) := format_int(value, 10) if {
	is_number(value)
	value == floor(value)
	abs(value) < 1000000000000000
}

# --- Listings: one evaluation for every item of a page ----------------------

# input.listing = {"catalogue": "tools", "names": [...]}: the names the client may see.
visible := [name |
	some name in input.listing.names
	usable(input.listing.catalogue, name)
]

with_listing(d) := object.union(d, {"visible": visible}) if {
	input.listing
} else := d

# --- Rate limits, as data ----------------------------------------------------

# `limits.<method or name pattern>.<per_subject|per_client>: "N/second|minute|hour|day"`:
# an allowed request carries the limits it counts against in its decision; the gateway keeps
# the counters (a token bucket per limit and identity, in memory or Redis) and answers 429.
limit_specs := object.get(authz, "limits", {})

request_limits contains {"name": key, "per": per, "rate": limit_specs[key][per]} if {
	limit_specs[key][per]
	limit_applies(key)
}

limit_applies(key) if key == input.mcp.method

limit_applies(key) if {
	some t in targets
	name_matches(key, t.name)
}

with_limits(d) := object.union(d, {"limits": request_limits}) if {
	count(request_limits) > 0
	not input.listing
} else := d

# --- Step-up ----------------------------------------------------------------

step_up := {
	"action": "reject",
	"reason": "insufficient_scope",
	"status": 403,
	"scopes": sort([scope | some scope in missing]),
}
