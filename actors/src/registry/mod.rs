//! The registry: the gateway's own ClickHouse database recording every project, and the DDL that
//! creates a tenant's database. It is the source of truth; tenant actors cache what it holds.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use clickhouse::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tracing::warn;

mod owner;
mod record;
mod writer;

pub use owner::Owner;
use record::{PROJECT_COLUMNS, ProjectRow};
pub use record::{ProjectRecord, ProjectStatus, unix_now};
use writer::Writer;
pub use writer::Written;

use crate::settings::ClickHouseSettings;
use crate::tenancy::{InstanceId, ProjectId, TenantKey};

/// Probes for a peer that vanished without closing the connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Database names per query for their owners' marks: about 50 KB of SQL.
const OWNER_QUERY_CHUNK: usize = 1_000;

/// How ClickHouse begins its answer to creating a database that exists: 18.16 writes
/// "Code: 82, e.displayText() = ...", current versions "Code: 82. DB::Exception: ...".
const DATABASE_ALREADY_EXISTS: [&str; 2] = ["Code: 82,", "Code: 82."];

const EVENTS_TABLE_DDL: &str = include_str!("../../sql/snowplow_events.sql");

/// The registry table's columns, in `ProjectRow` order; new columns are only ever appended.
const REGISTRY_COLUMNS: &[(&str, &str)] = &[
    ("instance_id", "String"),
    ("project_id", "UInt64"),
    ("tenant_key", "String"),
    ("status", "String"),
    ("created_at", "DateTime"),
    ("updated_at", "DateTime"),
    ("version", "UInt64"),
    ("deprovisioned_at", "DateTime"),
];

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("ClickHouse request failed: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("ClickHouse did not answer within {0:?}")]
    Timeout(Duration),
    #[error("registry write failed: {0}")]
    Write(String),
    #[error("the registry holds an invalid row for instance {instance}: {reason}")]
    Corrupt {
        instance: String,
        reason: &'static str,
    },
}

#[derive(Clone)]
pub struct Registry {
    /// For server-wide statements; a database that does not exist yet cannot be bound.
    server: Client,
    /// Bound to the gateway's own database.
    client: Client,
    writer: Writer,
    database: String,
    timeout: Duration,
}

impl Registry {
    /// Starts the batching writer, so it must run inside the Tokio runtime.
    pub fn new(settings: &ClickHouseSettings) -> Self {
        let idle = Duration::from_secs(settings.idle_connection_seconds);
        // Validation relies on RowBinaryWithNamesAndTypes, which older servers lack.
        let client = nodelay_client(idle)
            .with_url(&settings.url)
            .with_user(&settings.user)
            .with_password(&settings.password)
            .with_validation(false);
        let timeout = Duration::from_secs(settings.timeout_seconds);
        let bound = client.clone().with_database(&settings.database);
        Self {
            writer: Writer::start(
                bound.clone(),
                timeout,
                Duration::from_millis(settings.registry_batch_wait_ms),
            ),
            server: client,
            client: bound,
            database: settings.database.clone(),
            timeout,
        }
    }

