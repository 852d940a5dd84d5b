//! Property tests of the token-validation entry point: arbitrary and mutated input never
//! panics and never authenticates.

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;

use super::*;
use crate::settings::{IssuerSettings, KeyRefreshSettings};

const ISSUER: &str = "https://issuer.test";
const INSTANCE: &str = "8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7e";

struct Fixture {
    auth: Authenticator,
    valid: String,
}

/// An authenticator holding one real key, and a token that key signed.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let public = private.to_public_key();
        let jwks = serde_json::json!({ "keys": [{
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": "k1",
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        }]});
        let keys = Arc::new(IssuerKeys::new(
            "test".into(),
            ISSUER.into(),
            vec![Algorithm::RS256],
        ));
        keys.publish(KeySet::from_jwks(jwks.to_string().as_bytes(), &[Algorithm::RS256]).unwrap());

        let settings = AuthSettings {
            audience: "gitlab-monitor-gateway".into(),
            scope: "product_analytics".into(),
            leeway_seconds: 60,
            max_token_bytes: 8192,
            token_cache_capacity: 100,
            issuers: vec![IssuerSettings {
                name: "test".into(),
                issuer: ISSUER.into(),
                jwks_url: Some("http://127.0.0.1:9/keys".into()),
                discovery_url: None,
                algorithms: vec!["RS256".into()],
            }],
            key_refresh: KeyRefreshSettings {
                interval_seconds: 3600,
                jitter: 0.0,
                unknown_kid_min_interval_seconds: 10,
                retry_seconds: 5,
                fetch_timeout_seconds: 1,
                fetch_retries: 0,
            },
        };
        let now = unix_now();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": "gitlab-monitor-gateway", "sub": INSTANCE,
            "scopes": ["product_analytics"], "iat": now, "nbf": now, "exp": now + 600,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("k1".into());
        let key = EncodingKey::from_rsa_der(private.to_pkcs1_der().unwrap().as_bytes());
        let valid = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        Fixture {
            auth: Authenticator::new(settings, vec![keys]),
            valid,
        }
    })
}

fn authenticate(authorization: &str, instance: &str) -> Result<Identity, AuthError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let credentials = Credentials {
        authorization: Some(authorization),
        instance_id: Some(instance),
        realm: None,
        authentication_type: None,
    };
    runtime.block_on(fixture().auth.authenticate(&credentials))
}

#[test]
fn the_fixture_token_is_accepted() {
    let identity = authenticate(&format!("Bearer {}", fixture().valid), INSTANCE).unwrap();
    assert_eq!(identity.instance.as_str(), INSTANCE);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_authorization_values_never_panic_or_pass(value in ".{0,300}") {
        prop_assert!(authenticate(&value, INSTANCE).is_err());
    }

    #[test]
    fn arbitrary_segments_never_panic_or_pass(
        parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..5),
        encode in any::<bool>(),
    ) {
        let segments: Vec<String> = parts
            .iter()
            .map(|bytes| if encode { URL_SAFE_NO_PAD.encode(bytes) } else { String::from_utf8_lossy(bytes).into_owned() })
            .collect();
        let token = format!("Bearer {}", segments.join("."));
        prop_assert!(authenticate(&token, INSTANCE).is_err());
    }

    #[test]
    fn any_single_byte_change_to_a_valid_token_is_refused(position in 0usize..2000, byte in any::<u8>()) {
        let mut token = fixture().valid.clone().into_bytes();
        let position = position % token.len();
        prop_assume!(token[position] != byte);
        token[position] = byte;
        let token = String::from_utf8_lossy(&token).into_owned();
        let outcome = authenticate(&format!("Bearer {token}"), INSTANCE);
        // Changes to base64 padding bits can leave the decoded bytes intact.
        if let Ok(identity) = outcome {
            prop_assert_eq!(identity.instance.as_str(), INSTANCE);
            let decoded_same = token.split('.').zip(fixture().valid.split('.')).all(|(a, b)| {
                URL_SAFE_NO_PAD.decode(a).ok() == URL_SAFE_NO_PAD.decode(b).ok()
            });
            prop_assert!(decoded_same, "a changed token was accepted: {token}");
        }
    }
}
