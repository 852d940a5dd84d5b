//! The housekeeper: finishes onboardings that a crash left half-done, reports tenant databases
//! the registry does not account for (never dropping them), and purges deprovisioned projects
//! once their grace period is over. It works through the tenant actors, so it never races a
//! request for the same project.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use tracing::{info, warn};

use crate::registry::{ProjectStatus, Registry, RegistryError};
use crate::settings::TenantSettings;
use crate::tenancy::TenantKey;
use crate::tenants::Tenants;

pub const HOUSEKEEPER: &str = "housekeeper";

/// Pause before retrying a start-up reconciliation that could not reach ClickHouse.
const RECONCILE_RETRY: Duration = Duration::from_secs(5);
const RECONCILE_RETRY_MAX: Duration = Duration::from_secs(300);
/// How long an unregistered database marked as a project's must stay unregistered before it is
/// adopted: another gateway alive and onboarding it writes its row well within this.
const ADOPT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Clone, Serialize)]
pub struct ReconcileReport {
    /// Tenant keys of onboardings found half-done and finished.
    pub completed: Vec<String>,
    /// Tenant keys of half-done onboardings that could not be finished now.
    pub failed: Vec<String>,
    /// Tenant databases on the server with no project in the registry; kept, for an operator.
    pub unregistered_databases: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PurgeReport {
    /// Tenant keys whose databases were dropped.
    pub purged: Vec<String>,
    pub failed: Vec<String>,
}

pub enum HousekeeperMsg {
    Reconcile(Option<RpcReplyPort<Result<ReconcileReport, String>>>),
    /// The start-up reconciliation, and its retries while it fails or leaves failures; the
    /// count of attempts so far.
    StartUp(u32),
    Purge(Option<RpcReplyPort<Result<PurgeReport, String>>>),
}

pub struct Housekeeper;

/// Set once a reconciliation has run to its end since the gateway started, so readiness can
/// wait for the start-up pass: until then a project whose registry row a crash took is not
/// adopted yet.
#[derive(Clone, Default)]
pub struct Reconciled(Arc<AtomicBool>);

impl Reconciled {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

pub struct HousekeeperArgs {
    pub registry: Arc<Registry>,
    pub reconciled: Reconciled,
    pub tenants: Tenants,
    pub settings: TenantSettings,
}

impl Actor for Housekeeper {
    type Msg = HousekeeperMsg;
    type State = HousekeeperArgs;
    type Arguments = HousekeeperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HousekeeperMsg>,
        args: HousekeeperArgs,
    ) -> Result<HousekeeperArgs, ActorProcessingErr> {
        myself.send_message(HousekeeperMsg::StartUp(0))?;
        let interval = Duration::from_secs(args.settings.purge_interval_seconds.max(1));
        myself.send_interval(interval, || HousekeeperMsg::Purge(None));
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<HousekeeperMsg>,
        message: HousekeeperMsg,
        state: &mut HousekeeperArgs,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            HousekeeperMsg::Reconcile(reply) => {
                let report = state.reconcile().await.map_err(|err| err.to_string());
                if let Some(reply) = reply {
                    let _ = reply.send(report);
                }
            }
            HousekeeperMsg::StartUp(attempts) => match state.reconcile().await {
                // Readiness waits for a pass that reached ClickHouse, and then stops waiting:
                // what that pass could not finish is retried, less and less often.
                Ok(report) => {
                    state.reconciled.set();
                    if !report.failed.is_empty() {
                        let delay = RECONCILE_RETRY
                            .saturating_mul(2u32.saturating_pow(attempts))
                            .min(RECONCILE_RETRY_MAX);
                        warn!(failed = report.failed.len(), retry_in = ?delay,
                            "start-up reconciliation left projects it could not finish");
                        myself.send_after(delay, move || HousekeeperMsg::StartUp(attempts + 1));
                    }
                }
                // ClickHouse is away (readiness says so too): try again soon, so that the
                // adoptions are done shortly after it is back.
                Err(err) => {
                    warn!(error = %err, "start-up reconciliation failed; retrying");
                    myself.send_after(RECONCILE_RETRY, move || HousekeeperMsg::StartUp(attempts));
                }
            },
            HousekeeperMsg::Purge(reply) => {
                let report = state.purge().await.map_err(|err| err.to_string());
                if let Err(err) = &report {
                    warn!(error = %err, "purge failed; it runs again at the next interval");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(report);
                }
            }
        }
        Ok(())
    }
}

