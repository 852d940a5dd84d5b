//! The tenant actor: one per GitLab instance, owning that instance's projects. It loads them
//! from the registry after it starts and answers lookups from memory. Changes to one project
//! (onboarding, deprovisioning, purging) run one after another, so concurrent requests for a
//! project run its DDL once, while different projects proceed side by side. It stops itself
//! when the instance has been idle for a while.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{Instrument, info_span, warn};

use crate::code::ErrorCode;
use crate::lifecycle;
use crate::query::QueryShare;
use crate::registry::{Owner, ProjectRecord, ProjectStatus, Registry, RegistryError, Written};
use crate::settings::TenantSettings;
use crate::tenancy::{InstanceId, ProjectId};

/// How long after a row written behind an answer failed its project's state is written again;
/// it doubles with every failed attempt, up to [`BEHIND_RETRY_MAX`].
const BEHIND_RETRY: Duration = Duration::from_secs(2);
const BEHIND_RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, thiserror::Error)]
pub enum TenantError {
    #[error("project {0} is not onboarded for this instance")]
    NotOnboarded(ProjectId),
    #[error("this instance already has {0} projects, the most allowed; deprovision one first")]
    QuotaExceeded(usize),
    #[error("this instance sends queries faster than allowed; retry in {0} s")]
    RateLimited(u64),
    #[error("the analytics store is unavailable: {0}")]
    Upstream(String),
    #[error("the tenant actor did not answer in time")]
    Timeout,
    #[error("the tenant actor is unavailable")]
    Unavailable,
}

impl TenantError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotOnboarded(_) => ErrorCode::ProjectNotOnboarded,
            Self::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            Self::RateLimited(_) => ErrorCode::RateLimited,
            Self::Upstream(_) | Self::Unavailable => ErrorCode::UpstreamUnavailable,
            Self::Timeout => ErrorCode::UpstreamTimeout,
        }
    }
}

impl From<RegistryError> for TenantError {
    /// The details stay in the logs; callers learn only that the store is unavailable.
    fn from(err: RegistryError) -> Self {
        warn!(error = %err, "ClickHouse request failed");
        metrics::counter!("monitor_gateway_upstream_errors_total", "upstream" => "clickhouse")
            .increment(1);
        Self::Upstream("ClickHouse did not complete the request; retry later".to_owned())
    }
}

/// The outcome of an onboarding request.
#[derive(Debug, Clone)]
pub struct Onboarded {
    pub project: ProjectRecord,
    /// False when the project was already ready before this request.
    pub created: bool,
}

pub enum TenantMsg {
    Onboard(ProjectId, RpcReplyPort<Result<Onboarded, TenantError>>),
    Deprovision(ProjectId, RpcReplyPort<Result<ProjectRecord, TenantError>>),
    /// Drops the project's database if it was deprovisioned before the cutoff (Unix seconds).
    Purge(ProjectId, u32, RpcReplyPort<Result<bool, TenantError>>),
    /// Finishes the project's onboarding if it is still `provisioning` when its turn comes;
    /// false when there was nothing to finish (finished, deprovisioned or purged meanwhile).
    Finish(ProjectId, RpcReplyPort<Result<bool, TenantError>>),
    /// Registers the project, whose database was found marked as its own with no registry row,
    /// unless the project is known by its turn; true when it was registered.
    Adopt(Owner, RpcReplyPort<Result<bool, TenantError>>),
    /// The project when it is ready to serve queries and collection.
    ReadyProject(ProjectId, RpcReplyPort<Result<ProjectRecord, TenantError>>),
    /// The project for one query, ready and within the instance's query rate, with the
    /// instance's places at Cube.
    AdmitQuery(
        ProjectId,
        RpcReplyPort<Result<(ProjectRecord, QueryShare), TenantError>>,
    ),
    /// The project in any status but purged.
    Project(ProjectId, RpcReplyPort<Result<ProjectRecord, TenantError>>),
    /// Every project not purged.
    Projects(RpcReplyPort<Result<Vec<ProjectRecord>, TenantError>>),
    /// Events stored in a month.
    Usage(ProjectId, u16, u8, RpcReplyPort<Result<u64, TenantError>>),
    /// A change to a project finished: the record to remember (if it changed), and whether a
    /// registry write of unknown outcome makes it uncertain.
    ChangeDone(ProjectId, Option<ProjectRecord>, Stored),
    /// The row of this version, written behind an answer, is stored (true) or failed.
    BehindStored(ProjectId, u64, bool),
    /// Writes again the state of a project whose row written behind an answer failed, unless a
    /// later change settled it; the count of attempts so far.
    RewriteBehind(ProjectId, u32),
    /// Sent by the supervisor's sweep: stop when nothing happened for the idle timeout.
    IdleCheck,
}