    /// Creates the gateway's database and registry table when missing, and adds columns that
    /// newer versions introduced to a table an older version created.
    pub async fn ensure_schema(&self) -> Result<(), RegistryError> {
        let db = &self.database;
        self.execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .await?;
        let columns: Vec<String> = REGISTRY_COLUMNS
            .iter()
            .map(|(name, kind)| format!("{name} {kind}"))
            .collect();
        self.execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.projects ({}) \
             ENGINE = ReplacingMergeTree(version) ORDER BY (instance_id, project_id)",
            columns.join(", ")
        ))
        .await?;

        // ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS: compare with system.columns.
        let query = self
            .server
            .query("SELECT name FROM system.columns WHERE database = ? AND table = 'projects'")
            .bind(db.as_str());
        let present: Vec<String> = self.deadline(query.fetch_all::<String>()).await?;
        for (name, kind) in REGISTRY_COLUMNS {
            if present.iter().any(|column| column == name) {
                continue;
            }
            let added = self
                .execute(&format!(
                    "ALTER TABLE {db}.projects ADD COLUMN {name} {kind}"
                ))
                .await;
            match added {
                // Another replica may have added it a moment ago.
                Err(err) if err.to_string().contains("already exists") => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        self.deadline(self.server.query("SELECT 1").fetch_one::<u8>())
            .await
            .map(drop)
    }

    /// One project of the instance as the registry holds it now.
    pub async fn project_of(
        &self,
        instance: &InstanceId,
        project: ProjectId,
    ) -> Result<Option<ProjectRecord>, RegistryError> {
        let sql = format!(
            "SELECT {PROJECT_COLUMNS} FROM projects FINAL WHERE instance_id = ? AND project_id = ?"
        );
        let query = self
            .client
            .query(&sql)
            .bind(instance.as_str())
            .bind(project.get());
        Ok(self.select(query).await?.into_iter().next())
    }

    /// Every project the instance has, purged ones included.
    pub async fn projects_of(
        &self,
        instance: &InstanceId,
    ) -> Result<Vec<ProjectRecord>, RegistryError> {
        let sql = format!(
            "SELECT {PROJECT_COLUMNS} FROM projects FINAL WHERE instance_id = ? ORDER BY project_id"
        );
        self.select(self.client.query(&sql).bind(instance.as_str()))
            .await
    }

    /// Projects of every instance in a status, for reconciliation and purging.
    pub async fn projects_in(
        &self,
        status: ProjectStatus,
    ) -> Result<Vec<ProjectRecord>, RegistryError> {
        let sql = format!(
            "SELECT {PROJECT_COLUMNS} FROM projects FINAL WHERE status = ? \
             ORDER BY instance_id, project_id"
        );
        let query = self.client.query(&sql).bind(status.as_str());
        let rows = self.deadline(query.fetch_all::<ProjectRow>()).await?;
        // One corrupt row must not stop every instance's reconciliation or purge.
        Ok(rows.into_iter().filter_map(valid).collect())
    }

    /// The latest version of every project whose row changed at or after `since` (Unix
    /// seconds). Read without `FINAL`, which would merge the whole table: older versions that
    /// are still unmerged are set aside here.
    pub async fn changed_since(&self, since: u32) -> Result<Vec<ProjectRecord>, RegistryError> {
        let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE updated_at >= ?");
        let query = self.client.query(&sql).bind(since);
        let rows = self.deadline(query.fetch_all::<ProjectRow>()).await?;
        let mut latest: HashMap<(InstanceId, ProjectId), ProjectRecord> = HashMap::new();
        for record in rows.into_iter().filter_map(valid) {
            let key = (record.instance.clone(), record.project);
            match latest.get(&key) {
                Some(known) if known.version >= record.version => {}
                _ => {
                    latest.insert(key, record);
                }
            }
        }
        Ok(latest.into_values().collect())
    }

    /// Tenant keys the registry accounts for (everything not purged).
    pub async fn registered_tenant_keys(&self) -> Result<Vec<String>, RegistryError> {
        let query = self
            .client
            .query("SELECT tenant_key FROM projects FINAL WHERE status != 'purged'");
        self.deadline(query.fetch_all::<String>()).await
    }

    /// Tenant databases that exist on the server.
    pub async fn tenant_databases(&self) -> Result<Vec<String>, RegistryError> {
        let query = self.server.query(
            "SELECT name FROM system.databases WHERE startsWith(name, 'gitlab_project_') \
             ORDER BY name",
        );
        self.deadline(query.fetch_all::<String>()).await
    }

    /// Events stored for a tenant in one calendar month (by collector timestamp, UTC).
    pub async fn events_in_month(
        &self,
        tenant_key: &TenantKey,
        year: u16,
        month: u8,
    ) -> Result<u64, RegistryError> {
        // A project still provisioning, or purged a moment ago, has no events to count.
        if !self.events_table_exists(tenant_key).await? {
            return Ok(0);
        }
        let database = tenant_key.database();
        let sql = format!(
            "SELECT count() FROM {database}.snowplow_events WHERE toYYYYMM(collector_tstamp) = ?"
        );
        let period = u32::from(year) * 100 + u32::from(month);
        self.deadline(self.server.query(&sql).bind(period).fetch_one::<u64>())
            .await
    }

    /// Stores a new version of a project; concurrent calls share one INSERT.
    pub async fn record(&self, project: &ProjectRecord) -> Result<(), RegistryError> {
        self.writer.write(ProjectRow::from(project)).await
    }

    /// Resolves once every registry write queued before is stored or has failed.
    pub async fn flush(&self) -> Result<(), RegistryError> {
        self.writer.flush().await
    }

    /// Queues a new version of a project to ride along with the next INSERT, for a caller that
    /// need not wait for it; `Written` says when it is stored.
    pub async fn record_behind(&self, project: &ProjectRecord) -> Result<Written, RegistryError> {
        self.writer.write_behind(ProjectRow::from(project)).await
    }

    /// Creates the project's database and events table; safe to repeat. The table carries its
    /// owner (see [`Owner`]), so a database whose registry row a crash took can be adopted.
    pub async fn create_tenant_database(
        &self,
        project: &ProjectRecord,
    ) -> Result<(), RegistryError> {
        let database = project.tenant_key.database();
        self.execute(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .await?;
        self.create_events_table(project).await
    }

    /// Creates the project's database if it does not exist; false when it was there already.
    /// A project new to the gateway is new to ClickHouse too, but for the rare one that was
    /// onboarded before (through another gateway, or before a crash took its row), and this
    /// tells them apart at no extra cost.
    pub async fn create_database_if_new(
        &self,
        tenant_key: &TenantKey,
    ) -> Result<bool, RegistryError> {
        let database = tenant_key.database();
        match self.execute(&format!("CREATE DATABASE {database}")).await {
            Ok(()) => Ok(true),
            Err(RegistryError::ClickHouse(clickhouse::error::Error::BadResponse(message)))
                if DATABASE_ALREADY_EXISTS
                    .iter()
                    .any(|code| message.contains(code)) =>
            {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Creates the project's events table, marked as the project's, in its existing database;
    /// safe to repeat.
    pub async fn create_events_table(&self, project: &ProjectRecord) -> Result<(), RegistryError> {
        let ddl = EVENTS_TABLE_DDL
            .replace("{database}", &project.tenant_key.database())
            .replace("{owner}", &Owner::mark(project));
        self.execute(&ddl).await
    }

    /// The owners marked on these tenant databases' events tables; databases without a valid
    /// mark are left out. Asked in chunks, which keeps each query far below ClickHouse's
    /// `max_query_size`.
    pub async fn owners_of(
        &self,
        databases: &[String],
    ) -> Result<Vec<(String, Owner)>, RegistryError> {
        let mut owners = Vec::new();
        for chunk in databases.chunks(OWNER_QUERY_CHUNK) {
            let query = self
                .server
                .query(
                    "SELECT database, comment FROM system.columns \
                     WHERE has(?, database) AND table = 'snowplow_events' AND name = 'app_id'",
                )
                .bind(chunk);
            let marks: Vec<(String, String)> = self.deadline(query.fetch_all()).await?;
            owners.extend(marks.into_iter().filter_map(|(database, mark)| {
                Owner::parse(&mark)
                    .filter(|owner| owner.database() == database)
                    .map(|owner| (database, owner))
            }));
        }
        Ok(owners)
    }

    /// Whether the tenant's events table exists (a read, not DDL).
    pub async fn events_table_exists(&self, tenant_key: &TenantKey) -> Result<bool, RegistryError> {
        let sql = format!("EXISTS TABLE {}.snowplow_events", tenant_key.database());
        let exists = self
            .deadline(self.server.query(&sql).fetch_one::<u8>())
            .await?;
        Ok(exists == 1)
    }

    /// Whether the registry table exists, for readiness.
    pub async fn schema_exists(&self) -> Result<bool, RegistryError> {
        let sql = format!("EXISTS TABLE {}.projects", self.database);
        let exists = self
            .deadline(self.server.query(&sql).fetch_one::<u8>())
            .await?;
        Ok(exists == 1)
    }

    /// Drops the tenant's database and everything in it; safe to repeat.
    pub async fn drop_tenant_database(&self, tenant_key: &TenantKey) -> Result<(), RegistryError> {
        let database = tenant_key.database();
        self.execute(&format!("DROP DATABASE IF EXISTS {database}"))
            .await
    }

    async fn select(
        &self,
        query: clickhouse::query::Query,
    ) -> Result<Vec<ProjectRecord>, RegistryError> {
        let rows = self.deadline(query.fetch_all::<ProjectRow>()).await?;
        rows.into_iter().map(ProjectRow::into_record).collect()
    }

    async fn execute(&self, sql: &str) -> Result<(), RegistryError> {
        self.deadline(self.server.query(sql).execute()).await
    }

    async fn deadline<T>(
        &self,
        request: impl Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RegistryError::Timeout(self.timeout)),
        }
    }
}

/// The row's record, or None (logged) for a corrupt row.
fn valid(row: ProjectRow) -> Option<ProjectRecord> {
    row.into_record()
        .inspect_err(|err| warn!(error = %err, "skipping a corrupt registry row"))
        .ok()
}

/// The crate's default HTTP client leaves Nagle's algorithm on. An INSERT streams its body
/// after the headers, so its last segment waits for the server's delayed ACK: about one INSERT
/// in five took 40 ms more on loopback. With `TCP_NODELAY` an INSERT costs what a DDL
/// statement does.
fn nodelay_client(idle: Duration) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(TCP_KEEPALIVE));
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle)
        .build(connector);
    Client::with_http_client(http)
}
