//! Developer helpers: a local token issuer (key pair, JWKS, tokens) standing in for CustomersDot,
//! so the whole flow can be tried on one machine. Nothing here runs in `serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use actors::registry::ProjectRecord;
use actors::signer::{Signer, generate_key, public_jwk, read_key, rsa_pkcs1_der, write_key};
use actors::tenancy::{InstanceId, ProjectId};
use anyhow::Context;
use axum::Router;
use axum::routing::get;
use clap::Subcommand;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const KEY_FILE: &str = "issuer-key.pem";
const JWKS_FILE: &str = "jwks.json";
const DEFAULT_ISSUER: &str = "http://127.0.0.1:8081";

#[derive(Subcommand)]
pub enum DevCommand {
    /// Create a local issuer key pair and its JWKS in a folder (kept if it already exists).
    IssuerInit {
        /// Folder for issuer-key.pem and jwks.json.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve the local issuer's JWKS at /oauth/discovery/keys, with an OIDC discovery document.
    IssuerServe {
        /// The issuer's folder (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Where to listen; keep it on loopback.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// The issuer URL announced in the discovery document.
        #[arg(long, default_value = DEFAULT_ISSUER)]
        issuer: String,
    },
    /// Print the security-context token the gateway would send Cube for a project, signed with
    /// the configured signing key: for calling Cube directly while debugging or benchmarking.
    ContextToken {
        #[arg(long)]
        instance_id: String,
        #[arg(long)]
        project_id: String,
    },
    /// Print a Cloud Connector token for an instance, signed by the local issuer; with several
    /// --instance-id, one token per line in the same order.
    Token {
        /// The issuer's folder, made by issuer-init.
        #[arg(long)]
        dir: PathBuf,
        /// The instance UUID the token is for (sub and gitlab_instance_uid); repeatable.
        #[arg(long = "instance-id", required = true)]
        instance_ids: Vec<String>,
        /// The `iss` claim; must match the gateway's configured issuer.
        #[arg(long, default_value = DEFAULT_ISSUER)]
        issuer: String,
        /// The `aud` claim.
        #[arg(long, default_value = "gitlab-monitor-gateway")]
        audience: String,
        /// Scopes (unit primitives) to grant; repeat for several.
        #[arg(long = "scope", default_values = ["product_analytics"])]
        scopes: Vec<String>,
        /// The `gitlab_realm` claim.
        #[arg(long, default_value = "self-managed")]
        realm: String,
        /// Lifetime of the token.
        #[arg(long, default_value_t = 3 * 24 * 3600)]
        ttl_seconds: u64,
    },
}

pub fn run(command: DevCommand, config: Option<&Path>) -> anyhow::Result<()> {
    match command {
        DevCommand::ContextToken {
            instance_id,
            project_id,
        } => {
            let settings = crate::config::Settings::load(config)?;
            let signer = Signer::load(&settings.signing, &settings.cube)?;
            let instance = InstanceId::parse(&instance_id)?;
            let project = ProjectId::parse(&project_id)?;
            let token = signer.security_context_token(&ProjectRecord::new(instance, project))?;
            println!("{token}");
            Ok(())
        }
        DevCommand::IssuerInit { dir } => {
            let created = init_issuer(&dir)?;
            let verb = if created { "created" } else { "kept existing" };
            eprintln!("{verb} local issuer in {}", dir.display());
            Ok(())
        }
        DevCommand::IssuerServe {
            dir,
            listen,
            issuer,
        } => serve_issuer(&dir, listen, issuer),
        DevCommand::Token {
            dir,
            instance_ids,
            issuer,
            audience,
            scopes,
            realm,
            ttl_seconds,
        } => {
            let key = read_key(&dir.join(KEY_FILE))
                .context("run `monitor-gateway dev issuer-init` first")?;
            let kid = public_jwk(&key).common.key_id;
            let signing = EncodingKey::from_rsa_der(&rsa_pkcs1_der(&key)?);
            let mut header = Header::new(Algorithm::RS256);
            header.kid = kid;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for instance_id in instance_ids {
                let claims = json!({
                    "iss": issuer,
                    "aud": audience,
                    "sub": instance_id,
                    "gitlab_instance_uid": instance_id,
                    "gitlab_realm": realm,
                    "scopes": scopes,
                    "iat": now,
                    "nbf": now,
                    "exp": now + ttl_seconds,
                    "jti": uuid::Uuid::new_v4().to_string(),
                });
                writeln!(out, "{}", jsonwebtoken::encode(&header, &claims, &signing)?)?;
            }
            Ok(())
        }
    }
}

/// Creates the key and JWKS unless the key exists; returns whether it created them.
fn init_issuer(dir: &Path) -> anyhow::Result<bool> {
    let key_path = dir.join(KEY_FILE);
    let (key, created) = if key_path.exists() {
        (read_key(&key_path)?, false)
    } else {
        let key = generate_key()?;
        write_key(&key_path, &key)?;
        (key, true)
    };
    let jwks = serde_json::to_vec_pretty(&JwkSet {
        keys: vec![public_jwk(&key)],
    })?;
    std::fs::write(dir.join(JWKS_FILE), jwks)?;
    Ok(created)
}

fn serve_issuer(dir: &Path, listen: SocketAddr, issuer: String) -> anyhow::Result<()> {
    init_issuer(dir)?;
    let jwks = std::fs::read(dir.join(JWKS_FILE))?;
    let discovery = serde_json::to_vec(&json!({
        "issuer": issuer,
        "jwks_uri": format!("http://{listen}/oauth/discovery/keys"),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))?;
    let json = |body: Vec<u8>| {
        move || std::future::ready(([("content-type", "application/json")], body.clone()))
    };
    let router = Router::new()
        .route("/oauth/discovery/keys", get(json(jwks)))
        .route("/.well-known/openid-configuration", get(json(discovery)));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        eprintln!("local issuer {issuer}: JWKS at http://{listen}/oauth/discovery/keys");
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
