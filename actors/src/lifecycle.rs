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

use crate::registry::{
    Owner, ProjectRecord, ProjectStatus, Registry, RegistryError, Written, unix_now,
};
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
///
/// A project the tenant remembers is taken as the fresher of that record and the registry's,
/// since another gateway may have changed it meanwhile.
pub async fn onboard(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    current: Option<ProjectRecord>,
    uncertain: bool,
) -> Step<Onboarded> {
    if current.is_none() {
        return onboard_unknown(registry, instance, project).await;
    }
    match registry.project_of(instance, project).await {
        Ok(stored) => {
            let (current, learned) = fresher(current, stored);
            let start = Start {
                current,
                learned,
                uncertain,
                ..Start::default()
            };
            advance(registry, instance, project, start).await
        }
        Err(err) => Step::done(Err(err.into()), None),
    }
}

/// A project the tenant has no record of is new, unless its database exists already: its
/// `CREATE DATABASE` tells, so the common case costs the DDL alone (a point read of the
/// registry costs ClickHouse about as much). A database that is there was onboarded through
/// another gateway, deleted within its grace period, or answered before a crash took its row:
/// the registry, or else the database's mark, says how, and the answer keeps its details.
async fn onboard_unknown(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
) -> Step<Onboarded> {
    let key = TenantKey::derive(instance, project);
    match registry.create_database_if_new(&key).await {
        Ok(false) => {}
        Ok(true) => {
            let start = Start {
                database_created: true,
                ..Start::default()
            };
            return advance(registry, instance, project, start).await;
        }
        // The next steps try again, and record the project `provisioning` if they fail too.
        Err(_) => return advance(registry, instance, project, Start::default()).await,
    }
    let stored = match registry.project_of(instance, project).await {
        Ok(stored) => stored,
        Err(err) => return Step::done(Err(err.into()), None),
    };
    if stored.as_ref().is_some_and(ProjectRecord::is_live) {
        let start = Start {
            current: stored,
            learned: true,
            ..Start::default()
        };
        return advance(registry, instance, project, start).await;
    }
    match marked(registry, instance, project, stored).await {
        // Ready as it was answered, with no row to say so: written now, as after a failed
        // write. Not a new project, so not counted as onboarded again.
        Ok(Some(answered)) => {
            let start = Start {
                current: Some(answered),
                learned: true,
                uncertain: true,
                ..Start::default()
            };
            let step = advance(registry, instance, project, start).await;
            step.map(|onboarded| Onboarded {
                created: false,
                ..onboarded
            })
        }
        // An empty database (a crash between its two statements), or none any more.
        Ok(None) => advance(registry, instance, project, Start::default()).await,
        Err(err) => Step::done(Err(err.into()), None),
    }
}

/// What an onboarding starts from; by default, a project new to the tenant and to ClickHouse.
#[derive(Default)]
struct Start {
    /// The fresher of the tenant's record and the registry's.
    current: Option<ProjectRecord>,
    /// `current` is the registry's, new to the tenant.
    learned: bool,
    /// The registry may not hold `current`.
    uncertain: bool,
    /// The project's database was created a moment ago and lacks only its table.
    database_created: bool,
}

