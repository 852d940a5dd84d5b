//! Rows written behind an answer: telling the tenant how they went, and writing again what the
//! registry is still owed after a failure or a crash.

use std::time::Duration;

use ractor::ActorRef;
use tracing::warn;

use super::{Change, Stored, TenantMsg, TenantState};
use crate::lifecycle;
use crate::registry::{ProjectRecord, ProjectStatus, Written};
use crate::tenancy::ProjectId;

/// How long after a row written behind an answer failed its project's state is written again;
/// it doubles with every failed attempt, up to [`BEHIND_RETRY_MAX`].
const BEHIND_RETRY: Duration = Duration::from_secs(2);
const BEHIND_RETRY_MAX: Duration = Duration::from_secs(60);

/// Tells the tenant what a finished change leaves behind, before the caller hears of it, and
/// hands over what is still being written behind the answer.
pub(super) fn report<T>(
    myself: &ActorRef<TenantMsg>,
    project: ProjectId,
    step: &mut lifecycle::Step<T>,
) -> Option<(u64, Written)> {
    let behind = step.behind.take().zip(step.record.as_ref());
    let stored = match (&behind, step.uncertain) {
        (Some(_), _) => Stored::Behind,
        (None, true) => Stored::Unknown,
        (None, false) => Stored::Yes,
    };
    let behind = behind.map(|(written, record)| (record.version, written));
    let _ = myself.send_message(TenantMsg::ChangeDone(project, step.record.clone(), stored));
    behind
}

/// Waits, after the answer, for a row written behind it, and tells the tenant how it went.
pub(super) async fn settle(
    myself: ActorRef<TenantMsg>,
    project: ProjectId,
    behind: Option<(u64, Written)>,
) {
    if let Some((version, written)) = behind {
        let stored = written.stored().await.is_ok();
        let _ = myself.send_message(TenantMsg::BehindStored(project, version, stored));
    }
}

impl TenantState {
    /// Projects loaded `provisioning` whose database is complete were answered `ready` before
    /// a crash took their `ready` row: they are ready again at once, their row written behind.
    pub(super) async fn finish_loaded(&mut self, myself: &ActorRef<TenantMsg>) {
        let half_done: Vec<ProjectRecord> = self
            .projects
            .values()
            .filter(|record| record.status == ProjectStatus::Provisioning)
            .cloned()
            .collect();
        for record in half_done {
            let project = record.project;
            match lifecycle::finish_loaded(&self.registry, &record).await {
                Ok(Some((ready, written))) => {
                    let version = ready.version;
                    self.behind.insert(project, version);
                    self.finished_at_load.insert(project);
                    self.projects.insert(project, ready);
                    tokio::spawn(settle(myself.clone(), project, Some((version, written))));
                }
                Ok(None) => {}
                Err(err) => {
                    warn!(%project, error = %err, "cannot check a half-done onboarding; finishing it shortly");
                    self.uncertain.insert(project);
                    myself.send_after(BEHIND_RETRY, move || TenantMsg::RewriteBehind(project, 0));
                }
            }
        }
    }

    /// A row written behind an answer is stored or failed. A failed one leaves the project
    /// uncertain and is written again shortly, unless a later change has superseded it.
    pub(super) fn behind_stored(
        &mut self,
        myself: &ActorRef<TenantMsg>,
        project: ProjectId,
        version: u64,
        stored: bool,
    ) {
        if self.behind.get(&project) != Some(&version) {
            return;
        }
        self.behind.remove(&project);
        if stored {
            return;
        }
        warn!(%project, "a registry write behind an answer failed; writing it again shortly");
        self.uncertain.insert(project);
        myself.send_after(BEHIND_RETRY, move || TenantMsg::RewriteBehind(project, 0));
    }

    /// Finishes the project again, as reconciliation would, and tries later if that fails too;
    /// the answer promised `ready`, so the registry is owed its row.
    pub(super) fn rewrite_behind(
        &mut self,
        myself: &ActorRef<TenantMsg>,
        project: ProjectId,
        attempts: u32,
    ) {
        if !self.uncertain.contains(&project) {
            return;
        }
        let (reply, finished) = ractor::concurrency::oneshot();
        self.enqueue(myself, project, Change::Finish(reply.into()));
        let myself = myself.clone();
        tokio::spawn(async move {
            if !matches!(finished.await, Ok(Ok(_))) {
                let delay = BEHIND_RETRY
                    .saturating_mul(2u32.saturating_pow(attempts + 1))
                    .min(BEHIND_RETRY_MAX);
                myself.send_after(delay, move || {
                    TenantMsg::RewriteBehind(project, attempts + 1)
                });
            }
        });
    }
}
