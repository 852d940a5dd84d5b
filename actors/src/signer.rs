//! The gateway's own signing key: it signs the short-lived tokens that carry a tenant's security
//! context to Cube, and its public half is published as a JWKS that Cube trusts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
    RSAKeyParameters, RSAKeyType,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use moka::sync::Cache;
use rsa::RsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};

use rsa::traits::PublicKeyParts;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::registry::ProjectRecord;
use crate::settings::{CubeSettings, SigningSettings};

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("cannot read signing key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write signing key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("signing key {path} is not a PKCS#8 PEM RSA private key: {reason}")]
    Parse { path: String, reason: String },
    #[error("signing key {path} does not exist and create_if_missing is false")]
    Missing { path: String },
    #[error("cannot generate an RSA key: {0}")]
    Generate(String),
    #[error("cannot sign a token: {0}")]
    Sign(String),
}

/// The claims Cube receives as its security context.
#[derive(Debug, Serialize)]
struct SecurityContext<'a> {
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    sub: &'a str,
    database: &'a str,
    instance_id: &'a str,
    project_id: u64,
}

pub struct Signer {
    kid: String,
    key: EncodingKey,
    jwks: bytes::Bytes,
    issuer: String,
    audience: String,
    ttl: Duration,
    /// Signed tokens per tenant key, reused for half their lifetime: RSA signing is costly.
    tokens: Cache<String, Arc<str>>,
}

impl Signer {
    pub fn load(signing: &SigningSettings, cube: &CubeSettings) -> Result<Self, SignerError> {
        let private = load_or_create(Path::new(&signing.key_file), signing.create_if_missing)?;
        Self::from_key(&private, cube)
    }

    pub fn from_key(private: &RsaPrivateKey, cube: &CubeSettings) -> Result<Self, SignerError> {
        let key = EncodingKey::from_rsa_der(&rsa_pkcs1_der(private)?);

        let jwk = public_jwk(private);
        let kid = jwk
            .common
            .key_id
            .clone()
            .expect("public_jwk always sets a kid");
        let jwks =
            serde_json::to_vec(&JwkSet { keys: vec![jwk] }).expect("a JWKS always serialises");

        let ttl = Duration::from_secs(cube.token_ttl_seconds.max(2));
        Ok(Self {
            kid,
            key,
            jwks: jwks.into(),
            issuer: cube.token_issuer.clone(),
            audience: cube.token_audience.clone(),
            ttl,
            tokens: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl / 2)
                .build(),
        })
    }

    /// The public JWKS document, as served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> bytes::Bytes {
        self.jwks.clone()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A token naming exactly this project's database, valid for the configured lifetime.
    pub fn security_context_token(&self, project: &ProjectRecord) -> Result<Arc<str>, SignerError> {
        if let Some(token) = self.tokens.get(project.tenant_key.as_str()) {
            return Ok(token);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let database = project.tenant_key.database();
        let claims = SecurityContext {
            iss: &self.issuer,
            aud: &self.audience,
            iat: now,
            exp: now + self.ttl.as_secs(),
            sub: project.tenant_key.as_str(),
            database: &database,
            instance_id: project.instance.as_str(),
            project_id: project.project.get(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        let token: Arc<str> = encode(&header, &claims, &self.key)
            .map_err(|err| SignerError::Sign(err.to_string()))?
            .into();
        self.tokens
            .insert(project.tenant_key.as_str().to_owned(), token.clone());
        Ok(token)
    }
}

/// Generates a 2048-bit RSA key; used for the gateway key and by local developer tools.
pub fn generate_key() -> Result<RsaPrivateKey, SignerError> {
    RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)
        .map_err(|err| SignerError::Generate(err.to_string()))
}

/// Writes a key as PKCS#8 PEM, readable by its owner only.
pub fn write_key(path: &Path, key: &RsaPrivateKey) -> Result<(), SignerError> {
    let write = |source| SignerError::Write {
        path: path.display().to_string(),
        source,
    };
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|err| SignerError::Generate(err.to_string()))?;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let partial = path.with_extension("partial");
    std::fs::write(&partial, pem.as_bytes()).map_err(write)?;
    restrict_permissions(&partial).map_err(write)?;
    std::fs::rename(&partial, path).map_err(write)
}

pub fn read_key(path: &Path) -> Result<RsaPrivateKey, SignerError> {
    let display = path.display().to_string();
    let pem = std::fs::read_to_string(path).map_err(|source| SignerError::Read {
        path: display.clone(),
        source,
    })?;
    RsaPrivateKey::from_pkcs8_pem(&pem).map_err(|err| SignerError::Parse {
        path: display,
        reason: err.to_string(),
    })
}

fn load_or_create(path: &Path, create_if_missing: bool) -> Result<RsaPrivateKey, SignerError> {
    if path.exists() {
        return read_key(path);
    }
    if !create_if_missing {
        return Err(SignerError::Missing {
            path: path.display().to_string(),
        });
    }
    let key = generate_key()?;
    write_key(path, &key)?;
    tracing::info!(path = %path.display(), "generated a new gateway signing key");
    Ok(key)
}

/// The PKCS#1 DER form that `jsonwebtoken` expects for RSA private keys.
pub fn rsa_pkcs1_der(key: &RsaPrivateKey) -> Result<Vec<u8>, SignerError> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    key.to_pkcs1_der()
        .map(|der| der.as_bytes().to_vec())
        .map_err(|err| SignerError::Generate(err.to_string()))
}

/// The public half of a key as a JWK for RS256 signatures, with its RFC 7638 thumbprint as
/// `kid`, so a key's id follows from the key itself.
pub fn public_jwk(private: &RsaPrivateKey) -> Jwk {
    let public = private.to_public_key();
    let n = URL_SAFE_NO_PAD.encode(public.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(public.e().to_bytes_be());
    let common = CommonParameters {
        public_key_use: Some(PublicKeyUse::Signature),
        key_algorithm: Some(KeyAlgorithm::RS256),
        key_id: Some(thumbprint(&n, &e)),
        ..Default::default()
    };
    let algorithm = AlgorithmParameters::RSA(RSAKeyParameters {
        key_type: RSAKeyType::RSA,
        n,
        e,
    });
    Jwk { common, algorithm }
}

fn thumbprint(n: &str, e: &str) -> String {
    let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) -> std::io::Result<()> {
    Ok(())
}