/// Takes the project from the state `start` says to `ready`.
async fn advance(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    start: Start,
) -> Step<Onboarded> {
    let Start {
        current,
        learned,
        uncertain,
        database_created,
    } = start;
    if let Some(record) = current
        .as_ref()
        .filter(|r| r.status == ProjectStatus::Ready)
    {
        if !uncertain {
            let outcome = repair(registry, record).await;
            return Step::done(outcome, learned.then(|| record.clone()));
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
        Some(purged) => purged.reborn(unix_now()),
        None => ProjectRecord::new(instance.clone(), project),
    };
    let created = if database_created {
        registry.create_events_table(&provisioning).await
    } else {
        registry.create_tenant_database(&provisioning).await
    };
    if let Err(err) = created {
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

/// The fresher of what the tenant remembers and what the registry holds, and whether it is the
/// registry's, which the tenant then learns: another gateway may have changed the project.
fn fresher(
    remembered: Option<ProjectRecord>,
    stored: Option<ProjectRecord>,
) -> (Option<ProjectRecord>, bool) {
    match (remembered, stored) {
        (Some(remembered), Some(stored)) if stored.version > remembered.version => {
            (Some(stored), true)
        }
        (Some(remembered), _) => (Some(remembered), false),
        (None, stored) => {
            let learned = stored.is_some();
            (stored, learned)
        }
    }
}

/// Finishes an onboarding left `provisioning` (or a `ready` whose write is uncertain); false
/// when there was nothing to finish. It reads the registry first: a project another gateway
/// finished, deleted or wrote since the tenant loaded is taken as the registry has it.
pub async fn finish(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    current: Option<ProjectRecord>,
    uncertain: bool,
) -> Step<bool> {
    let (current, learned) = match registry.project_of(instance, project).await {
        Ok(stored) => fresher(current, stored),
        Err(err) => return Step::done(Err(err.into()), None),
    };
    let unfinished = current.as_ref().is_some_and(|record| match record.status {
        ProjectStatus::Provisioning => true,
        ProjectStatus::Ready => uncertain,
        _ => false,
    });
    if !unfinished {
        return Step::done(Ok(false), current.filter(|_| learned));
    }
    let start = Start {
        current,
        learned,
        uncertain,
        ..Start::default()
    };
    advance(registry, instance, project, start)
        .await
        .map(|_| true)
}

/// Registers a project whose database exists, marked as the project's, with no registry row
/// (a crash took the row after the answer), as it was answered; true when it wrote a row. A
/// project the registry knows, deleted ones included, is left as it is. One the tenant
/// remembers but the registry lost has its remembered record written again; a purged one comes
/// back with the database found.
pub async fn adopt(
    registry: &Registry,
    owner: &Owner,
    current: Option<ProjectRecord>,
    uncertain: bool,
) -> Step<bool> {
    let stored = match registry.project_of(&owner.instance, owner.project).await {
        Ok(stored) => stored,
        Err(err) => return Step::done(Err(err.into()), None),
    };
    if let Some(stored) = stored.as_ref().filter(|record| record.is_live()) {
        let learned = current.is_none_or(|record| stored.version > record.version);
        return Step::done(Ok(false), learned.then(|| stored.clone()));
    }
    if let Some(remembered) = current.filter(ProjectRecord::is_live) {
        warn!(tenant_key = %remembered.tenant_key, "the registry lost a project's row; writing it again");
        let again = remembered.with_status(remembered.status);
        if let Err(err) = registry.record(&again).await {
            return Step::unknown(err, again);
        }
        return Step::done(Ok(true), Some(again));
    }
    let provisioning = as_answered(
        owner.instance.clone(),
        owner.project,
        owner.created_at,
        stored,
    );
    info!(tenant_key = %provisioning.tenant_key, "adopting a database whose registry row is missing");
    let start = Start {
        current: Some(provisioning),
        uncertain,
        ..Start::default()
    };
    advance(registry, &owner.instance, owner.project, start)
        .await
        .map(|_| true)
}

/// The provisioning record of a project answered with `created_at` whose row is missing; a
/// purged row's version history keeps growing.
fn as_answered(
    instance: InstanceId,
    project: ProjectId,
    created_at: u32,
    purged: Option<ProjectRecord>,
) -> ProjectRecord {
    match purged {
        Some(purged) => purged.reborn(created_at),
        None => ProjectRecord {
            created_at,
            ..ProjectRecord::new(instance, project)
        },
    }
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
/// the same record. It decides from the fresher of the remembered record and the registry's
/// (another gateway may have brought the project back or deleted it), and when neither knows
/// the project live it looks for its marked database, so a project whose registry row a crash
/// took is deleted too, not adopted later.
pub async fn deprovision(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    current: Option<ProjectRecord>,
    uncertain: bool,
) -> Step<ProjectRecord> {
    let (current, learned) = match registry.project_of(instance, project).await {
        Ok(stored) => fresher(current, stored),
        Err(err) => return Step::done(Err(err.into()), None),
    };
    let (current, learned) = match current {
        Some(record) if record.is_live() => (Some(record), learned),
        purged => match marked(registry, instance, project, purged).await {
            Ok(found) => (found, true),
            Err(err) => return Step::done(Err(err.into()), None),
        },
    };
    let record = match current {
        Some(record) if record.status == ProjectStatus::Deprovisioned && !uncertain => {
            let remember = learned.then(|| record.clone());
            return Step::done(Ok(record), remember);
        }
        Some(record) if record.is_live() => record,
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

/// The project as it was answered (`ready`) when its database is marked as its own but the
/// registry has no live row for it: a crash may have taken the row after the answer.
async fn marked(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    purged: Option<ProjectRecord>,
) -> Result<Option<ProjectRecord>, RegistryError> {
    let database = TenantKey::derive(instance, project).database();
    let Some((_, owner)) = registry.owners_of(&[database]).await?.pop() else {
        return Ok(None);
    };
    let provisioning = as_answered(instance.clone(), project, owner.created_at, purged);
    Ok(Some(provisioning.with_status(ProjectStatus::Ready)))
}

/// Drops the database of a project deprovisioned before `cutoff`; false when it is not due.
/// The registry is read just before, since another gateway may have brought the project back.
/// A project whose state is uncertain is never purged until a change has settled it.
pub async fn purge(
    registry: &Registry,
    instance: &InstanceId,
    project: ProjectId,
    current: Option<ProjectRecord>,
    cutoff: u32,
    uncertain: bool,
) -> Step<bool> {
    if uncertain {
        return Step::done(Ok(false), None);
    }
    let (current, learned) = match registry.project_of(instance, project).await {
        Ok(stored) => fresher(current, stored),
        Err(err) => return Step::done(Err(err.into()), None),
    };
    let due = |r: &ProjectRecord| {
        r.status == ProjectStatus::Deprovisioned && r.deprovisioned_at <= cutoff
    };
    let Some(record) = current.as_ref().filter(|r| due(r)) else {
        return Step::done(Ok(false), current.filter(|_| learned));
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
