"""The token vault: users' IdP refresh tokens sealed at rest, released to backends by policy."""
