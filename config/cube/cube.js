// Cube configuration for Monitor Gateway (Cube 0.33.65, ClickHouse driver 0.28.64).
//
// One Cube process serves every project. The gateway sends an RS256 token it signs itself; Cube's
// default checkAuth verifies it against CUBEJS_JWK_URL and the token's claims become the security
// context: {iss, aud, iat, exp, sub, database, instance_id, project_id}. Everything tenant-specific
// (ClickHouse database, compiled data model, query cache and queue) is chosen from
// `securityContext.database` alone, and a context without a well-formed database is refused.
//
// The data model in model/ names bare tables (`snowplow_events`); they resolve against the
// database that driverFactory binds the connection to, so the model itself is tenant-agnostic.

const http = require('http');
const https = require('https');
const ClickHouseDriver = require('@cubejs-backend/clickhouse-driver');

// The driver's HTTP client uses Node's global agent unless given one, and since Node 19 that
// agent times sockets out after 5 s, which the client answers by aborting: every ClickHouse query
// longer than 5 s would fail as "socket hang up". Queries have their deadlines elsewhere (Cube's
// query timeout, the gateway's), so this agent sets none; it keeps no idle connections either,
// which ClickHouse would close after its keep_alive_timeout under a request about to reuse one.
const clickhouseAgent = process.env.CUBEJS_DB_SSL === 'true'
  ? new https.Agent({ keepAlive: false })
  : new http.Agent({ keepAlive: false });

// Database names come only from the gateway's tenant key: gitlab_project_<32 lowercase hex>.
const DATABASE_PATTERN = /^gitlab_project_[0-9a-f]{32}$/;

// The driver lets CUBEJS_DB_NAME win over the database we pass in, which would silently point
// every tenant at one database. Refuse to start rather than leak across tenants.
if (process.env.CUBEJS_DB_NAME) {
  throw new Error('CUBEJS_DB_NAME must not be set: the database comes from the security context');
}

function isTenantDatabase(database) {
  return typeof database === 'string' && DATABASE_PATTERN.test(database);
}

// Returns the tenant database of a request context, or throws.
function tenantDatabase(context) {
  const database = context && context.securityContext && context.securityContext.database;
  if (!isTenantDatabase(database)) {
    throw new Error('security context has no valid "database" claim');
  }
  return database;
}

// Cube 0.33 pastes a query's time zone into its SQL unescaped, so anything but a real IANA zone
// name could carry SQL into another tenant's database. Names are checked for shape first, then
// against the zones Node knows.
const TIMEZONE_SHAPE = /^[A-Za-z][A-Za-z0-9_+\-]*(\/[A-Za-z0-9_+\-]+)*$/;

function checkTimezone(timezone) {
  if (timezone === undefined) {
    return;
  }
  let known = false;
  if (typeof timezone === 'string' && timezone.length <= 64 && TIMEZONE_SHAPE.test(timezone)) {
    try {
      new Intl.DateTimeFormat('en-US', { timeZone: timezone });
      known = true;
    } catch (e) {
      known = false;
    }
  }
  if (!known) {
    throw new Error('timezone must be an IANA time zone name such as "UTC" or "Europe/Berlin"');
  }
}

module.exports = {
  // Every query passes here after the security context is known and before SQL is built.
  queryRewrite: (query, { securityContext }) => {
    if (!isTenantDatabase(securityContext && securityContext.database)) {
      throw new Error('security context has no valid "database" claim');
    }
    checkTimezone(query.timezone);
    return query;
  },

  // Token verification itself comes from CUBEJS_JWK_URL, CUBEJS_JWT_AUDIENCE, CUBEJS_JWT_ISSUER
  // and CUBEJS_JWT_ALGS; these only tune how the gateway's key set is cached. A token whose `kid`
  // is not in the cached set makes Cube fetch the set again, at most once per refetch window
  // (default 60 s, so a restarted gateway with a new key would be refused for up to a minute).
  // A set served without Cache-Control is kept jwkDefaultExpire seconds (default 300).
  jwt: {
    jwkRefetchWindow: 5 * 1000,
    jwkDefaultExpire: 60,
  },

  // First line of refusal: a verified token without a valid `database` claim gets no API scope at
  // all, so Cube answers 403 ("API scope is missing: ...") before compiling or querying anything.
  // The `jobs` scope (pre-aggregation build API) is never granted.
  contextToApiScopes: async (securityContext, defaultScopes) => {
    if (!isTenantDatabase(securityContext && securityContext.database)) {
      return [];
    }
    return defaultScopes.filter((scope) => scope !== 'jobs');
  },

  // Compiled data model cache key.
  contextToAppId: (context) => `CUBE_APP_${tenantDatabase(context)}`,

  // Query orchestrator (driver pool, query cache and queue) key.
  contextToOrchestratorId: (context) => `CUBE_ORCH_${tenantDatabase(context)}`,

  // A ClickHouse driver bound to the tenant's database. Host, port and user come from
  // CUBEJS_DB_HOST / CUBEJS_DB_PORT / CUBEJS_DB_USER (the readonly `cube` user); CUBEJS_DB_PASS
  // must be set even when empty, or this driver version sends the password "undefined". Passing
  // `queryOptions` replaces the driver's default (CUBEJS_DB_NAME or 'default') entirely; its
  // contents are sent as URL settings with every query, so `database` selects the schema.
  // readOnly: the `cube` user has readonly = 1, so the driver must not send settings of its own.
  // agent: see clickhouseAgent above; the driver hands it to every request.
  driverFactory: (context) => new ClickHouseDriver({
    readOnly: true,
    agent: clickhouseAgent,
    queryOptions: { database: tenantDatabase(context) },
  }),

  // Nothing refreshes in the background: there is no tenant-less context to refresh with.
  scheduledRefreshContexts: async () => [],
};