/// Whether the registry holds the record a change leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Yes,
    /// A write failed: it may or may not have landed.
    Unknown,
    /// It is being written behind the answer.
    Behind,
}

/// A change to one project, waiting for the ones before it.
enum Change {
    Onboard(RpcReplyPort<Result<Onboarded, TenantError>>),
    Deprovision(RpcReplyPort<Result<ProjectRecord, TenantError>>),
    Purge(u32, RpcReplyPort<Result<bool, TenantError>>),
    Finish(RpcReplyPort<Result<bool, TenantError>>),
    Adopt(Owner, RpcReplyPort<Result<bool, TenantError>>),
}

impl Change {
    /// Answers the change's caller with a refusal.
    fn refuse(self, err: TenantError) {
        match self {
            Self::Onboard(reply) => drop(reply.send(Err(err))),
            Self::Deprovision(reply) => drop(reply.send(Err(err))),
            Self::Purge(_, reply) | Self::Finish(reply) | Self::Adopt(_, reply) => {
                drop(reply.send(Err(err)));
            }
        }
    }
}

pub struct TenantActor;

pub struct TenantArgs {
    pub instance: InstanceId,
    pub registry: Arc<Registry>,
    pub settings: TenantSettings,
}

pub struct TenantState {
    instance: InstanceId,
    registry: Arc<Registry>,
    settings: TenantSettings,
    projects: BTreeMap<ProjectId, ProjectRecord>,
    /// Projects with a change running.
    running: HashSet<ProjectId>,
    /// Changes waiting for the running one of their project.
    waiting: HashMap<ProjectId, VecDeque<Change>>,
    /// Projects whose last registry write has an unknown outcome; their next change writes
    /// their state again, and they are not purged meanwhile.
    uncertain: HashSet<ProjectId>,
    /// Projects whose remembered record (of this version) is being written behind an answer.
    behind: HashMap<ProjectId, u64>,
    /// Projects found half-done and finished when the tenant loaded, until reconciliation
    /// reports them.
    finished_at_load: HashSet<ProjectId>,
    /// New projects being onboarded, counted against the quota before they are recorded.
    reserved: HashSet<ProjectId>,
    /// The instance's query rate limit.
    queries: TokenBucket,
    /// The instance's places at Cube.
    share: QueryShare,
    last_active: Instant,
}

impl Actor for TenantActor {
    type Msg = TenantMsg;
    type State = TenantState;
    type Arguments = TenantArgs;

