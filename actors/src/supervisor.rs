//! The supervision tree. The root supervises the key-set supervisor, the tenants supervisor, the
//! query dispatcher and the housekeeper; each restarts its failed children with backoff, and
//! gives up (stopping itself, so the failure climbs the tree) when they fail too often in a short
//! window.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{error, warn};

use crate::auth::{IssuerActor, IssuerArgs, IssuerKeys};
use crate::housekeeper::{HOUSEKEEPER, Housekeeper, HousekeeperArgs, Reconciled};
use crate::query::{QUERY_DISPATCHER, spawn_dispatcher};
use crate::registry::Registry;
use crate::settings::{AuthSettings, CubeSettings, TenantSettings};
use crate::signer::Signer;
use crate::tenants::{TENANTS_SUPERVISOR, Tenants, TenantsArgs, TenantsSupervisor};

const ROOT: &str = "root";
const KEYS_SUPERVISOR: &str = "keys";

/// Restarts allowed within a window before a supervisor gives up.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    pub window: Duration,
    pub base_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(100),
        }
    }
}

/// Recent restarts of one supervisor's children.
struct RestartBudget {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
        }
    }

    /// The backoff before the next restart, or `None` when the budget is spent (meltdown).
    fn next_backoff(&mut self) -> Option<Duration> {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|at| now.duration_since(*at) > self.policy.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.policy.max_restarts {
            return None;
        }
        self.recent.push_back(now);
        let exponent = u32::try_from(self.recent.len() - 1)
            .unwrap_or(u32::MAX)
            .min(10);
        Some(self.policy.base_backoff * 2u32.pow(exponent))
    }
}

// ---- key-set supervisor ----------------------------------------------------------------------

pub struct KeysSupervisor;

pub struct KeysArgs {
    pub auth: AuthSettings,
    pub issuers: Vec<Arc<IssuerKeys>>,
    pub policy: RestartPolicy,
}

pub struct KeysState {
    args: KeysArgs,
    budget: RestartBudget,
}

impl KeysState {
    async fn spawn_issuer(
        &self,
        myself: &ActorRef<()>,
        keys: &Arc<IssuerKeys>,
    ) -> Result<(), ActorProcessingErr> {
        let settings = self
            .args
            .auth
            .issuers
            .iter()
            .find(|issuer| issuer.name == keys.name)
            .cloned()
            .ok_or("issuer settings vanished")?;
        let args = IssuerArgs {
            keys: keys.clone(),
            settings,
            refresh: self.args.auth.key_refresh.clone(),
        };
        Actor::spawn_linked(
            Some(keys.actor_name()),
            IssuerActor,
            args,
            myself.get_cell(),
        )
        .await?;
        Ok(())
    }
}

impl Actor for KeysSupervisor {
    type Msg = ();
    type State = KeysState;
    type Arguments = KeysArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        args: KeysArgs,
    ) -> Result<KeysState, ActorProcessingErr> {
        let state = KeysState {
            budget: RestartBudget::new(args.policy),
            args,
        };
        for keys in &state.args.issuers {
            state.spawn_issuer(&myself, keys).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut KeysState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(cell) = failed_child(&event) else {
            return Ok(());
        };
        let name = cell.get_name().unwrap_or_default();
        let Some(keys) = state
            .args
            .issuers
            .iter()
            .find(|keys| keys.actor_name() == name)
            .cloned()
        else {
            return Ok(());
        };
        metrics::counter!("monitor_gateway_actor_failures_total", "actor" => "issuer").increment(1);
        restart_after_backoff(&mut state.budget, &name).await?;
        state.spawn_issuer(&myself, &keys).await
    }
}

// ---- root ------------------------------------------------------------------------------------

pub struct RootSupervisor;

pub struct RootArgs {
    pub auth: AuthSettings,
    pub cube: CubeSettings,
    pub tenants: TenantSettings,
    pub issuers: Vec<Arc<IssuerKeys>>,
    pub registry: Arc<Registry>,
    pub signer: Arc<Signer>,
    pub policy: RestartPolicy,
    /// Set by the housekeeper when a reconciliation has finished.
    pub reconciled: Reconciled,
}

