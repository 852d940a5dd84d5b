//! A local token issuer over real HTTP: real RSA keys, a JWKS endpoint that tests can rotate,
//! take down, empty or break, and a count of the requests it served.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

#[derive(Clone)]
pub struct IssuerKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub jwk: Value,
    /// The public modulus, for forging HMAC tokens keyed with public material.
    pub public_modulus: Vec<u8>,
}

impl IssuerKey {
    pub fn generate() -> Self {
        let private = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let public = private.to_public_key();
        let n = URL_SAFE_NO_PAD.encode(public.n().to_bytes_be());
        let e = URL_SAFE_NO_PAD.encode(public.e().to_bytes_be());
        let kid = uuid::Uuid::new_v4().to_string();
        let jwk = json!({ "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": n, "e": e });
        let encoding = EncodingKey::from_rsa_der(private.to_pkcs1_der().unwrap().as_bytes());
        Self {
            kid,
            encoding,
            jwk,
            public_modulus: public.n().to_bytes_be(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssuerMode {
    Serving,
    /// Answers 503 to everything.
    Down,
    /// A valid JWKS with no keys.
    Empty,
    /// Not JSON at all.
    Garbage,
}

struct Shared {
    host: String,
    published: Vec<IssuerKey>,
    signing: IssuerKey,
    mode: IssuerMode,
}

pub struct Issuer {
    pub issuer: String,
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    requests: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct AppState {
    shared: Arc<Mutex<Shared>>,
    requests: Arc<AtomicUsize>,
}

impl Issuer {
    pub async fn start() -> Self {
        Self::start_with_mode(IssuerMode::Serving).await
    }

    pub async fn start_with_mode(mode: IssuerMode) -> Self {
        let key = IssuerKey::generate();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared {
            host: addr.to_string(),
            published: vec![key.clone()],
            signing: key,
            mode,
        }));
        let requests = Arc::new(AtomicUsize::new(0));
        let router = Router::new()
            .route("/oauth/discovery/keys", get(jwks))
            .route("/.well-known/openid-configuration", get(discovery))
            .with_state(AppState {
                shared: shared.clone(),
                requests: requests.clone(),
            });
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            issuer: format!("http://{addr}"),
            addr,
            shared,
            requests,
        }
    }

    pub fn jwks_url(&self) -> String {
        format!("http://{}/oauth/discovery/keys", self.addr)
    }

    pub fn discovery_url(&self) -> String {
        format!("http://{}/.well-known/openid-configuration", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn set_mode(&self, mode: IssuerMode) {
        self.shared.lock().unwrap().mode = mode;
    }

    /// Publishes a new key beside the old ones and signs with it from now on.
    pub fn rotate(&self) -> IssuerKey {
        let key = IssuerKey::generate();
        let mut shared = self.shared.lock().unwrap();
        shared.published.push(key.clone());
        shared.signing = key.clone();
        key
    }

    pub fn signing_key(&self) -> IssuerKey {
        self.shared.lock().unwrap().signing.clone()
    }

    /// The claims of a valid token for an instance.
    pub fn claims(&self, instance: &str) -> Value {
        let now = now();
        json!({
            "iss": self.issuer,
            "aud": "gitlab-monitor-gateway",
            "sub": instance,
            "gitlab_realm": "self-managed",
            "scopes": ["product_analytics"],
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    pub fn token(&self, instance: &str) -> String {
        self.sign(&self.claims(instance))
    }

    pub fn sign(&self, claims: &Value) -> String {
        sign_with(&self.signing_key(), claims)
    }
}

pub fn sign_with(key: &IssuerKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn discovery(State(state): State<AppState>) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let host = state.shared.lock().unwrap().host.clone();
    axum::Json(json!({ "issuer": format!("http://{host}"), "jwks_uri": format!("http://{host}/oauth/discovery/keys") }))
        .into_response()
}

async fn jwks(State(state): State<AppState>) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let shared = state.shared.lock().unwrap();
    match shared.mode {
        IssuerMode::Serving => {
            let keys: Vec<Value> = shared.published.iter().map(|key| key.jwk.clone()).collect();
            axum::Json(json!({ "keys": keys })).into_response()
        }
        IssuerMode::Down => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        IssuerMode::Empty => axum::Json(json!({ "keys": [] })).into_response(),
        IssuerMode::Garbage => "<html>not a key set</html>".into_response(),
    }
}
