// The project's events, read slowly. ClickHouse 18.16 runs sleep() several times per query
// (5 times for this one, so 7.5 s in all), so every query of this cube outlasts both this
// Cube's 1 s before "Continue wait" and Node's 5 s default socket timeout.
cube('SlowEvents', {
  sql: `SELECT event FROM snowplow_events WHERE sleep(1.5) = 0`,

  measures: {
    count: {
      type: 'count',
    },
  },

  dimensions: {
    event: {
      sql: 'event',
      type: 'string',
    },
  },
});