    /// Cheap, so the supervisor is never held up by ClickHouse; the projects load in
    /// `post_start`, before any message is handled.
    async fn pre_start(
        &self,
        _myself: ActorRef<TenantMsg>,
        args: TenantArgs,
    ) -> Result<TenantState, ActorProcessingErr> {
        Ok(TenantState {
            instance: args.instance,
            registry: args.registry,
            projects: BTreeMap::new(),
            running: HashSet::new(),
            waiting: HashMap::new(),
            uncertain: HashSet::new(),
            behind: HashMap::new(),
            finished_at_load: HashSet::new(),
            reserved: HashSet::new(),
            queries: TokenBucket::new(
                args.settings.query_rate_per_second,
                args.settings.query_burst,
            ),
            share: QueryShare::new(args.settings.max_concurrent_queries),
            last_active: Instant::now(),
            settings: args.settings,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<TenantMsg>,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        // Rows a previous actor of this instance queued land (or fail) before they are read.
        // Boxed: the actor's task lives as long as the actor, and an inline ClickHouse future
        // would make every idle tenant carry its size.
        let _ = Box::pin(state.registry.flush()).await;
        let records = Box::pin(state.registry.projects_of(&state.instance)).await?;
        state.projects = records
            .into_iter()
            .map(|record| (record.project, record))
            .collect();
        Box::pin(state.finish_loaded(&myself)).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<TenantMsg>,
        message: TenantMsg,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(message, TenantMsg::IdleCheck) {
            state.last_active = Instant::now();
        }
        match message {
            TenantMsg::Onboard(project, reply) => {
                state.enqueue(&myself, project, Change::Onboard(reply))
            }
            TenantMsg::Deprovision(project, reply) => {
                state.enqueue(&myself, project, Change::Deprovision(reply));
            }
            TenantMsg::Purge(project, cutoff, reply) => {
                state.enqueue(&myself, project, Change::Purge(cutoff, reply));
            }
            TenantMsg::Finish(project, reply) => {
                state.enqueue(&myself, project, Change::Finish(reply));
            }
            TenantMsg::Adopt(owner, reply) => {
                state.enqueue(&myself, owner.project, Change::Adopt(owner, reply));
            }
            TenantMsg::ChangeDone(project, record, stored) => {
                state.finish(&myself, project, record, stored);
            }
            TenantMsg::BehindStored(project, version, stored) => {
                state.behind_stored(&myself, project, version, stored);
            }
            TenantMsg::RewriteBehind(project, attempts) => {
                state.rewrite_behind(&myself, project, attempts);
            }
            TenantMsg::ReadyProject(project, reply) => {
                let _ = reply.send(state.ready_project(project));
            }
            TenantMsg::AdmitQuery(project, reply) => {
                let admitted = state.ready_project(project).and_then(|record| {
                    state
                        .queries
                        .take()
                        .map(|()| (record, state.share.clone()))
                        .map_err(|retry_after| {
                            metrics::counter!(
                                "monitor_gateway_queries_refused_total",
                                "reason" => "rate"
                            )
                            .increment(1);
                            TenantError::RateLimited(retry_after)
                        })
                });
                let _ = reply.send(admitted);
            }
            TenantMsg::Project(project, reply) => {
                let _ = reply.send(state.known_project(project).cloned());
            }
            TenantMsg::Projects(reply) => {
                let live = state.projects.values().filter(|record| is_live(record));
                let _ = reply.send(Ok(live.cloned().collect()));
            }
            TenantMsg::Usage(project, year, month, reply) => {
                state.usage(project, year, month, reply)
            }
            TenantMsg::IdleCheck => {
                let idle = Duration::from_secs(state.settings.idle_timeout_seconds);
                // A project with a write of unknown outcome keeps the actor: reloading from the
                // registry could miss a write that lands later. So do queries at Cube: a new
                // actor would start the instance's share afresh.
                let settled = state.running.is_empty()
                    && state.uncertain.is_empty()
                    && state.behind.is_empty()
                    && !state.share.in_use();
                if settled && state.last_active.elapsed() >= idle {
                    myself.stop(Some("idle".to_owned()));
                }
            }
        }
        Ok(())
    }
}

/// Tells the tenant what a finished change leaves behind, before the caller hears of it, and
/// hands over what is still being written behind the answer.
fn report<T>(
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
async fn settle(myself: ActorRef<TenantMsg>, project: ProjectId, behind: Option<(u64, Written)>) {
    if let Some((version, written)) = behind {
        let stored = written.stored().await.is_ok();
        let _ = myself.send_message(TenantMsg::BehindStored(project, version, stored));
    }
}

fn is_live(record: &ProjectRecord) -> bool {
    record.status != ProjectStatus::Purged
}

impl TenantState {
    fn enqueue(&mut self, myself: &ActorRef<TenantMsg>, project: ProjectId, change: Change) {
        if self.running.contains(&project) {
            self.waiting.entry(project).or_default().push_back(change);
        } else {
            self.start(myself, project, change);
        }
    }

    /// Remembers what the finished change recorded and starts the next one for the project.
    fn finish(
        &mut self,
        myself: &ActorRef<TenantMsg>,
        project: ProjectId,
        record: Option<ProjectRecord>,
        stored: Stored,
    ) {
        self.running.remove(&project);
        self.reserved.remove(&project);
        if stored == Stored::Unknown {
            warn!(%project, "a registry write may or may not have landed; the next change rewrites it");
            self.uncertain.insert(project);
        } else if record.is_some() {
            self.uncertain.remove(&project);
        }
        if record.is_some() {
            self.finished_at_load.remove(&project);
        }
        match (&record, stored) {
            (Some(record), Stored::Behind) => {
                self.behind.insert(project, record.version);
            }
            (Some(_), _) => {
                self.behind.remove(&project);
            }
            (None, _) => {}
        }
        if let Some(record) = record {
            self.projects.insert(project, record);
        }
        if let Some(next) = self.next_waiting(project) {
            self.start(myself, project, next);
        }
    }

    /// Projects loaded `provisioning` whose database is complete were answered `ready` before
    /// a crash took their `ready` row: they are ready again at once, their row written behind.
    async fn finish_loaded(&mut self, myself: &ActorRef<TenantMsg>) {
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
    fn behind_stored(
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
    fn rewrite_behind(&mut self, myself: &ActorRef<TenantMsg>, project: ProjectId, attempts: u32) {
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

    fn next_waiting(&mut self, project: ProjectId) -> Option<Change> {
        let queue = self.waiting.get_mut(&project)?;
        let next = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&project);
        }
        next
    }

    /// Runs a change on its own task, which reports back with `ChangeDone` before it replies,
    /// so the caller's next message already sees the new record.
    fn start(&mut self, myself: &ActorRef<TenantMsg>, project: ProjectId, change: Change) {
        let mut change = Some(change);
        while let Some(next) = change.take() {
            match next {
                // Decided now, after every change queued before it: a project deleted since
                // reconciliation read the registry stays deleted.
                // One this tenant finished when it loaded is reported finished, once.
                Change::Finish(reply) if !self.unfinished(project) => {
                    let _ = reply.send(Ok(self.finished_at_load.remove(&project)));
                    change = self.next_waiting(project);
                }
                // Known by now (onboarded, deleted or finished since the databases were listed).
                Change::Adopt(_, reply) if self.projects.get(&project).is_some_and(is_live) => {
                    let _ = reply.send(Ok(false));
                    change = self.next_waiting(project);
                }
                // Admitted when it was answered: the quota does not take it back.
                Change::Adopt(..) => return self.spawn_change(myself, project, next),
                Change::Onboard(_) | Change::Finish(_) => {
                    match self.admit_onboarding(project) {
                        Ok(()) => return self.spawn_change(myself, project, next),
                        // Refused at once; the next waiting change may still go ahead.
                        Err(err) => {
                            next.refuse(err);
                            change = self.next_waiting(project);
                        }
                    }
                }
                other => return self.spawn_change(myself, project, other),
            }
        }
    }

    /// Whether a half-done onboarding is still there to finish: still provisioning, ready with a
    /// write of unknown outcome, or written by another gateway since this tenant loaded.
    fn unfinished(&self, project: ProjectId) -> bool {
        self.projects.get(&project).is_none_or(|record| {
            record.status == ProjectStatus::Provisioning
                || (record.status == ProjectStatus::Ready && self.uncertain.contains(&project))
        })
    }

    /// The quota, checked when an onboarding would add a project that is not already counted.
    fn admit_onboarding(&mut self, project: ProjectId) -> Result<(), TenantError> {
        let counted = |r: &ProjectRecord| {
            matches!(r.status, ProjectStatus::Ready | ProjectStatus::Provisioning)
        };
        if self.projects.get(&project).is_some_and(counted) {
            return Ok(());
        }
        let active = self.projects.values().filter(|r| counted(r)).count() + self.reserved.len();
        if active >= self.settings.max_projects {
            metrics::counter!("monitor_gateway_quota_refusals_total").increment(1);
            return Err(TenantError::QuotaExceeded(self.settings.max_projects));
        }
        self.reserved.insert(project);
        Ok(())
    }

    fn spawn_change(&mut self, myself: &ActorRef<TenantMsg>, project: ProjectId, change: Change) {
        self.running.insert(project);
        let registry = self.registry.clone();
        let instance = self.instance.clone();
        let current = self.projects.get(&project).cloned();
        let uncertain = self.uncertain.contains(&project);
        let myself = myself.clone();
        let span = info_span!("project_change", instance = %instance, project = %project);
        tokio::spawn(
            async move {
                match change {
                    Change::Onboard(reply) => {
                        let mut step =
                            lifecycle::onboard(&registry, &instance, project, current, uncertain)
                                .await;
                        let behind = report(&myself, project, &mut step);
                        let _ = reply.send(step.outcome);
                        settle(myself, project, behind).await;
                    }
                    Change::Adopt(owner, reply) => {
                        let mut step =
                            lifecycle::adopt(&registry, &owner, current, uncertain).await;
                        let behind = report(&myself, project, &mut step);
                        let _ = reply.send(step.outcome);
                        settle(myself, project, behind).await;
                    }
                    Change::Deprovision(reply) => {
                        let mut step = lifecycle::deprovision(
                            &registry, &instance, project, current, uncertain,
                        )
                        .await;
                        report(&myself, project, &mut step);
                        let _ = reply.send(step.outcome);
                    }
                    Change::Finish(reply) => {
                        let mut step =
                            lifecycle::finish(&registry, &instance, project, current, uncertain)
                                .await;
                        let behind = report(&myself, project, &mut step);
                        let _ = reply.send(step.outcome);
                        settle(myself, project, behind).await;
                    }
                    Change::Purge(cutoff, reply) => {
                        let mut step =
                            lifecycle::purge(&registry, current, cutoff, uncertain).await;
                        report(&myself, project, &mut step);
                        let _ = reply.send(step.outcome);
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Reads the event count on its own task: it changes nothing, so it waits for nothing.
    fn usage(
        &self,
        project: ProjectId,
        year: u16,
        month: u8,
        reply: RpcReplyPort<Result<u64, TenantError>>,
    ) {
        let record = match self.known_project(project) {
            Ok(record) => record.clone(),
            Err(err) => {
                let _ = reply.send(Err(err));
                return;
            }
        };
        let registry = self.registry.clone();
        tokio::spawn(async move {
            let events = registry
                .events_in_month(&record.tenant_key, year, month)
                .await;
            let _ = reply.send(events.map_err(TenantError::from));
        });
    }

    fn known_project(&self, project: ProjectId) -> Result<&ProjectRecord, TenantError> {
        self.projects
            .get(&project)
            .filter(|record| is_live(record))
            .ok_or(TenantError::NotOnboarded(project))
    }

    fn ready_project(&self, project: ProjectId) -> Result<ProjectRecord, TenantError> {
        self.projects
            .get(&project)
            .filter(|record| record.status == ProjectStatus::Ready)
            .cloned()
            .ok_or(TenantError::NotOnboarded(project))
    }
}

/// A token bucket: `rate` tokens a second, holding `burst` at most.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    /// Takes a token, or says in how many whole seconds one will be there.
    fn take(&mut self) -> Result<(), u64> {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - self.tokens) / self.rate).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(2.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(bucket.take_at(start), Ok(()));
        }
        assert_eq!(bucket.take_at(start), Err(1));
        assert_eq!(bucket.take_at(start + Duration::from_millis(500)), Ok(()));
        assert!(bucket.take_at(start + Duration::from_millis(500)).is_err());
        // Idle time refills up to the burst, never beyond.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(bucket.take_at(later), Ok(()));
        }
        assert!(bucket.take_at(later).is_err());
    }

    #[test]
    fn a_slow_rate_asks_for_a_longer_wait() {
        let mut bucket = TokenBucket::new(0.1, 1);
        let start = Instant::now();
        assert_eq!(bucket.take_at(start), Ok(()));
        assert_eq!(bucket.take_at(start), Err(10));
    }
}
