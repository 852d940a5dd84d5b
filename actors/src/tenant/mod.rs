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
use crate::registry::{Owner, ProjectRecord, ProjectStatus, Registry, RegistryError};
use crate::settings::TenantSettings;
use crate::tenancy::{InstanceId, ProjectId};

mod behind;
mod bucket;

use behind::{report, settle};
use bucket::TokenBucket;

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
    /// unless the registry knows it by its turn; true when a row was written.
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
    /// Recent registry rows of the instance's projects, some perhaps written by other gateways.
    Refresh(Vec<ProjectRecord>),
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
        if !matches!(message, TenantMsg::IdleCheck | TenantMsg::Refresh(_)) {
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
                let live = state.projects.values().filter(|record| record.is_live());
                let _ = reply.send(Ok(live.cloned().collect()));
            }
            TenantMsg::Usage(project, year, month, reply) => {
                state.usage(project, year, month, reply)
            }
            TenantMsg::Refresh(records) => state.refresh(records),
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

    /// Takes what other gateways changed: a record newer than the one remembered replaces it,
    /// and settles whatever was still uncertain or on its way for that project. A project with
    /// a change running is left to it, since every change reads the registry itself.
    fn refresh(&mut self, records: Vec<ProjectRecord>) {
        for record in records {
            let project = record.project;
            let newer = self
                .projects
                .get(&project)
                .is_none_or(|known| record.version > known.version);
            if !newer || self.running.contains(&project) {
                continue;
            }
            self.uncertain.remove(&project);
            self.behind.remove(&project);
            self.finished_at_load.remove(&project);
            self.projects.insert(project, record);
        }
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
                // Its row is on its way (onboarded since the databases were listed).
                Change::Adopt(_, reply) if self.behind.contains_key(&project) => {
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
                        let mut step = lifecycle::purge(
                            &registry, &instance, project, current, cutoff, uncertain,
                        )
                        .await;
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
            .filter(|record| record.is_live())
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
