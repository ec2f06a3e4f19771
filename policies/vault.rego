# The token vault's decisions: may this backend have this user's token, for this audience,
# with these scopes? (input.vault, documented in docs/vault.md)
#
# The backend has authenticated with its gateway.yaml credentials before this runs; the
# policy never learns whether the user has a grant, so its refusals cannot reveal it.
# data.authz.vault.backends.<id> = {audiences: [...], scopes: [...]}: a backend not listed
# gets nothing, a listed one only its audiences and at most its scopes.
package mcp.gateway

vault_backend := authz.vault.backends[input.vault.backend.id]

vault_decision := reject("vault_backend_not_allowed", 403) if {
	not vault_backend
} else := reject("vault_audience_not_allowed", 403) if {
	not vault_audience_allowed
} else := reject("vault_scope_required", 400) if {
	count(input.vault.scopes) == 0
} else := reject("vault_scope_not_allowed", 403) if {
	count(vault_extra_scopes) > 0
} else := {
	"action": "release",
	"reason": "allowed",
	"audience": [input.vault.audience],
	"scopes": input.vault.scopes,
}

vault_audience_allowed if {
	some audience in vault_backend.audiences
	audience == input.vault.audience
}

vault_extra_scopes contains scope if {
	some scope in input.vault.scopes
	not vault_backend_scope(scope)
}

vault_backend_scope(scope) if {
	some allowed in vault_backend.scopes
	allowed == scope
}

# mode: delegate (the profile's vault.delegate): the upstream gets a token the vault derives
# from the user's grant, for the delegate audience, with the delegate scopes the client's own
# token also has (never more than the client holds).
delegate_scopes := [scope |
	some scope in input.profile.delegate.scope
	some held in input.token.scopes
	held == scope
]
