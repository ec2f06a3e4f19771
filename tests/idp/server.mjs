// A real OpenID provider (panva/oidc-provider) for the gateway's tests.
//
//   node server.mjs --port N --shape keycloak|nextcloud
//
// keycloak:  issuer http://127.0.0.1:N/realms/mcp; JWT header typ "JWT"; aud a list
//            (["nextcloud-mcp-server", "account"] by default); azp; claim typ "Bearer";
//            no client_id claim; RFC 8693 token exchange following Keycloak's Standard
//            Token Exchange V2 rules (client auth, `audience` only, no `resource`, the
//            subject token's aud must include the requesting client).
// nextcloud: issuer http://127.0.0.1:N; JWT header typ "at+JWT"; aud = the `resource`
//            parameter if sent, else the client id; client_id and azp claims; opaque
//            tokens verified by RFC 7662 introspection; no token exchange.
//
// No browser login here: tokens for a user come from a test-only grant type
// (urn:test:grant-type:user, a confidential client names the subject), which mints them
// through the provider's own AccessToken model, signed with the provider's keys.
// The authorization code flow (PKCE) runs too, shaped like the real IdPs where it matters:
//   keycloak:  `resource` is ignored; `aud` comes from the client's "audience mappers"
//              (the gateway's client nextcloud-mcp-server: [itself, "account"]; any other
//              client, dynamically registered ones included: ["account"]).
//   nextcloud: `aud` is the requesting client's own id; refresh tokens are single-use.
// Dynamic registration (RFC 7591) is open, as on IdPs that allow it. The gateway's client
// may use any loopback port for its callback (its /oauth/callback). Login and consent pages
// are answered at once, for the user named by `login_hint`, with every scope asked for (a
// user who always says yes). Refresh tokens are issued to every client allowed the grant.
// Test-only admin endpoints under /test/: stats, failure modes, revocation.
import http from 'node:http';
import { parseArgs } from 'node:util';
import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    shape: { type: 'string', default: 'keycloak' },
    'access-token-ttl': { type: 'string', default: '300' }, // seconds, code-flow tokens
  },
});
const accessTokenTtl = Number(args['access-token-ttl']);
const port = Number(args.port);
const shape = args.shape;
const base = `http://127.0.0.1:${port}`;
const prefix = shape === 'keycloak' ? '/realms/mcp' : '';
const issuer = base + prefix;

const CLIENT_ID = 'nextcloud-mcp-server';
const CLIENT_SECRET = 'mcp-secret';
const USER_GRANT = 'urn:test:grant-type:user';
const EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const EXCHANGE_AUDIENCES = new Set(['nextcloud', 'notes-backend']);
// Keycloak's audience mappers: which audiences a client's tokens carry (authorization code flow)
const AUDIENCE_MAPPERS = { [CLIENT_ID]: [CLIENT_ID, 'account'] };
const CODE_FLOW_RESOURCE = 'urn:test:idp-api';

const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
const signingJwk = { ...(await jose.exportJWK(privateKey)), kid: `test-${shape}-1`, alg: 'RS256', use: 'sig' };

