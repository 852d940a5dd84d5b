//! The steps of a project's lifecycle, each a function of the project's current record that
//! returns its outcome and the record to remember afterwards. Every step is safe to repeat, so
//! an attempt cut short by a crash or an outage is finished by the next one.
//!
//! A registry write that failed may still land later (ClickHouse can commit an INSERT whose
//! answer timed out). So a failed write leaves its record remembered as *uncertain*: the tenant
//! keeps the state it tried to write, and the project's next change writes its state again
//! with a higher version, which supersedes whatever arrived meanwhile.
//!
//! An onboarding's registry row is written behind its answer, once the database exists: it
//! rides along with a registry INSERT shared with other writes instead of costing one of its
//! own. The database carries its owner, so a crash that takes the row after the answer leaves
//! a database that reconciliation adopts ([`adopt`]). An onboarding whose DDL failed is
//! recorded `provisioning` before it answers, and reconciliation finishes it.

use tracing::{info, warn};

use crate::registry::{Owner, ProjectRecord, ProjectStatus, Registry, RegistryError, Written};
use crate::tenancy::{InstanceId, ProjectId, TenantKey};
use crate::tenant::{Onboarded, TenantError};

/// What a step answers, and what the tenant should remember of the project afterwards.
pub struct Step<T> {
    pub outcome: Result<T, TenantError>,
    /// The record to remember; None leaves the remembered one as it is.
    pub record: Option<ProjectRecord>,
    /// A registry write failed, so the registry may or may not hold `record`.
    pub uncertain: bool,
    /// `record` is being written behind the answer; this says when it is stored.
    pub behind: Option<Written>,
}

impl<T> Step<T> {
    fn done(outcome: Result<T, TenantError>, record: Option<ProjectRecord>) -> Self {
        Self {
            outcome,
            record,
            uncertain: false,
            behind: None,
        }
    }

    fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        Step {
            outcome: self.outcome.map(f),
            record: self.record,
            uncertain: self.uncertain,
            behind: self.behind,
        }
    }

    /// A write of `record` failed; its outcome is unknown.
    fn unknown(err: RegistryError, record: ProjectRecord) -> Self {
        Self {
            outcome: Err(err.into()),
            record: Some(record),
            uncertain: true,
            behind: None,
        }
    }
}

/// Moves the project through `provisioning` to `ready`, resuming wherever a previous attempt
/// stopped. A deprovisioned project comes back with its data; a purged one starts empty.
/// `uncertain` says the remembered record may not be what the registry holds.
pub async fn onboard(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    current: Option<ProjectRecord>,
    uncertain: bool,
) -> Step<Onboarded> {
    if let Some(record) = current
        .as_ref()
        .filter(|r| r.status == ProjectStatus::Ready)
    {
        if !uncertain {
            return Step::done(repair(registry, record).await, None);
        }
        let ready = record.with_status(ProjectStatus::Ready);
        if let Err(err) = registry.record(&ready).await {
            return Step::unknown(err, ready);
        }
        let outcome = repair(registry, &ready).await;
        return Step::done(outcome, Some(ready));
    }

    // Written behind the answer only when a crash losing it leaves what reconciliation repairs:
    // a database the registry does not list (adopted), or a `provisioning` row (finished).
    // A project coming back from deprovisioning has a row the answer contradicts, and one
    // whose last write is uncertain may have any; there the answer waits for the new row.
    let behind = !uncertain
        && current.as_ref().is_none_or(|record| {
            matches!(
                record.status,
                ProjectStatus::Provisioning | ProjectStatus::Purged
            )
        });
    let provisioning = match current {
        Some(record) if record.status == ProjectStatus::Provisioning && !uncertain => record,
        Some(record) if record.status != ProjectStatus::Purged => {
            record.with_status(ProjectStatus::Provisioning)
        }
        Some(purged) => purged.reborn(),
        None => ProjectRecord::new(instance.clone(), project),
    };
    if let Err(err) = registry.create_tenant_database(&provisioning).await {
        warn!(error = %err, "tenant database creation failed; the project stays provisioning");
        // Recorded so that reconciliation finishes it; ClickHouse may well refuse this too.
        if let Err(write) = registry.record(&provisioning).await {
            return Step::unknown(write, provisioning);
        }
        return Step::done(Err(err.into()), Some(provisioning));
    }
    let ready = provisioning.with_status(ProjectStatus::Ready);
    let written = if behind {
        match registry.record_behind(&ready).await {
            Ok(written) => Some(written),
            Err(err) => return Step::unknown(err, ready),
        }
    } else {
        if let Err(err) = registry.record(&ready).await {
            return Step::unknown(err, ready);
        }
        None
    };

    info!(tenant_key = %ready.tenant_key, "project onboarded");
    metrics::counter!("monitor_gateway_projects_onboarded_total").increment(1);
    let onboarded = Onboarded {
        project: ready.clone(),
        created: true,
    };
    Step {
        behind: written,
        ..Step::done(Ok(onboarded), Some(ready))
    }
}

