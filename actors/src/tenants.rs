//! The tenants supervisor: spawns a tenant actor for an instance on first use and forgets it when
//! it stops. Callers reach a running tenant actor directly through the actor registry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::warn;

use crate::registry::ProjectRecord;
use crate::registry::Registry;
use crate::tenancy::{InstanceId, ProjectId};
use crate::tenant::{Onboarded, TenantActor, TenantArgs, TenantError, TenantMsg};

pub const TENANTS_SUPERVISOR: &str = "tenants";

pub enum TenantsMsg {
    /// The tenant actor of an instance, started if it is not running.
    Tenant(
        InstanceId,
        RpcReplyPort<Result<ActorRef<TenantMsg>, TenantError>>,
    ),
}

pub struct TenantsSupervisor;

pub struct TenantsState {
    registry: Arc<Registry>,
    running: HashMap<InstanceId, ActorRef<TenantMsg>>,
}

fn tenant_name(instance: &InstanceId) -> String {
    format!("tenant:{instance}")
}

impl Actor for TenantsSupervisor {
    type Msg = TenantsMsg;
    type State = TenantsState;
    type Arguments = Arc<Registry>;

    async fn pre_start(
        &self,
        _myself: ActorRef<TenantsMsg>,
        registry: Arc<Registry>,
    ) -> Result<TenantsState, ActorProcessingErr> {
        Ok(TenantsState {
            registry,
            running: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<TenantsMsg>,
        message: TenantsMsg,
        state: &mut TenantsState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TenantsMsg::Tenant(instance, reply) => {
                let _ = reply.send(state.tenant(&myself, instance).await);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<TenantsMsg>,
        event: SupervisionEvent,
        state: &mut TenantsState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state
                    .running
                    .retain(|_, actor| actor.get_id() != cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                // The next request for this instance starts a fresh actor from the registry.
                warn!(actor = ?cell.get_name(), %error, "tenant actor failed");
                metrics::counter!("monitor_gateway_actor_failures_total", "actor" => "tenant")
                    .increment(1);
                state
                    .running
                    .retain(|_, actor| actor.get_id() != cell.get_id());
            }
            _ => {}
        }
        metrics::gauge!("monitor_gateway_tenant_actors").set(state.running.len() as f64);
        Ok(())
    }
}

impl TenantsState {
    async fn tenant(
        &mut self,
        myself: &ActorRef<TenantsMsg>,
        instance: InstanceId,
    ) -> Result<ActorRef<TenantMsg>, TenantError> {
        if let Some(actor) = self.running.get(&instance) {
            return Ok(actor.clone());
        }
        let args = TenantArgs {
            instance: instance.clone(),
            registry: self.registry.clone(),
        };
        let (actor, _) = Actor::spawn_linked(
            Some(tenant_name(&instance)),
            TenantActor,
            args,
            myself.get_cell(),
        )
        .await
        .map_err(|err| {
            TenantError::Upstream(format!("cannot load the instance's projects: {err}"))
        })?;
        self.running.insert(instance, actor.clone());
        metrics::gauge!("monitor_gateway_tenant_actors").set(self.running.len() as f64);
        Ok(actor)
    }
}

/// How the rest of the gateway talks to tenants, without building messages by hand.
#[derive(Clone)]
pub struct Tenants {
    timeout: Duration,
}

impl Tenants {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    pub async fn onboard(
        &self,
        instance: &InstanceId,
        project: ProjectId,
    ) -> Result<Onboarded, TenantError> {
        let tenant = self.tenant(instance).await?;
        self.call(&tenant, |reply| TenantMsg::Onboard(project, reply))
            .await
    }

    pub async fn ready_project(
        &self,
        instance: &InstanceId,
        project: ProjectId,
    ) -> Result<ProjectRecord, TenantError> {
        let tenant = self.tenant(instance).await?;
        self.call(&tenant, |reply| TenantMsg::Project(project, reply))
            .await
    }

    async fn tenant(&self, instance: &InstanceId) -> Result<ActorRef<TenantMsg>, TenantError> {
        if let Some(cell) = ractor::registry::where_is(tenant_name(instance)) {
            return Ok(cell.into());
        }
        let supervisor: ActorRef<TenantsMsg> = ractor::registry::where_is(TENANTS_SUPERVISOR)
            .ok_or(TenantError::Unavailable)?
            .into();
        self.call(&supervisor, |reply| {
            TenantsMsg::Tenant(instance.clone(), reply)
        })
        .await
    }

    async fn call<M, T>(
        &self,
        actor: &ActorRef<M>,
        message: impl FnOnce(RpcReplyPort<Result<T, TenantError>>) -> M,
    ) -> Result<T, TenantError>
    where
        M: ractor::Message,
        T: Send + 'static,
    {
        use ractor::rpc::CallResult;
        match actor.call(message, Some(self.timeout)).await {
            Ok(CallResult::Success(result)) => result,
            Ok(CallResult::Timeout) => Err(TenantError::Timeout),
            Ok(CallResult::SenderError) | Err(_) => Err(TenantError::Unavailable),
        }
    }
}
