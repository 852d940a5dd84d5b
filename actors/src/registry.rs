//! The registry: the gateway's own ClickHouse database recording every project, and the DDL that
//! creates a tenant's database. It is the source of truth; tenant actors cache what it holds.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::settings::ClickHouseSettings;
use crate::tenancy::{InstanceId, ProjectId, TenantKey};

const EVENTS_TABLE_DDL: &str = include_str!("../sql/snowplow_events.sql");

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("ClickHouse request failed: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("ClickHouse did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the registry holds an invalid row for instance {instance}: {reason}")]
    Corrupt {
        instance: String,
        reason: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectStatus {
    /// Registered; its database may not be complete yet.
    Provisioning,
    /// Its database and table exist; queries and collection are served.
    Ready,
}

impl ProjectStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Ready => "ready",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "provisioning" => Some(Self::Provisioning),
            "ready" => Some(Self::Ready),
            _ => None,
        }
    }
}

/// One project as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRecord {
    pub instance: InstanceId,
    pub project: ProjectId,
    pub tenant_key: TenantKey,
    pub status: ProjectStatus,
    /// Unix seconds.
    pub created_at: u32,
    pub updated_at: u32,
    /// Grows with every change; the registry keeps the row with the highest.
    pub version: u64,
}

impl ProjectRecord {
    pub fn new(instance: InstanceId, project: ProjectId) -> Self {
        let now = unix_now();
        Self {
            tenant_key: TenantKey::derive(&instance, project),
            instance,
            project,
            status: ProjectStatus::Provisioning,
            created_at: now,
            updated_at: now,
            version: 1,
        }
    }

    /// The same project in a new status, as the next version.
    pub fn with_status(&self, status: ProjectStatus) -> Self {
        Self {
            status,
            updated_at: unix_now(),
            version: self.version + 1,
            ..self.clone()
        }
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
struct ProjectRow {
    instance_id: String,
    project_id: u64,
    tenant_key: String,
    status: String,
    created_at: u32,
    updated_at: u32,
    version: u64,
}

impl From<&ProjectRecord> for ProjectRow {
    fn from(record: &ProjectRecord) -> Self {
        Self {
            instance_id: record.instance.to_string(),
            project_id: record.project.get(),
            tenant_key: record.tenant_key.to_string(),
            status: record.status.as_str().to_owned(),
            created_at: record.created_at,
            updated_at: record.updated_at,
            version: record.version,
        }
    }
}

impl ProjectRow {
    fn into_record(self) -> Result<ProjectRecord, RegistryError> {
        let corrupt = |reason| RegistryError::Corrupt {
            instance: self.instance_id.clone(),
            reason,
        };
        let instance = InstanceId::parse(&self.instance_id).map_err(|_| corrupt("instance id"))?;
        let project = ProjectId::new(self.project_id).map_err(|_| corrupt("project id"))?;
        let tenant_key =
            TenantKey::from_stored(&self.tenant_key).ok_or_else(|| corrupt("tenant key"))?;
        if tenant_key != TenantKey::derive(&instance, project) {
            return Err(corrupt("tenant key does not match instance and project"));
        }
        let status = ProjectStatus::parse(&self.status).ok_or_else(|| corrupt("status"))?;
        Ok(ProjectRecord {
            instance,
            project,
            tenant_key,
            status,
            created_at: self.created_at,
            updated_at: self.updated_at,
            version: self.version,
        })
    }
}

#[derive(Clone)]
pub struct Registry {
    /// For server-wide statements; a database that does not exist yet cannot be bound.
    server: Client,
    /// Bound to the gateway's own database.
    client: Client,
    database: String,
    timeout: Duration,
}

impl Registry {
    pub fn new(settings: &ClickHouseSettings) -> Self {
        // Validation relies on RowBinaryWithNamesAndTypes, which older servers lack.
        let client = Client::default()
            .with_url(&settings.url)
            .with_user(&settings.user)
            .with_password(&settings.password)
            .with_validation(false);
        Self {
            server: client.clone(),
            client: client.with_database(&settings.database),
            database: settings.database.clone(),
            timeout: Duration::from_secs(settings.timeout_seconds),
        }
    }

    /// Creates the gateway's database and registry table when missing.
    pub async fn ensure_schema(&self) -> Result<(), RegistryError> {
        let db = &self.database;
        self.execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .await?;
        self.execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.projects (
                instance_id String,
                project_id UInt64,
                tenant_key String,
                status String,
                created_at DateTime,
                updated_at DateTime,
                version UInt64
            ) ENGINE = ReplacingMergeTree(version) ORDER BY (instance_id, project_id)"
        ))
        .await
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        self.deadline(self.server.query("SELECT 1").fetch_one::<u8>())
            .await
            .map(drop)
    }

    pub async fn projects_of(
        &self,
        instance: &InstanceId,
    ) -> Result<Vec<ProjectRecord>, RegistryError> {
        let rows = self
            .deadline(
                self.client
                    .query(
                        "SELECT instance_id, project_id, tenant_key, status, created_at, updated_at, version \
                         FROM projects FINAL WHERE instance_id = ? ORDER BY project_id",
                    )
                    .bind(instance.as_str())
                    .fetch_all::<ProjectRow>(),
            )
            .await?;
        rows.into_iter().map(ProjectRow::into_record).collect()
    }

    pub async fn record(&self, project: &ProjectRecord) -> Result<(), RegistryError> {
        let row = ProjectRow::from(project);
        self.deadline(async {
            let mut insert = self.client.insert::<ProjectRow>("projects").await?;
            insert.write(&row).await?;
            insert.end().await
        })
        .await
    }

    /// Creates the tenant's database and events table; safe to repeat.
    pub async fn create_tenant_database(
        &self,
        tenant_key: &TenantKey,
    ) -> Result<(), RegistryError> {
        let database = tenant_key.database();
        self.execute(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .await?;
        self.execute(&EVENTS_TABLE_DDL.replace("{database}", &database))
            .await
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

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}
