//! The tenant actor: one per GitLab instance, owning that instance's projects. It loads them
//! from the registry when it starts, handles one message at a time (so concurrent requests for
//! a project run its DDL once), and stops itself when the instance has been idle for a while.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, instrument, warn};

use crate::code::ErrorCode;
use crate::registry::{ProjectRecord, ProjectStatus, Registry, RegistryError};
use crate::settings::TenantSettings;
use crate::tenancy::{InstanceId, ProjectId};

#[derive(Debug, Clone, thiserror::Error)]
pub enum TenantError {
    #[error("project {0} is not onboarded for this instance")]
    NotOnboarded(ProjectId),
    #[error("this instance already has {0} projects, the most allowed; deprovision one first")]
    QuotaExceeded(usize),
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
    /// The project when it is ready to serve queries and collection.
    ReadyProject(ProjectId, RpcReplyPort<Result<ProjectRecord, TenantError>>),
    /// The project in any status but purged.
    Project(ProjectId, RpcReplyPort<Result<ProjectRecord, TenantError>>),
    /// Every project not purged.
    Projects(RpcReplyPort<Result<Vec<ProjectRecord>, TenantError>>),
    Deprovision(ProjectId, RpcReplyPort<Result<ProjectRecord, TenantError>>),
    /// Drops the project's database if it was deprovisioned before the cutoff (Unix seconds).
    Purge(ProjectId, u32, RpcReplyPort<Result<bool, TenantError>>),
    /// Events stored in a month.
    Usage(ProjectId, u16, u8, RpcReplyPort<Result<u64, TenantError>>),
    /// Timer: stop when nothing happened for the idle timeout.
    IdleCheck,
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
        myself: ActorRef<TenantMsg>,
        args: TenantArgs,
    ) -> Result<TenantState, ActorProcessingErr> {
        let projects = BTreeMap::new();
        let idle = Duration::from_secs(args.settings.idle_timeout_seconds.max(1));
        myself.send_interval(idle.div_f64(2.0), || TenantMsg::IdleCheck);
        Ok(TenantState {
            instance: args.instance,
            registry: args.registry,
            settings: args.settings,
            projects,
            last_active: Instant::now(),
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<TenantMsg>,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        let records = state.registry.projects_of(&state.instance).await?;
        state.projects = records
            .into_iter()
            .map(|record| (record.project, record))
            .collect();
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
                let _ = reply.send(state.onboard(project).await);
            }
            TenantMsg::ReadyProject(project, reply) => {
                let _ = reply.send(state.ready_project(project));
            }
            TenantMsg::Project(project, reply) => {
                let _ = reply.send(state.known_project(project).cloned());
            }
            TenantMsg::Projects(reply) => {
                let live = state.projects.values().filter(|record| is_live(record));
                let _ = reply.send(Ok(live.cloned().collect()));
            }
            TenantMsg::Deprovision(project, reply) => {
                let _ = reply.send(state.deprovision(project).await);
            }
            TenantMsg::Purge(project, cutoff, reply) => {
                let _ = reply.send(state.purge(project, cutoff).await);
            }
            TenantMsg::Usage(project, year, month, reply) => {
                let _ = reply.send(state.usage(project, year, month).await);
            }
            TenantMsg::IdleCheck => {
                let idle = Duration::from_secs(state.settings.idle_timeout_seconds);
                if state.last_active.elapsed() >= idle {
                    myself.stop(Some("idle".to_owned()));
                }
            }
        }
        Ok(())
    }
}

fn is_live(record: &ProjectRecord) -> bool {
    record.status != ProjectStatus::Purged
}

