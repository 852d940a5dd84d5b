//! An issuer's key set: the signing keys published in its JWKS, indexed by `kid`.
//!
//! Only RSA keys meant for signatures, with an algorithm the issuer is configured for, are kept;
//! everything else in the document is skipped so it can never verify a token.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Instant;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// A key usable for verification, with the one algorithm it verifies.
#[derive(Clone)]
pub struct VerifyingKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
    pub fetched_at: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("the document is not a JWKS: {0}")]
    NotJwks(String),
    #[error("the JWKS holds no usable RSA signing key ({skipped} skipped)")]
    NoUsableKeys { skipped: usize },
}

/// The RSA algorithms an issuer may be configured with; HMAC and `none` can never be.
pub fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
    names
        .iter()
        .map(|name| match Algorithm::from_str(name) {
            Ok(alg @ (Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)) => Ok(alg),
            Ok(alg @ (Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512)) => Ok(alg),
            _ => Err(format!(
                "algorithm {name:?} is not an accepted RSA signature algorithm"
            )),
        })
        .collect()
}

impl KeySet {
    /// Parses a JWKS document, keeping the keys usable with `allowed` algorithms.
    pub fn from_jwks(body: &[u8], allowed: &[Algorithm]) -> Result<Self, KeySetError> {
        let set: JwkSet =
            serde_json::from_slice(body).map_err(|err| KeySetError::NotJwks(err.to_string()))?;

        let total = set.keys.len();
        let keys: HashMap<String, VerifyingKey> = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                if jwk.common.public_key_use != Some(PublicKeyUse::Signature) {
                    return None;
                }
                let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
                    return None;
                };
                let algorithm = match jwk.common.key_algorithm {
                    Some(alg) => Algorithm::from_str(&alg.to_string()).ok()?,
                    None => *allowed.first()?,
                };
                if !allowed.contains(&algorithm) {
                    return None;
                }
                let key = DecodingKey::from_rsa_components(&rsa.n, &rsa.e).ok()?;
                Some((kid, VerifyingKey { algorithm, key }))
            })
            .collect();

        if keys.is_empty() {
            return Err(KeySetError::NoUsableKeys { skipped: total });
        }
        Ok(Self {
            keys,
            fetched_at: Instant::now(),
        })
    }

    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";

    fn jwks(key: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": [key] })).unwrap()
    }

    #[test]
    fn keeps_rsa_signing_keys_with_allowed_algorithms() {
        let body = jwks(
            serde_json::json!({"kty": "RSA", "kid": "a", "use": "sig", "alg": "RS256", "n": N, "e": "AQAB"}),
        );
        let set = KeySet::from_jwks(&body, &[Algorithm::RS256]).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.get("a").unwrap().algorithm, Algorithm::RS256);
    }

    #[test]
    fn skips_encryption_keys_disallowed_algorithms_and_symmetric_keys() {
        for key in [
            serde_json::json!({"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RS256", "n": N, "e": "AQAB"}),
            serde_json::json!({"kty": "RSA", "kid": "nouse", "alg": "RS256", "n": N, "e": "AQAB"}),
            serde_json::json!({"kty": "RSA", "kid": "rs512", "use": "sig", "alg": "RS512", "n": N, "e": "AQAB"}),
            serde_json::json!({"kty": "oct", "kid": "hmac", "use": "sig", "alg": "HS256", "k": "c2VjcmV0"}),
            serde_json::json!({"kty": "RSA", "use": "sig", "alg": "RS256", "n": N, "e": "AQAB"}),
        ] {
            let result = KeySet::from_jwks(&jwks(key.clone()), &[Algorithm::RS256]);
            assert!(
                matches!(result, Err(KeySetError::NoUsableKeys { skipped: 1 })),
                "{key}"
            );
        }
    }

    #[test]
    fn refuses_documents_that_are_not_jwks() {
        for body in [&b"not json"[..], b"{}", b"{\"keys\": 3}", b""] {
            assert!(matches!(
                KeySet::from_jwks(body, &[Algorithm::RS256]),
                Err(KeySetError::NotJwks(_))
            ));
        }
        assert!(matches!(
            KeySet::from_jwks(b"{\"keys\": []}", &[Algorithm::RS256]),
            Err(KeySetError::NoUsableKeys { skipped: 0 })
        ));
    }

    #[test]
    fn hmac_and_none_cannot_be_configured() {
        assert!(parse_algorithms(&["RS256".into(), "PS256".into()]).is_ok());
        for bad in ["HS256", "none", "ES256", "EdDSA", ""] {
            assert!(parse_algorithms(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
