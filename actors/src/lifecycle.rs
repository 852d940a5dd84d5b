//! The steps of a project's lifecycle, each a function of the project's current record that
//! returns its outcome and the record to remember afterwards. Every step is safe to repeat, so
//! an attempt cut short by a crash or an outage is finished by the next one.

use tracing::{info, warn};

use crate::registry::{ProjectRecord, ProjectStatus, Registry};
use crate::tenancy::{InstanceId, ProjectId};
use crate::tenant::{Onboarded, TenantError};

/// An outcome, and the record the tenant should remember (None: unchanged).
pub type Step<T> = (Result<T, TenantError>, Option<ProjectRecord>);

/// Moves the project through `provisioning` to `ready`, resuming wherever a previous attempt
/// stopped. A deprovisioned project comes back with its data; a purged one starts empty.
pub async fn onboard(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    current: Option<ProjectRecord>,
) -> Step<Onboarded> {
    if let Some(record) = current
        .as_ref()
        .filter(|r| r.status == ProjectStatus::Ready)
    {
        return (repair(registry, record).await, None);
    }

    let provisioning = match current {
        Some(record) if record.status == ProjectStatus::Provisioning => record,
        Some(record) if record.status == ProjectStatus::Deprovisioned => {
            record.with_status(ProjectStatus::Provisioning)
        }
        Some(purged) => purged.reborn(),
        None => ProjectRecord::new(instance.clone(), project),
    };
    if let Err(err) = registry.record(&provisioning).await {
        return (Err(err.into()), None);
    }

    if let Err(err) = registry
        .create_tenant_database(&provisioning.tenant_key)
        .await
    {
        warn!(error = %err, "tenant database creation failed; the project stays provisioning");
        return (Err(err.into()), Some(provisioning));
    }
    let ready = provisioning.with_status(ProjectStatus::Ready);
    if let Err(err) = registry.record(&ready).await {
        return (Err(err.into()), Some(provisioning));
    }

    info!(tenant_key = %ready.tenant_key, "project onboarded");
    metrics::counter!("monitor_gateway_projects_onboarded_total").increment(1);
    let onboarded = Onboarded {
        project: ready.clone(),
        created: true,
    };
    (Ok(onboarded), Some(ready))
}

/// A ready project whose table vanished (a restored or emptied server) gets it back; this
/// reads before it writes, so repeated onboarding requests run no DDL.
async fn repair(registry: &Registry, record: &ProjectRecord) -> Result<Onboarded, TenantError> {
    if !registry.events_table_exists(&record.tenant_key).await? {
        warn!(tenant_key = %record.tenant_key, "a ready project had no events table; recreating it");
        registry.create_tenant_database(&record.tenant_key).await?;
    }
    Ok(Onboarded {
        project: record.clone(),
        created: false,
    })
}

/// Stops queries and collection at once; the data stays until the purge. Repeating it answers
/// the same record.
pub async fn deprovision(
    registry: &Registry,
    project: ProjectId,
    current: Option<ProjectRecord>,
) -> Step<ProjectRecord> {
    let record = match current {
        Some(record) if record.status == ProjectStatus::Deprovisioned => return (Ok(record), None),
        Some(record) if record.status != ProjectStatus::Purged => record,
        _ => return (Err(TenantError::NotOnboarded(project)), None),
    };
    let deprovisioned = record.with_status(ProjectStatus::Deprovisioned);
    if let Err(err) = registry.record(&deprovisioned).await {
        return (Err(err.into()), None);
    }
    info!(tenant_key = %deprovisioned.tenant_key, "project deprovisioned");
    metrics::counter!("monitor_gateway_projects_deprovisioned_total").increment(1);
    (Ok(deprovisioned.clone()), Some(deprovisioned))
}

/// Drops the database of a project deprovisioned before `cutoff`; false when it is not due.
pub async fn purge(registry: &Registry, current: Option<ProjectRecord>, cutoff: u32) -> Step<bool> {
    let due = current
        .filter(|r| r.status == ProjectStatus::Deprovisioned && r.deprovisioned_at <= cutoff);
    let Some(record) = due else {
        return (Ok(false), None);
    };
    if let Err(err) = registry.drop_tenant_database(&record.tenant_key).await {
        return (Err(err.into()), None);
    }
    let purged = record.with_status(ProjectStatus::Purged);
    if let Err(err) = registry.record(&purged).await {
        return (Err(err.into()), None);
    }
    info!(tenant_key = %record.tenant_key, "project purged after its grace period");
    metrics::counter!("monitor_gateway_projects_purged_total").increment(1);
    (Ok(true), Some(purged))
}
