//! The tenant actor: one per GitLab instance, owning that instance's projects. It loads them
//! from the registry when it starts, and onboards projects one message at a time, so concurrent
//! requests for one project run its DDL once.

use std::collections::BTreeMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, instrument, warn};

use crate::code::ErrorCode;
use crate::registry::{ProjectRecord, ProjectStatus, Registry, RegistryError};
use crate::tenancy::{InstanceId, ProjectId};

#[derive(Debug, Clone, thiserror::Error)]
pub enum TenantError {
    #[error("project {0} is not onboarded for this instance")]
    NotOnboarded(ProjectId),
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
            Self::Upstream(_) | Self::Unavailable => ErrorCode::UpstreamUnavailable,
            Self::Timeout => ErrorCode::UpstreamTimeout,
        }
    }
}

impl From<RegistryError> for TenantError {
    fn from(err: RegistryError) -> Self {
        Self::Upstream(err.to_string())
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
    Project(ProjectId, RpcReplyPort<Result<ProjectRecord, TenantError>>),
}

pub struct TenantActor;

pub struct TenantArgs {
    pub instance: InstanceId,
    pub registry: Arc<Registry>,
}

pub struct TenantState {
    instance: InstanceId,
    registry: Arc<Registry>,
    projects: BTreeMap<ProjectId, ProjectRecord>,
}

impl Actor for TenantActor {
    type Msg = TenantMsg;
    type State = TenantState;
    type Arguments = TenantArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<TenantMsg>,
        args: TenantArgs,
    ) -> Result<TenantState, ActorProcessingErr> {
        let records = args.registry.projects_of(&args.instance).await?;
        let projects = records
            .into_iter()
            .map(|record| (record.project, record))
            .collect();
        Ok(TenantState {
            instance: args.instance,
            registry: args.registry,
            projects,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<TenantMsg>,
        message: TenantMsg,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TenantMsg::Onboard(project, reply) => {
                let _ = reply.send(state.onboard(project).await);
            }
            TenantMsg::Project(project, reply) => {
                let _ = reply.send(state.ready_project(project));
            }
        }
        Ok(())
    }
}

impl TenantState {
    /// Moves the project through `provisioning` to `ready`, resuming wherever a previous attempt
    /// stopped; every step is safe to repeat.
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

        let provisioning = match current {
            Some(record) => record,
            None => {
                let record = ProjectRecord::new(self.instance.clone(), project);
                self.registry.record(&record).await?;
                self.projects.insert(project, record.clone());
                record
            }
        };

        if let Err(err) = self
            .registry
            .create_tenant_database(&provisioning.tenant_key)
            .await
        {
            warn!(error = %err, "tenant database creation failed; the project stays provisioning");
            return Err(err.into());
        }
        let ready = provisioning.with_status(ProjectStatus::Ready);
        self.registry.record(&ready).await?;
        self.projects.insert(project, ready.clone());

        info!(tenant_key = %ready.tenant_key, "project onboarded");
        metrics::counter!("monitor_gateway_projects_onboarded_total").increment(1);
        Ok(Onboarded {
            project: ready,
            created: true,
        })
    }

    fn ready_project(&self, project: ProjectId) -> Result<ProjectRecord, TenantError> {
        self.projects
            .get(&project)
            .filter(|record| record.status == ProjectStatus::Ready)
            .cloned()
            .ok_or(TenantError::NotOnboarded(project))
    }
}