/// Finishes an onboarding left `provisioning`; false when there was nothing to finish. A project
/// the tenant has not seen (written by another gateway since it loaded) continues from the
/// registry's version, so what it writes supersedes that row.
pub async fn finish(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    current: Option<ProjectRecord>,
    uncertain: bool,
) -> Step<bool> {
    let current = match current {
        Some(record) => record,
        None => match registry.project_of(instance, project).await {
            Ok(Some(record)) if record.status == ProjectStatus::Provisioning => record,
            Ok(stored) => return Step::done(Ok(false), stored),
            Err(err) => return Step::done(Err(err.into()), None),
        },
    };
    onboard(registry, instance, project, Some(current), uncertain)
        .await
        .map(|_| true)
}

/// Registers a project whose database exists, marked as the project's, with no registry row
/// (a crash took the row after the answer), as it was answered. A project the registry knows,
/// deleted ones included, is left as it is; a purged one comes back with the database found.
pub async fn adopt(
    registry: &Registry,
    owner: &Owner,
    current: Option<ProjectRecord>,
    uncertain: bool,
) -> Step<bool> {
    let current = match current {
        Some(record) => Some(record),
        None => match registry.project_of(&owner.instance, owner.project).await {
            Ok(stored) => stored,
            Err(err) => return Step::done(Err(err.into()), None),
        },
    };
    let found = match current {
        Some(record) if record.status != ProjectStatus::Purged => {
            return Step::done(Ok(false), Some(record));
        }
        Some(purged) => purged.reborn(),
        None => ProjectRecord::new(owner.instance.clone(), owner.project),
    };
    let provisioning = ProjectRecord {
        created_at: owner.created_at,
        ..found
    };
    info!(tenant_key = %provisioning.tenant_key, "adopting a database whose registry row is missing");
    onboard(
        registry,
        &owner.instance,
        owner.project,
        Some(provisioning),
        uncertain,
    )
    .await
    .map(|_| true)
}

/// A project loaded `provisioning` whose events table exists got past its DDL, so it only lacks
/// its `ready` row (a crash took it after the answer): the ready record, written behind. None
/// when its database is not complete.
pub async fn finish_loaded(
    registry: &Registry,
    provisioning: &ProjectRecord,
) -> Result<Option<(ProjectRecord, Written)>, RegistryError> {
    if !registry
        .events_table_exists(&provisioning.tenant_key)
        .await?
    {
        return Ok(None);
    }
    let ready = provisioning.with_status(ProjectStatus::Ready);
    let written = registry.record_behind(&ready).await?;
    info!(tenant_key = %ready.tenant_key, "a half-done onboarding is finished");
    metrics::counter!("monitor_gateway_projects_onboarded_total").increment(1);
    Ok(Some((ready, written)))
}