const newStats = () => ({
  exchanges: 0, exchange_attempts: 0, introspections: 0, tokens: 0,
  code_grants: 0, refresh_grants: 0, revocations: 0, registrations: 0, refresh_failures: 0,
});
const stats = newStats();
let exchangeMode = 'ok'; // ok | fail500 | slow | malformed

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'mcp-cli',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/callback'],
    },
    {
      // the gateway's own client: exchange, introspection, and (proxy mode) the code flow
      client_id: CLIENT_ID,
      client_secret: CLIENT_SECRET,
      grant_types: [USER_GRANT, EXCHANGE_GRANT, 'authorization_code', 'refresh_token'],
      response_types: ['code'],
      application_type: 'native', // loopback redirect URIs match on any port (RFC 8252)
      redirect_uris: ['http://127.0.0.1/oauth/callback'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    {
      client_id: 'other-client',
      client_secret: 'other-secret',
      grant_types: [USER_GRANT, EXCHANGE_GRANT],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
    },
  ],
  jwks: { keys: [signingJwk] },
  scopes: ['openid', 'offline_access', 'notes.read', 'notes.write', 'notes.admin'],
  features: {
    devInteractions: { enabled: false },
    introspection: {
      enabled: true,
      // Nextcloud: the owning client, or the client named as the token's resource
      allowedPolicy: async (ctx, client, token) => {
        stats.introspections += 1;
        const aud = [].concat(token.aud ?? []);
        return client.clientId === token.clientId || aud.includes(client.clientId);
      },
    },
    revocation: { enabled: true },
    registration: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // neither IdP derives the audience from RFC 8707 `resource`: every code-flow token is
      // for the IdP's own API, its `aud` set per shape below
      defaultResource: () => CODE_FLOW_RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator, client) => ({
        scope: 'notes.read notes.write notes.admin',
        audience: client.clientId, // Keycloak's list of mapped audiences is set in the JWT customizer
        accessTokenTTL: accessTokenTtl,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Nextcloud's refresh tokens are single-use; Keycloak's (by default) are not
  rotateRefreshToken: () => shape === 'nextcloud',
  interactions: { url: (ctx, interaction) => `${prefix}/interaction/${interaction.uid}` },
  pkce: { required: () => true },
  // Test-minted tokens carry their claims on the instance (`_aud`, `_extra`): see mint()
  extraTokenClaims: async (ctx, token) => token._extra,
  formats: {
    customizers: {
      jwt: async (ctx, token, jwt) => {
        if (token._aud !== undefined) jwt.payload.aud = token._aud;
        else if (shape === 'keycloak' && token.gty !== USER_GRANT) jwt.payload.aud = AUDIENCE_MAPPERS[token.clientId] ?? ['account'];
        jwt.payload.azp ??= token.clientId; // both IdPs name the client that obtained the token
        if (shape === 'keycloak') {
          jwt.header = { typ: 'JWT' };
          jwt.payload.typ = 'Bearer';
          delete jwt.payload.client_id;
        } else {
          jwt.header = { typ: 'at+JWT' };
        }
      },
    },
  },
  ttl: { AccessToken: 300 },
});
provider.proxy = false;
provider.on('grant.success', (ctx) => {
  if (ctx.oidc.params.grant_type === 'authorization_code') stats.code_grants += 1;
  if (ctx.oidc.params.grant_type === 'refresh_token') stats.refresh_grants += 1;
});
provider.on('grant.error', (ctx) => {
  if (ctx.oidc.params?.grant_type === 'refresh_token') stats.refresh_failures += 1;
});
for (const event of ['server_error', 'authorization.error', 'grant.error', 'registration_create.error', 'revocation.error']) {
  provider.on(event, (ctx, err) => { process.stderr.write(`${event}: ${err?.name}: ${err?.message} ${err?.error_description ?? ''}\n`); });
}
provider.on('refresh_token.destroyed', () => { stats.revocations += 1; }); // revoked (rotation consumes, never destroys)
provider.on('registration_create.success', () => { stats.registrations += 1; });

function jwtResourceServer(lifetime) {
  return new provider.ResourceServer('urn:test:jwt', {
    audience: 'unused', // replaced by the token's own `_aud` in the JWT customizer
    scope: '',
    accessTokenTTL: lifetime,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  });
}

async function mint(ctx, { subject, scope, aud, format, lifetime, extra }) {
  const token = new provider.AccessToken({ accountId: subject, client: ctx.oidc.client, scope, gty: USER_GRANT });
  token.aud = aud; // persisted: what introspection reports for opaque tokens
  token._aud = aud; // what the JWT carries (the resource server's audience would win otherwise)
  token._extra = { azp: ctx.oidc.client.clientId, ...extra };
  if (lifetime) token.expiresIn = lifetime;
  if (format !== 'opaque') token.resourceServer = jwtResourceServer(lifetime || 300);
  stats.tokens += 1;
  return { value: await token.save(), token };
}

function oauthError(ctx, status, error, description) {
  ctx.status = status;
  ctx.body = { error, error_description: description };
}

// Test-only: a confidential client obtains a token for a named user.
provider.registerGrantType(USER_GRANT, async (ctx) => {
  const p = ctx.oidc.params;
  const resource = p.resource;
  let aud;
  const audiences = [].concat(p.audience ?? []); // one value arrives as a string, several as a list
  if (audiences.length) aud = audiences.length === 1 && shape !== 'keycloak' ? audiences[0] : audiences;
  else if (shape === 'keycloak') aud = [CLIENT_ID, 'account'];
  else aud = resource || ctx.oidc.client.clientId;
  const format = p.format || 'jwt';
  if (p.no_aud === 'true') aud = undefined; // opaque only: a JWT access token must have an audience
  const { value, token } = await mint(ctx, {
    subject: p.subject || 'alice',
    scope: p.scope || 'openid notes.read notes.write',
    aud,
    format,
    lifetime: p.lifetime ? Number(p.lifetime) : undefined,
  });
  ctx.body = { access_token: value, token_type: 'Bearer', expires_in: token.expiration, scope: token.scope };
}, new Set(['subject', 'scope', 'audience', 'resource', 'format', 'lifetime', 'no_aud']), new Set(['audience']));

// RFC 8693, with Keycloak's Standard Token Exchange V2 rules.
provider.registerGrantType(EXCHANGE_GRANT, async (ctx) => {
  const p = ctx.oidc.params;
  const client = ctx.oidc.client;
  stats.exchange_attempts += 1;
  if (exchangeMode === 'fail500') return oauthError(ctx, 500, 'server_error', 'the test IdP was told to fail');
  if (exchangeMode === 'slow') await new Promise((r) => { setTimeout(r, 10_000); });
  if (shape !== 'keycloak') return oauthError(ctx, 400, 'unsupported_grant_type', 'no token exchange here');
  if (p.resource) return oauthError(ctx, 400, 'invalid_request', 'Parameter resource is not supported');
  if (p.subject_token_type !== ACCESS_TOKEN_TYPE) return oauthError(ctx, 400, 'invalid_request', 'Unsupported subject_token_type');
  if (p.requested_token_type && p.requested_token_type !== ACCESS_TOKEN_TYPE) {
    return oauthError(ctx, 400, 'invalid_request', 'Unsupported requested_token_type');
  }
  let subject;
  try {
    const jwks = jose.createLocalJWKSet(await provider_jwks());
    ({ payload: subject } = await jose.jwtVerify(p.subject_token, jwks, { issuer }));
  } catch {
    return oauthError(ctx, 400, 'invalid_grant', 'Invalid token');
  }
  const subjectAud = [].concat(subject.aud ?? []);
  if (!subjectAud.includes(client.clientId)) {
    return oauthError(ctx, 403, 'access_denied', 'Client is not within the token audience');
  }
  const requested = [].concat(p.audience ?? []);
  if (requested.some((a) => !EXCHANGE_AUDIENCES.has(a))) {
    return oauthError(ctx, 400, 'invalid_request', 'Requested audience not available');
  }
  const subjectScopes = new Set(String(subject.scope || '').split(' ').filter(Boolean));
  const wanted = p.scope ? p.scope.split(' ').filter(Boolean) : [...subjectScopes];
  if (wanted.some((s) => !subjectScopes.has(s))) return oauthError(ctx, 400, 'invalid_scope', 'Invalid scopes');
  stats.exchanges += 1;
  const { value, token } = await mint(ctx, {
    subject: subject.sub,
    scope: wanted.join(' '),
    aud: requested.length === 1 ? requested[0] : requested.length ? requested : client.clientId,
    format: 'jwt',
  });
  if (exchangeMode === 'malformed') {
    ctx.body = { token_type: 'Bearer', note: 'no access_token here' };
    return;
  }
  ctx.body = {
    access_token: value,
    expires_in: token.expiration,
    token_type: 'Bearer',
    issued_token_type: ACCESS_TOKEN_TYPE,
    scope: token.scope,
    refresh_expires_in: 0,
  };
}, new Set(['subject_token', 'subject_token_type', 'requested_token_type', 'audience', 'resource', 'scope', 'actor_token', 'actor_token_type']), new Set(['audience']));

async function provider_jwks() {
  const { kid, alg, use, kty, n, e } = signingJwk;
  return { keys: [{ kid, alg, use, kty, n, e }] };
}

const callback = provider.callback();

async function admin(req, res, url) {
  const send = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (url.pathname === '/test/stats') return send(200, { ...stats, exchangeMode });
  if (url.pathname === '/test/reset') {
    Object.assign(stats, newStats());
    exchangeMode = 'ok';
    return send(200, { ok: true });
  }
  if (url.pathname === '/test/exchange-mode') {
    exchangeMode = url.searchParams.get('mode') || 'ok';
    return send(200, { exchangeMode });
  }
  if (url.pathname === '/test/revoke') {
    const token = await provider.AccessToken.find(url.searchParams.get('token') || '');
    if (token) await token.destroy();
    return send(200, { revoked: Boolean(token) });
  }
  return send(404, { error: 'not_found' });
}

// The login and consent "pages": the user named by login_hint agrees to everything asked.
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params } = details;
  let result;
  if (prompt.name === 'login') {
    result = { login: { accountId: String(params.login_hint || 'alice') } };
  } else {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  }
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: true });
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, base);
  if (url.pathname.startsWith(`${prefix}/interaction/`)) {
    interaction(req, res).catch((err) => { res.writeHead(500); res.end(String(err)); });
    return;
  }
  if (url.pathname.startsWith('/test/')) {
    admin(req, res, url).catch((err) => { res.writeHead(500); res.end(String(err)); });
    return;
  }
  if (prefix && !url.pathname.startsWith(prefix)) {
    res.writeHead(404);
    res.end();
    return;
  }
  if (prefix) {
    req.originalUrl = req.url;
    req.url = req.url.slice(prefix.length) || '/';
  }
  callback(req, res);
});
server.keepAliveTimeout = 5_000;
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening ${issuer}\n`);
});
void errors;
