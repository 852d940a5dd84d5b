// Every Snowplow event of one project, one row per event (table `snowplow_events`, created by the
// gateway from actors/sql/snowplow_events.sql in the tenant's database; cube.js binds the
// connection to that database, so the table is named without one).
//
// Member names follow GitLab's product analytics model so its built-in dashboards work unchanged.
// Written for ClickHouse 18.16 as well as current versions: no count_distinct_approx (uniq
// through Cube fails there) and no rolling windows (they need non-equality JOINs).
cube('TrackedEvents', {
  sqlTable: 'snowplow_events',

  measures: {
    count: {
      type: 'count',
    },

    pageViewsCount: {
      type: 'count',
      filters: [{ sql: `${CUBE}.event = 'page_view'` }],
    },

    uniqueUsersCount: {
      type: 'count_distinct',
      sql: `${CUBE}.domain_userid`,
    },

    // Link clicks are the self-describing (`unstruct`) events of the Snowplow link_click schema
    // (iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-x), which is what the
    // trackers' link click tracking emits. Snowplow's enrichment sets event_name to the schema
    // name (`link_click`); the payload match covers a collector that leaves event_name empty.
    // Structured events with se_action = 'click' are deliberately not counted: their meaning is
    // up to each application.
    linkClicksCount: {
      type: 'count',
      filters: [{
        sql: `${CUBE}.event = 'unstruct' AND (${CUBE}.event_name = 'link_click'`
          + ` OR ${CUBE}.unstruct_event LIKE '%/link_click/jsonschema/%')`,
      }],
    },
  },

  dimensions: {
    eventId: {
      sql: `${CUBE}.event_id`,
      type: 'string',
      primaryKey: true,
      public: true,
    },

    derivedTstamp: {
      sql: `${CUBE}.derived_tstamp`,
      type: 'time',
    },

    collectorTstamp: {
      sql: `${CUBE}.collector_tstamp`,
      type: 'time',
    },

    event: {
      sql: `${CUBE}.event`,
      type: 'string',
    },

    eventName: {
      sql: `${CUBE}.event_name`,
      type: 'string',
    },

    pageUrl: {
      sql: `${CUBE}.page_url`,
      type: 'string',
    },

    pageUrlhost: {
      sql: `${CUBE}.page_urlhost`,
      type: 'string',
    },

    pageUrlpath: {
      sql: `${CUBE}.page_urlpath`,
      type: 'string',
    },

    pageTitle: {
      sql: `${CUBE}.page_title`,
      type: 'string',
    },

    pageReferrer: {
      sql: `${CUBE}.page_referrer`,
      type: 'string',
    },

    userId: {
      sql: `${CUBE}.user_id`,
      type: 'string',
    },

    domainUserid: {
      sql: `${CUBE}.domain_userid`,
      type: 'string',
    },

    domainSessionid: {
      sql: `${CUBE}.domain_sessionid`,
      type: 'string',
    },

    browserLanguage: {
      sql: `${CUBE}.br_lang`,
      type: 'string',
    },

    browserName: {
      sql: `${CUBE}.br_name`,
      type: 'string',
    },

    osName: {
      sql: `${CUBE}.os_name`,
      type: 'string',
    },

    osTimezone: {
      sql: `${CUBE}.os_timezone`,
      type: 'string',
    },

    seCategory: {
      sql: `${CUBE}.se_category`,
      type: 'string',
    },

    seAction: {
      sql: `${CUBE}.se_action`,
      type: 'string',
    },

    seLabel: {
      sql: `${CUBE}.se_label`,
      type: 'string',
    },

    customEventName: {
      sql: `${CUBE}.custom_event_name`,
      type: 'string',
    },

    customEventProps: {
      sql: `${CUBE}.custom_event_props`,
      type: 'string',
    },

    customUserProps: {
      sql: `${CUBE}.custom_user_props`,
      type: 'string',
    },
  },
});