/// A ready project whose table vanished (a restored or emptied server) gets it back; this
/// reads before it writes, so repeated onboarding requests run no DDL.
async fn repair(registry: &Registry, record: &ProjectRecord) -> Result<Onboarded, TenantError> {
    if !registry.events_table_exists(&record.tenant_key).await? {
        warn!(tenant_key = %record.tenant_key, "a ready project had no events table; recreating it");
        registry.create_tenant_database(record).await?;
    }
    Ok(Onboarded {
        project: record.clone(),
        created: false,
    })
}

/// Stops queries and collection at once; the data stays until the purge. Repeating it answers
/// the same record. A project the tenant has no record of is looked up first, so one whose
/// registry row a crash took (or another gateway wrote) is deleted too, not adopted later.
pub async fn deprovision(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    current: Option<ProjectRecord>,
    uncertain: bool,
) -> Step<ProjectRecord> {
    let (current, looked_up) = match current {
        Some(record) if record.status != ProjectStatus::Purged => (Some(record), false),
        // A purged record says no more than none: onboarded again elsewhere, the project's
        // row may have been lost with the gateway that answered.
        _ => match look_up(registry, instance, project).await {
            Ok(found) => (found, true),
            Err(err) => return Step::done(Err(err.into()), None),
        },
    };
    let record = match current {
        Some(record) if record.status == ProjectStatus::Deprovisioned && !uncertain => {
            let remember = looked_up.then(|| record.clone());
            return Step::done(Ok(record), remember);
        }
        Some(record) if record.status != ProjectStatus::Purged => record,
        _ => return Step::done(Err(TenantError::NotOnboarded(project)), None),
    };
    let deprovisioned = record.with_status(ProjectStatus::Deprovisioned);
    if let Err(err) = registry.record(&deprovisioned).await {
        return Step::unknown(err, deprovisioned);
    }
    info!(tenant_key = %deprovisioned.tenant_key, "project deprovisioned");
    metrics::counter!("monitor_gateway_projects_deprovisioned_total").increment(1);
    Step::done(Ok(deprovisioned.clone()), Some(deprovisioned))
}

/// What the registry, or else the project's marked database, knows of a project the tenant has
/// no record of: another gateway may have written its row since the tenant loaded, or a crash
/// may have taken the row after the answer and left the database (which counts as `ready`,
/// as it was answered).
async fn look_up(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
) -> Result<Option<ProjectRecord>, RegistryError> {
    let stored = registry.project_of(instance, project).await?;
    if stored
        .as_ref()
        .is_some_and(|record| record.status != ProjectStatus::Purged)
    {
        return Ok(stored);
    }
    let database = TenantKey::derive(instance, project).database();
    let Some((_, owner)) = registry.owners_of(&[database]).await?.pop() else {
        return Ok(stored);
    };
    let provisioning = match stored {
        Some(purged) => purged.reborn(),
        None => ProjectRecord::new(instance.clone(), project),
    };
    // The version the answering onboarding wrote, so a change made now supersedes its row,
    // which may still be on its way.
    Ok(Some(
        ProjectRecord {
            created_at: owner.created_at,
            ..provisioning
        }
        .with_status(ProjectStatus::Ready),
    ))
}

/// Drops the database of a project deprovisioned before `cutoff`; false when it is not due.
/// A project whose state is uncertain is never purged until a change has settled it.
pub async fn purge(
    registry: &Registry,
    current: Option<ProjectRecord>,
    cutoff: u32,
    uncertain: bool,
) -> Step<bool> {
    let due = current
        .filter(|r| r.status == ProjectStatus::Deprovisioned && r.deprovisioned_at <= cutoff);
    let Some(record) = due.filter(|_| !uncertain) else {
        return Step::done(Ok(false), None);
    };
    if let Err(err) = registry.drop_tenant_database(&record.tenant_key).await {
        return Step::done(Err(err.into()), None);
    }
    let purged = record.with_status(ProjectStatus::Purged);
    if let Err(err) = registry.record(&purged).await {
        return Step::unknown(err, purged);
    }
    info!(tenant_key = %record.tenant_key, "project purged after its grace period");
    metrics::counter!("monitor_gateway_projects_purged_total").increment(1);
    Step::done(Ok(true), Some(purged))
}
