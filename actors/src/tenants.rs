//! The tenants supervisor: spawns a tenant actor for an instance on first use and forgets it when
//! it stops. Callers reach a running tenant actor directly through the actor registry. It also
//! keeps the running tenants abreast of what other gateways over the same registry change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::{debug, warn};

use crate::query::QueryShare;
use crate::registry::{Owner, ProjectRecord, Registry, RegistryError, unix_now};
use crate::settings::TenantSettings;
use crate::tenancy::{InstanceId, ProjectId};
use crate::tenant::{Onboarded, TenantActor, TenantArgs, TenantError, TenantMsg};

pub const TENANTS_SUPERVISOR: &str = "tenants";

/// How far before the previous look at the registry's changes the next one reaches back: a row
/// lands some time after the change it records (written behind an answer, written again after
/// a failure, or an INSERT whose answer timed out and that ClickHouse committed later), and the
/// clocks of gateways differ a little. Rows seen twice cost a comparison of versions.
const REFRESH_OVERLAP: Duration = Duration::from_secs(300);

pub enum TenantsMsg {
    /// The tenant actor of an instance, started if it is not running.
    Tenant(
        InstanceId,
        RpcReplyPort<Result<ActorRef<TenantMsg>, TenantError>>,
    ),
    /// Timer: ask every running tenant whether it has been idle long enough to stop. One timer
    /// here costs less than one per tenant.
    IdleSweep,
    /// Timer: look for changes other gateways made to the registry.
    Refresh,
    /// What a look that began at the given time (Unix seconds) found.
    Changed(u32, Result<Vec<ProjectRecord>, RegistryError>),
}

pub struct TenantsSupervisor;

pub struct TenantsArgs {
    pub registry: Arc<Registry>,
    pub settings: TenantSettings,
}

pub struct TenantsState {
    args: TenantsArgs,
    running: HashMap<InstanceId, ActorRef<TenantMsg>>,
    /// Rows changed at or after this time (Unix seconds) are asked for next.
    changed_since: u32,
    /// A look at the registry's changes is under way.
    refreshing: bool,
}

fn tenant_name(instance: &InstanceId) -> String {
    format!("tenant:{instance}")
}

impl Actor for TenantsSupervisor {
    type Msg = TenantsMsg;
    type State = TenantsState;
    type Arguments = TenantsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TenantsMsg>,
        args: TenantsArgs,
    ) -> Result<TenantsState, ActorProcessingErr> {
        let idle = Duration::from_secs(args.settings.idle_timeout_seconds.max(1));
        myself.send_interval(idle.div_f64(2.0), || TenantsMsg::IdleSweep);
        if args.settings.refresh_seconds > 0 {
            let refresh = Duration::from_secs(args.settings.refresh_seconds);
            myself.send_interval(refresh, || TenantsMsg::Refresh);
        }
        Ok(TenantsState {
            args,
            running: HashMap::new(),
            changed_since: overlapping(unix_now()),
            refreshing: false,
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
            TenantsMsg::IdleSweep => {
                for tenant in state.running.values() {
                    let _ = tenant.send_message(TenantMsg::IdleCheck);
                }
            }
            TenantsMsg::Refresh => state.refresh(&myself),
            TenantsMsg::Changed(started, changes) => state.changed(started, changes),
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
    /// Asks the registry for recent changes on a task of its own, so that a slow ClickHouse
    /// never holds up the spawning of tenants; one look at a time.
    fn refresh(&mut self, myself: &ActorRef<TenantsMsg>) {
        let started = unix_now();
        if self.running.is_empty() {
            // A tenant that starts reads the registry as it is then.
            self.changed_since = overlapping(started);
            return;
        }
        if self.refreshing {
            return;
        }
        self.refreshing = true;
        let registry = self.args.registry.clone();
        let since = self.changed_since;
        let myself = myself.clone();
        tokio::spawn(async move {
            let changes = registry.changed_since(since).await;
            let _ = myself.send_message(TenantsMsg::Changed(started, changes));
        });
    }

    /// Hands each running tenant the changes of its instance's projects.
    fn changed(&mut self, started: u32, changes: Result<Vec<ProjectRecord>, RegistryError>) {
        self.refreshing = false;
        let changes = match changes {
            Ok(changes) => changes,
            // Readiness reports ClickHouse away; the next look asks from the same time.
            Err(err) => return debug!(error = %err, "cannot read the registry's changes"),
        };
        self.changed_since = overlapping(started);
        let mut by_instance: HashMap<InstanceId, Vec<ProjectRecord>> = HashMap::new();
        for record in changes {
            if self.running.contains_key(&record.instance) {
                by_instance
                    .entry(record.instance.clone())
                    .or_default()
                    .push(record);
            }
        }
        for (instance, records) in by_instance {
            if let Some(tenant) = self.running.get(&instance) {
                let _ = tenant.send_message(TenantMsg::Refresh(records));
            }
        }
    }

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
            registry: self.args.registry.clone(),
            settings: self.args.settings.clone(),
        };
        let name = Some(tenant_name(&instance));
        let (actor, _) = Actor::spawn_linked(name, TenantActor, args, myself.get_cell())
            .await
            .map_err(|err| {
                warn!(%instance, error = %err, "cannot start a tenant actor");
                TenantError::Unavailable
            })?;
        self.running.insert(instance, actor.clone());
        metrics::gauge!("monitor_gateway_tenant_actors").set(self.running.len() as f64);
        Ok(actor)
    }
}

