//! Tenancy: the calling instance, the project it names, and the tenant key that binds them.
//!
//! The tenant key is the only thing a database name is ever built from, so no request text
//! can reach a SQL identifier.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A GitLab instance, identified by its UUID in lower-case hyphenated form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("instance id must be a UUID in 8-4-4-4-12 hexadecimal form")]
pub struct InvalidInstanceId;

impl InstanceId {
    /// Accepts only the hyphenated 36-character form, in any case, and lower-cases it.
    pub fn parse(text: &str) -> Result<Self, InvalidInstanceId> {
        let hyphenated = text.len() == 36
            && text.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        if !hyphenated {
            return Err(InvalidInstanceId);
        }
        Ok(Self(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A project of an instance: a positive 64-bit integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProjectId(u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("project id must be a positive 64-bit integer in canonical decimal form")]
pub struct InvalidProjectId;

impl ProjectId {
    /// Accepts canonical decimal only: digits, no sign, no leading zero, within `1..=u64::MAX`.
    pub fn parse(text: &str) -> Result<Self, InvalidProjectId> {
        let canonical = !text.is_empty()
            && text.len() <= 20
            && text.bytes().all(|b| b.is_ascii_digit())
            && !text.starts_with('0');
        if !canonical {
            return Err(InvalidProjectId);
        }
        text.parse::<u64>().map(Self).map_err(|_| InvalidProjectId)
    }

    pub fn new(value: u64) -> Result<Self, InvalidProjectId> {
        if value == 0 {
            return Err(InvalidProjectId);
        }
        Ok(Self(value))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The first 32 hex characters of SHA-256 over `"{instance_id}:{project_id}"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantKey(String);

impl TenantKey {
    pub fn derive(instance: &InstanceId, project: ProjectId) -> Self {
        let digest = Sha256::digest(format!("{instance}:{project}").as_bytes());
        Self(hex::encode(&digest[..16]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ClickHouse database holding this tenant's events.
    pub fn database(&self) -> String {
        format!("gitlab_project_{}", self.0)
    }

    /// Rebuilds a key read back from the registry, refusing anything that is not 32 hex digits.
    pub fn from_stored(text: &str) -> Option<Self> {
        let valid =
            text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Self(text.to_owned()))
    }
}

impl fmt::Display for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(instance: &str, project: &str) -> String {
        let instance = InstanceId::parse(instance).unwrap();
        let project = ProjectId::parse(project).unwrap();
        TenantKey::derive(&instance, project).as_str().to_owned()
    }

    #[test]
    fn tenant_key_matches_the_design_test_vectors() {
        let vectors = [
            (
                "8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7e",
                "42",
                "c21e87af38b79189207557142398401b",
            ),
            (
                "8F6E4253-4B5E-4A6C-9D55-3B0B6A1D2C7E",
                "42",
                "c21e87af38b79189207557142398401b",
            ),
            (
                "00000000-0000-0000-0000-000000000001",
                "1",
                "52aff933662a757c970bbaaa17cae895",
            ),
            (
                "00000000-0000-0000-0000-000000000002",
                "1",
                "e00657e3c5348a56037c8fc382b0cd2d",
            ),
            (
                "8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7e",
                "18446744073709551615",
                "4a7ef9597aafc1a36236ac99a800e6aa",
            ),
        ];
        for (instance, project, expected) in vectors {
            assert_eq!(key(instance, project), expected, "{instance}:{project}");
        }
    }

    #[test]
    fn database_name_is_prefixed_tenant_key() {
        let instance = InstanceId::parse("00000000-0000-0000-0000-000000000001").unwrap();
        let key = TenantKey::derive(&instance, ProjectId::new(1).unwrap());
        assert_eq!(
            key.database(),
            "gitlab_project_52aff933662a757c970bbaaa17cae895"
        );
    }

    #[test]
    fn project_ids_must_be_canonical_positive_u64() {
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "01",
            "1.0",
            "abc",
            "18446744073709551616",
            " 1",
            "1e3",
        ] {
            assert_eq!(ProjectId::parse(bad), Err(InvalidProjectId), "{bad:?}");
        }
        assert_eq!(
            ProjectId::parse("18446744073709551615").unwrap().get(),
            u64::MAX
        );
        assert_eq!(ProjectId::parse("7").unwrap().get(), 7);
    }

    #[test]
    fn instance_ids_must_be_hyphenated_uuids() {
        for bad in [
            "",
            "8f6e42534b5e4a6c9d553b0b6a1d2c7e",
            "{8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7e}",
            "8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7g",
            "8f6e4253_4b5e_4a6c_9d55_3b0b6a1d2c7e",
        ] {
            assert_eq!(InstanceId::parse(bad), Err(InvalidInstanceId), "{bad:?}");
        }
        let upper = InstanceId::parse("8F6E4253-4B5E-4A6C-9D55-3B0B6A1D2C7E").unwrap();
        assert_eq!(upper.as_str(), "8f6e4253-4b5e-4a6c-9d55-3b0b6a1d2c7e");
    }

    #[test]
    fn stored_tenant_keys_are_validated() {
        assert!(TenantKey::from_stored("52aff933662a757c970bbaaa17cae895").is_some());
        assert!(TenantKey::from_stored("52AFF933662A757C970BBAAA17CAE895").is_none());
        assert!(TenantKey::from_stored("x; DROP DATABASE y").is_none());
    }
}
