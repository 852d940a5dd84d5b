// Share of users who came back, over the events of one project (`snowplow_events`).
//
// A user (domain_userid) is returning when any of their events in the selected range belongs to
// a session other than their first one, that is when the tracker's session index
// (domain_sessionidx) is above 1. Filter or group by `ReturningUsers.derivedTstamp` for a range.
cube('ReturningUsers', {
  sqlTable: 'snowplow_events',

  measures: {
    usersCount: {
      type: 'count_distinct',
      sql: `${CUBE}.domain_userid`,
    },

    returningUsersCount: {
      type: 'count_distinct',
      sql: `${CUBE}.domain_userid`,
      filters: [{ sql: `${CUBE}.domain_sessionidx > 1` }],
    },

    // 0-100; NULL when there are no users in the range.
    returningUserPercentage: {
      type: 'number',
      sql: `100 * ${returningUsersCount} / nullIf(${usersCount}, 0)`,
    },
  },

  dimensions: {
    eventId: {
      sql: `${CUBE}.event_id`,
      type: 'string',
      primaryKey: true,
    },

    derivedTstamp: {
      sql: `${CUBE}.derived_tstamp`,
      type: 'time',
    },
  },
});