impl TenantState {
    /// Moves the project through `provisioning` to `ready`, resuming wherever a previous attempt
    /// stopped; every step is safe to repeat. A deprovisioned project comes back with its data.
    #[instrument(skip_all, fields(instance = %self.instance, project = %project))]
    async fn onboard(&mut self, project: ProjectId) -> Result<Onboarded, TenantError> {
        let current = self.projects.get(&project).cloned();
        if let Some(record) = current
            .as_ref()
            .filter(|r| r.status == ProjectStatus::Ready)
        {
            return Ok(Onboarded {
                project: record.clone(),
                created: false,
            });
        }
        if current
            .as_ref()
            .is_none_or(|r| r.status != ProjectStatus::Provisioning)
        {
            self.check_quota()?;
        }

        let provisioning = match current {
            Some(record) if record.status == ProjectStatus::Provisioning => record,
            Some(record) if record.status == ProjectStatus::Deprovisioned => {
                record.with_status(ProjectStatus::Provisioning)
            }
            Some(purged) => purged.reborn(),
            None => ProjectRecord::new(self.instance.clone(), project),
        };
        self.save(provisioning.clone()).await?;

        if let Err(err) = self
            .registry
            .create_tenant_database(&provisioning.tenant_key)
            .await
        {
            warn!(error = %err, "tenant database creation failed; the project stays provisioning");
            return Err(err.into());
        }
        let ready = provisioning.with_status(ProjectStatus::Ready);
        self.save(ready.clone()).await?;

        info!(tenant_key = %ready.tenant_key, "project onboarded");
        metrics::counter!("monitor_gateway_projects_onboarded_total").increment(1);
        Ok(Onboarded {
            project: ready,
            created: true,
        })
    }

    /// Projects that count against the quota: those ready or on their way there.
    fn check_quota(&self) -> Result<(), TenantError> {
        let active = self
            .projects
            .values()
            .filter(|r| matches!(r.status, ProjectStatus::Ready | ProjectStatus::Provisioning))
            .count();
        if active >= self.settings.max_projects {
            metrics::counter!("monitor_gateway_quota_refusals_total").increment(1);
            return Err(TenantError::QuotaExceeded(self.settings.max_projects));
        }
        Ok(())
    }

    /// Stops queries and collection at once; the data stays until the purge. Repeating it
    /// answers the same record.
    #[instrument(skip_all, fields(instance = %self.instance, project = %project))]
    async fn deprovision(&mut self, project: ProjectId) -> Result<ProjectRecord, TenantError> {
        let record = self.known_project(project)?.clone();
        if record.status == ProjectStatus::Deprovisioned {
            return Ok(record);
        }
        let deprovisioned = record.with_status(ProjectStatus::Deprovisioned);
        self.save(deprovisioned.clone()).await?;
        info!(tenant_key = %deprovisioned.tenant_key, "project deprovisioned");
        metrics::counter!("monitor_gateway_projects_deprovisioned_total").increment(1);
        Ok(deprovisioned)
    }

    /// Drops the database of a project deprovisioned before `cutoff`; false when not due.
    #[instrument(skip_all, fields(instance = %self.instance, project = %project))]
    async fn purge(&mut self, project: ProjectId, cutoff: u32) -> Result<bool, TenantError> {
        let Some(record) = self.projects.get(&project).cloned() else {
            return Ok(false);
        };
        if record.status != ProjectStatus::Deprovisioned || record.deprovisioned_at > cutoff {
            return Ok(false);
        }
        self.registry
            .drop_tenant_database(&record.tenant_key)
            .await?;
        let purged = record.with_status(ProjectStatus::Purged);
        self.save(purged).await?;
        info!(tenant_key = %record.tenant_key, "project purged after its grace period");
        metrics::counter!("monitor_gateway_projects_purged_total").increment(1);
        Ok(true)
    }

    async fn usage(&self, project: ProjectId, year: u16, month: u8) -> Result<u64, TenantError> {
        let record = self.known_project(project)?;
        Ok(self
            .registry
            .events_in_month(&record.tenant_key, year, month)
            .await?)
    }

    /// Records a new version in the registry first, then in the cache.
    async fn save(&mut self, record: ProjectRecord) -> Result<(), TenantError> {
        self.registry.record(&record).await?;
        self.projects.insert(record.project, record);
        Ok(())
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
