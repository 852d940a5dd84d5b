//! `monitor-gateway serve`: builds the supervision tree and the two listeners, and shuts down
//! cleanly on SIGTERM or Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use actors::auth::{Authenticator, IssuerKeys, parse_algorithms};
use actors::housekeeper::{Housekeeping, Reconciled};
use actors::query::Queries;
use actors::registry::Registry;
use actors::signer::Signer;
use actors::supervisor::{self, RestartPolicy, RootArgs};
use actors::tenants::Tenants;
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::http::{self, AppState, Readiness};
use crate::telemetry;

/// Pause between attempts to create the registry schema while ClickHouse is not reachable.
const SCHEMA_RETRY: Duration = Duration::from_secs(2);
/// How often the registry schema is checked (and recreated if ClickHouse lost it).
const SCHEMA_CHECK: Duration = Duration::from_secs(30);

pub fn run(settings: Settings) -> anyhow::Result<()> {
    telemetry::init_logs(&settings.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(settings))
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let prometheus = telemetry::init_metrics()?;
    let signer = Arc::new(
        Signer::load(&settings.signing, &settings.cube)
            .context("loading the gateway signing key")?,
    );
    let registry = Arc::new(Registry::new(&settings.clickhouse));
    tokio::spawn(keep_schema(registry.clone()));

    let issuers = settings
        .auth
        .issuers
        .iter()
        .map(|issuer| {
            let algorithms = parse_algorithms(&issuer.algorithms).map_err(anyhow::Error::msg)?;
            Ok(Arc::new(IssuerKeys::new(
                issuer.name.clone(),
                issuer.issuer.clone(),
                algorithms,
            )))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let auth = Arc::new(Authenticator::new(settings.auth.clone(), issuers.clone()));

    let reconciled = Reconciled::default();
    let (root, mut root_stopped) = supervisor::start(RootArgs {
        auth: settings.auth.clone(),
        cube: settings.cube.clone(),
        tenants: settings.tenants.clone(),
        issuers,
        registry: registry.clone(),
        signer: signer.clone(),
        policy: RestartPolicy::default(),
        reconciled: reconciled.clone(),
    })
    .await
    .map_err(|err| anyhow::anyhow!("starting the actors: {err}"))?;

    let state = AppState {
        auth: auth.clone(),
        tenants: Tenants::new(Duration::from_secs(settings.tenants.call_timeout_seconds)),
        queries: Queries::new(&settings.cube),
        signer,
        public_url: settings.server.public_url.clone().into(),
        max_body_bytes: settings.server.max_body_bytes,
        max_result_wait: Duration::from_secs(settings.cube.timeout_seconds),
    };
    let readiness = Readiness::new(auth, registry.clone(), reconciled, &settings.cube.url);
    let request_timeout = Duration::from_secs(settings.server.request_timeout_seconds);
    let housekeeping = Housekeeping::new(request_timeout);

    let public = bind(settings.listen(), "public").await?;
    let admin = bind(settings.admin_listen(), "admin").await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let public_server = tokio::spawn(serve_until(
        public,
        http::public_router(state, request_timeout),
        shutdown_rx.clone(),
    ));
    let admin_server = tokio::spawn(serve_until(
        admin,
        http::admin_router(readiness, housekeeping, prometheus, request_timeout),
        shutdown_rx,
    ));

    let outcome = tokio::select! {
        () = shutdown_signal() => {
            info!("shutdown requested");
            Ok(())
        }
        _ = &mut root_stopped => {
            error!("the root supervisor stopped; shutting down");
            Err(anyhow::anyhow!("the actor system stopped after repeated failures"))
        }
    };

    let _ = shutdown_tx.send(true);
    let grace = Duration::from_secs(settings.server.shutdown_grace_seconds);
    if tokio::time::timeout(grace, async {
        let _ = public_server.await;
        let _ = admin_server.await;
    })
    .await
    .is_err()
    {
        warn!(
            ?grace,
            "in-flight requests did not finish within the shutdown grace period"
        );
    }
    // Rows written behind an answer are stored before the process ends; any that are not
    // leave their projects `provisioning`, which the next start's reconciliation finishes.
    match tokio::time::timeout(grace, registry.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => warn!(error = %err, "the last registry writes failed"),
        Err(_) => warn!(?grace, "the last registry writes did not finish in time"),
    }
    root.stop(Some("shutdown".to_owned()));
    info!("stopped");
    outcome
}

async fn bind(addr: std::net::SocketAddr, which: &'static str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {which} listener to {addr}"))?;
    let bound = listener.local_addr()?;
    info!(listener = which, addr = %bound, "listening");
    Ok(listener)
}

async fn serve_until(
    listener: TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let stopped = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(err) = axum::serve(listener, router)
        .with_graceful_shutdown(stopped)
        .await
    {
        error!(error = %err, "listener failed");
    }
}

/// Creates the registry schema, retrying until ClickHouse answers, then checks it now and then
/// so a server that came back empty gets it again. Readiness reports while it is missing.
async fn keep_schema(registry: Arc<Registry>) {
    let mut created = false;
    loop {
        match registry.ensure_schema().await {
            Ok(()) if !created => {
                created = true;
                info!("registry schema ready");
            }
            Ok(()) => {}
            Err(err) => warn!(error = %err, "cannot create the registry schema; retrying"),
        }
        tokio::time::sleep(if created { SCHEMA_CHECK } else { SCHEMA_RETRY }).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