impl HousekeeperArgs {
    async fn reconcile(&self) -> Result<ReconcileReport, RegistryError> {
        // At start this may run before the serving task has created the registry; both are
        // idempotent, and it spares a warning about a table that is about to exist.
        self.registry.ensure_schema().await?;
        let mut report = ReconcileReport::default();
        for project in self
            .registry
            .projects_in(ProjectStatus::Provisioning)
            .await?
        {
            let key = project.tenant_key.to_string();
            match self
                .tenants
                .finish_onboarding(&project.instance, project.project)
                .await
            {
                Ok(true) => report.completed.push(key),
                // Finished, deleted or purged since the registry was read.
                Ok(false) => {}
                Err(err) => {
                    warn!(tenant_key = %key, error = %err, "cannot finish a half-done onboarding");
                    report.failed.push(key);
                }
            }
        }

        // Databases first: a project onboarded between the two reads is then registered by the
        // time the registry is read, instead of looking unregistered.
        let databases = self.registry.tenant_databases().await?;
        let registered = self.registered_databases().await?;
        let mut unregistered: Vec<String> = databases
            .into_iter()
            .filter(|database| !registered.contains(database))
            .collect();
        // A database marked as a project's lost its registry row to a crash after the answer,
        // unless the row is still on its way: this gateway's tenant knows its own, and another
        // gateway's lands within ADOPT_AFTER. What is still unlisted then is adopted.
        let marked = if unregistered.is_empty() {
            Vec::new()
        } else {
            self.registry.owners_of(&unregistered).await?
        };
        if !marked.is_empty() {
            tokio::time::sleep(ADOPT_AFTER).await;
            let registered = self.registered_databases().await?;
            for (database, owner) in marked {
                unregistered.retain(|other| *other != database);
                if registered.contains(&database) {
                    continue;
                }
                let key = TenantKey::derive(&owner.instance, owner.project).to_string();
                match self.tenants.adopt(&owner).await {
                    Ok(true) => report.completed.push(key),
                    Ok(false) => {}
                    Err(err) => {
                        warn!(tenant_key = %key, error = %err, "cannot adopt a project's database");
                        report.failed.push(key);
                    }
                }
            }
        }
        report.unregistered_databases = unregistered;

        if !report.unregistered_databases.is_empty() {
            warn!(databases = ?report.unregistered_databases,
                "tenant databases without a registry entry; kept for an operator to review");
        }
        metrics::gauge!("monitor_gateway_unregistered_databases")
            .set(report.unregistered_databases.len() as f64);
        info!(
            completed = report.completed.len(),
            failed = report.failed.len(),
            unregistered = report.unregistered_databases.len(),
            "reconciliation done"
        );
        Ok(report)
    }

    /// The names of the databases of every project the registry lists (purged ones aside).
    async fn registered_databases(&self) -> Result<HashSet<String>, RegistryError> {
        let keys = self.registry.registered_tenant_keys().await?;
        Ok(keys
            .into_iter()
            .map(|key| format!("gitlab_project_{key}"))
            .collect())
    }

    async fn purge(&self) -> Result<PurgeReport, RegistryError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cutoff =
            u32::try_from(now.saturating_sub(self.settings.deprovision_grace_seconds)).unwrap_or(0);
        let mut report = PurgeReport::default();
        for project in self
            .registry
            .projects_in(ProjectStatus::Deprovisioned)
            .await?
        {
            if project.deprovisioned_at > cutoff {
                continue;
            }
            let key = project.tenant_key.to_string();
            match self
                .tenants
                .purge(&project.instance, project.project, cutoff)
                .await
            {
                Ok(true) => report.purged.push(key),
                Ok(false) => {}
                Err(err) => {
                    warn!(tenant_key = %key, error = %err, "cannot purge a deprovisioned project");
                    report.failed.push(key);
                }
            }
        }
        Ok(report)
    }
}

/// How the admin listener asks for a reconciliation or a purge now.
#[derive(Clone)]
pub struct Housekeeping {
    timeout: Duration,
}

impl Housekeeping {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    pub async fn reconcile(&self) -> Result<ReconcileReport, String> {
        self.ask(|reply| HousekeeperMsg::Reconcile(Some(reply)))
            .await
    }

    pub async fn purge(&self) -> Result<PurgeReport, String> {
        self.ask(|reply| HousekeeperMsg::Purge(Some(reply))).await
    }

    async fn ask<T: Send + 'static>(
        &self,
        message: impl FnOnce(RpcReplyPort<Result<T, String>>) -> HousekeeperMsg,
    ) -> Result<T, String> {
        let actor: ActorRef<HousekeeperMsg> = ractor::registry::where_is(HOUSEKEEPER)
            .ok_or("the housekeeper is not running")?
            .into();
        match actor.call(message, Some(self.timeout)).await {
            Ok(CallResult::Success(result)) => result,
            Ok(CallResult::Timeout) => Err("the housekeeper did not finish in time".to_owned()),
            _ => Err("the housekeeper is unavailable".to_owned()),
        }
    }
}
