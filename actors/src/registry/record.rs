//! A project as the registry records it: its status, its versioned record, and the row that
//! stores it in ClickHouse.

use std::time::{SystemTime, UNIX_EPOCH};

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::RegistryError;
use crate::tenancy::{InstanceId, ProjectId, TenantKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectStatus {
    /// Registered; its database may not be complete yet.
    Provisioning,
    /// Its database and table exist; queries and collection are served.
    Ready,
    /// Deleted by its instance: nothing is served, the data is kept for the grace period.
    Deprovisioned,
    /// Its database was dropped after the grace period.
    Purged,
}

impl ProjectStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Ready => "ready",
            Self::Deprovisioned => "deprovisioned",
            Self::Purged => "purged",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "provisioning" => Some(Self::Provisioning),
            "ready" => Some(Self::Ready),
            "deprovisioned" => Some(Self::Deprovisioned),
            "purged" => Some(Self::Purged),
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
    /// When it was deprovisioned (Unix seconds), 0 otherwise.
    pub deprovisioned_at: u32,
    /// Grows with every change; the registry keeps the row with the highest. A change's version
    /// is the time it was made, in microseconds (see [`next_version`]).
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
            deprovisioned_at: 0,
            version: next_version(0),
        }
    }

    /// The same project in a new status, as the next version.
    pub fn with_status(&self, status: ProjectStatus) -> Self {
        let now = unix_now();
        let deprovisioned_at = if status == ProjectStatus::Deprovisioned {
            now
        } else {
            0
        };
        Self {
            status,
            updated_at: now,
            deprovisioned_at,
            version: next_version(self.version),
            ..self.clone()
        }
    }

    /// Not purged: the registry accounts for its database.
    pub fn is_live(&self) -> bool {
        self.status != ProjectStatus::Purged
    }

    /// A purged project onboarded again starts afresh at `created_at`, keeping its version
    /// history growing.
    pub fn reborn(&self, created_at: u32) -> Self {
        Self {
            status: ProjectStatus::Provisioning,
            created_at,
            updated_at: unix_now(),
            deprovisioned_at: 0,
            version: next_version(self.version),
            ..self.clone()
        }
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
pub(super) struct ProjectRow {
    instance_id: String,
    project_id: u64,
    tenant_key: String,
    status: String,
    created_at: u32,
    updated_at: u32,
    deprovisioned_at: u32,
    version: u64,
}

/// The columns of `ProjectRow`, in its field order (RowBinary is positional).
pub(super) const PROJECT_COLUMNS: &str = "instance_id, project_id, tenant_key, status, created_at, \
    updated_at, deprovisioned_at, version";

impl From<&ProjectRecord> for ProjectRow {
    fn from(record: &ProjectRecord) -> Self {
        Self {
            instance_id: record.instance.to_string(),
            project_id: record.project.get(),
            tenant_key: record.tenant_key.to_string(),
            status: record.status.as_str().to_owned(),
            created_at: record.created_at,
            updated_at: record.updated_at,
            deprovisioned_at: record.deprovisioned_at,
            version: record.version,
        }
    }
}

impl ProjectRow {
    pub(super) fn into_record(self) -> Result<ProjectRecord, RegistryError> {
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
            deprovisioned_at: self.deprovisioned_at,
            version: self.version,
        })
    }
}

/// The version of a change made now: the wall clock in microseconds, and never at or below the
/// version it follows. Gateways sharing a registry thus rank their changes of one project by
/// when they were made, whichever of them holds the older record, as long as their clocks agree
/// (NTP) to well within the time between two requests for that project. Versions written before
/// this scheme (small counters) are outranked by any new change.
fn next_version(previous: u64) -> u64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    micros.max(previous.saturating_add(1))
}

/// The time now, in the registry's Unix seconds.
pub fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}
