// One row per Snowplow session (domain_sessionid) of one project, built from `snowplow_events`.
// A session starts at its first event and ends at its last one (derived timestamps).
cube('Sessions', {
  sql: `
    SELECT
      domain_sessionid AS session_id,
      any(domain_userid) AS domain_userid,
      min(derived_tstamp) AS start_at,
      max(derived_tstamp) AS end_at,
      count() AS event_count
    FROM snowplow_events
    WHERE domain_sessionid != ''
    GROUP BY domain_sessionid
  `,

  measures: {
    count: {
      type: 'count',
    },

    usersCount: {
      type: 'count_distinct',
      sql: `${CUBE}.domain_userid`,
    },

    averageDurationMinutes: {
      type: 'avg',
      sql: `dateDiff('second', ${CUBE}.start_at, ${CUBE}.end_at) / 60`,
    },

    // Sessions per distinct user; NULL (not a division by zero) when there are no sessions.
    averagePerUser: {
      type: 'number',
      sql: `${count} / nullIf(${usersCount}, 0)`,
    },
  },

  dimensions: {
    sessionId: {
      sql: `${CUBE}.session_id`,
      type: 'string',
      primaryKey: true,
      public: true,
    },

    domainUserid: {
      sql: `${CUBE}.domain_userid`,
      type: 'string',
    },

    startAt: {
      sql: `${CUBE}.start_at`,
      type: 'time',
    },

    endAt: {
      sql: `${CUBE}.end_at`,
      type: 'time',
    },

    durationMinutes: {
      sql: `dateDiff('second', ${CUBE}.start_at, ${CUBE}.end_at) / 60`,
      type: 'number',
    },

    eventCount: {
      sql: `${CUBE}.event_count`,
      type: 'number',
    },
  },
});