pub struct RootState {
    args: RootArgs,
    budget: RestartBudget,
}

impl RootState {
    async fn spawn(&self, myself: &ActorRef<()>, child: &str) -> Result<(), ActorProcessingErr> {
        let supervisor = myself.get_cell();
        match child {
            KEYS_SUPERVISOR => {
                let args = KeysArgs {
                    auth: self.args.auth.clone(),
                    issuers: self.args.issuers.clone(),
                    policy: self.args.policy,
                };
                Actor::spawn_linked(
                    Some(KEYS_SUPERVISOR.into()),
                    KeysSupervisor,
                    args,
                    supervisor,
                )
                .await?;
            }
            TENANTS_SUPERVISOR => {
                let args = TenantsArgs {
                    registry: self.args.registry.clone(),
                    settings: self.args.tenants.clone(),
                };
                Actor::spawn_linked(
                    Some(TENANTS_SUPERVISOR.into()),
                    TenantsSupervisor,
                    args,
                    supervisor,
                )
                .await?;
            }
            HOUSEKEEPER => {
                let args = HousekeeperArgs {
                    registry: self.args.registry.clone(),
                    reconciled: self.args.reconciled.clone(),
                    tenants: Tenants::new(Duration::from_secs(
                        self.args.tenants.call_timeout_seconds,
                    )),
                    settings: self.args.tenants.clone(),
                };
                Actor::spawn_linked(Some(HOUSEKEEPER.into()), Housekeeper, args, supervisor)
                    .await?;
            }
            QUERY_DISPATCHER => {
                spawn_dispatcher(&self.args.cube, self.args.signer.clone(), supervisor).await?;
            }
            other => return Err(format!("unknown child {other}").into()),
        }
        Ok(())
    }
}

impl Actor for RootSupervisor {
    type Msg = ();
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        args: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let state = RootState {
            budget: RestartBudget::new(args.policy),
            args,
        };
        for child in [
            KEYS_SUPERVISOR,
            TENANTS_SUPERVISOR,
            QUERY_DISPATCHER,
            HOUSEKEEPER,
        ] {
            state.spawn(&myself, child).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(cell) = failed_child(&event) else {
            return Ok(());
        };
        let name = cell.get_name().unwrap_or_default();
        metrics::counter!("monitor_gateway_actor_failures_total", "actor" => name.clone())
            .increment(1);
        restart_after_backoff(&mut state.budget, &name).await?;
        state.spawn(&myself, &name).await
    }
}

/// A child that failed, or stopped although nobody asked it to.
fn failed_child(event: &SupervisionEvent) -> Option<&ActorCell> {
    match event {
        SupervisionEvent::ActorFailed(cell, error) => {
            warn!(actor = ?cell.get_name(), %error, "supervised actor failed");
            Some(cell)
        }
        SupervisionEvent::ActorTerminated(cell, _, reason) => {
            warn!(actor = ?cell.get_name(), ?reason, "supervised actor stopped");
            Some(cell)
        }
        _ => None,
    }
}

async fn restart_after_backoff(
    budget: &mut RestartBudget,
    name: &str,
) -> Result<(), ActorProcessingErr> {
    let Some(backoff) = budget.next_backoff() else {
        error!(actor = name, "restarted too often; giving up");
        return Err(format!("{name} failed too often (meltdown)").into());
    };
    tokio::time::sleep(backoff).await;
    Ok(())
}

/// Starts the tree; the returned handle ends when the root stops.
pub async fn start(
    args: RootArgs,
) -> Result<(ActorRef<()>, tokio::task::JoinHandle<()>), ActorProcessingErr> {
    let (root, handle) = Actor::spawn(Some(ROOT.into()), RootSupervisor, args).await?;
    Ok((root, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_backs_off_then_melts_down() {
        let policy = RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(10),
        };
        let mut budget = RestartBudget::new(policy);
        assert_eq!(budget.next_backoff(), Some(Duration::from_millis(10)));
        assert_eq!(budget.next_backoff(), Some(Duration::from_millis(20)));
        assert_eq!(budget.next_backoff(), Some(Duration::from_millis(40)));
        assert_eq!(budget.next_backoff(), None);
    }
}