fn overlapping(now: u32) -> u32 {
    now.saturating_sub(REFRESH_OVERLAP.as_secs() as u32)
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
        self.ask(instance, |reply| TenantMsg::Onboard(project, reply))
            .await
    }

    /// The project for one query, ready and within the instance's rate limit, with the
    /// instance's places at Cube.
    pub async fn admit_query(
        &self,
        instance: &InstanceId,
        project: ProjectId,
    ) -> Result<(ProjectRecord, QueryShare), TenantError> {
        self.ask(instance, |reply| TenantMsg::AdmitQuery(project, reply))
            .await
    }

    /// The project if it is ready: what queries and collection need.
    pub async fn ready_project(
        &self,
        instance: &InstanceId,
        project: ProjectId,
    ) -> Result<ProjectRecord, TenantError> {
        self.ask(instance, |reply| TenantMsg::ReadyProject(project, reply))
            .await
    }

    pub async fn project(
        &self,
        instance: &InstanceId,
        project: ProjectId,
    ) -> Result<ProjectRecord, TenantError> {
        self.ask(instance, |reply| TenantMsg::Project(project, reply))
            .await
    }

    pub async fn projects(&self, instance: &InstanceId) -> Result<Vec<ProjectRecord>, TenantError> {
        self.ask(instance, TenantMsg::Projects).await
    }

    pub async fn deprovision(
        &self,
        instance: &InstanceId,
        project: ProjectId,
    ) -> Result<ProjectRecord, TenantError> {
        self.ask(instance, |reply| TenantMsg::Deprovision(project, reply))
            .await
    }

    /// Finishes a half-done onboarding unless a later change got there first; false when there
    /// was nothing left to finish.
    pub async fn finish_onboarding(
        &self,
        instance: &InstanceId,
        project: ProjectId,
    ) -> Result<bool, TenantError> {
        self.ask(instance, |reply| TenantMsg::Finish(project, reply))
            .await
    }

    pub async fn adopt(&self, owner: &Owner) -> Result<bool, TenantError> {
        self.ask(&owner.instance, |reply| {
            TenantMsg::Adopt(owner.clone(), reply)
        })
        .await
    }

    pub async fn purge(
        &self,
        instance: &InstanceId,
        project: ProjectId,
        cutoff: u32,
    ) -> Result<bool, TenantError> {
        self.ask(instance, |reply| TenantMsg::Purge(project, cutoff, reply))
            .await
    }

    pub async fn usage(
        &self,
        instance: &InstanceId,
        project: ProjectId,
        year: u16,
        month: u8,
    ) -> Result<u64, TenantError> {
        self.ask(instance, |reply| {
            TenantMsg::Usage(project, year, month, reply)
        })
        .await
    }

    /// Sends to the instance's actor. An actor that stopped (idle) between the lookup and the
    /// message is started again and asked once more; every message is safe to repeat.
    async fn ask<T: Send + 'static>(
        &self,
        instance: &InstanceId,
        message: impl Fn(RpcReplyPort<Result<T, TenantError>>) -> TenantMsg,
    ) -> Result<T, TenantError> {
        let mut attempts = 2;
        loop {
            attempts -= 1;
            let tenant = self.tenant(instance).await?;
            match self.call(&tenant, &message).await {
                Err(TenantError::Unavailable) if attempts > 0 => continue,
                outcome => return outcome,
            }
        }
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
        match actor.call(message, Some(self.timeout)).await {
            Ok(CallResult::Success(result)) => result,
            Ok(CallResult::Timeout) => Err(TenantError::Timeout),
            Ok(CallResult::SenderError) | Err(_) => Err(TenantError::Unavailable),
        }
    }
}
