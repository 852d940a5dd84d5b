//! The stable, machine-readable error codes of the API. The HTTP edge maps each to a status.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    MissingToken,
    MalformedToken,
    UnknownIssuer,
    UnknownKey,
    InvalidSignature,
    TokenExpired,
    TokenNotYetValid,
    WrongAudience,
    InstanceMismatch,
    RealmMismatch,
    UnsupportedAuthenticationType,
    MissingScope,
    KeysUnavailable,
    InvalidProjectId,
    InvalidRequest,
    ProjectNotOnboarded,
    QuotaExceeded,
    RateLimited,
    Overloaded,
    UpstreamUnavailable,
    UpstreamTimeout,
    InvalidQuery,
    PayloadTooLarge,
    NotFound,
    MethodNotAllowed,
    Internal,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::MalformedToken => "malformed_token",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey => "unknown_key",
            Self::InvalidSignature => "invalid_signature",
            Self::TokenExpired => "token_expired",
            Self::TokenNotYetValid => "token_not_yet_valid",
            Self::WrongAudience => "wrong_audience",
            Self::InstanceMismatch => "instance_mismatch",
            Self::RealmMismatch => "realm_mismatch",
            Self::UnsupportedAuthenticationType => "unsupported_authentication_type",
            Self::MissingScope => "missing_scope",
            Self::KeysUnavailable => "keys_unavailable",
            Self::InvalidProjectId => "invalid_project_id",
            Self::InvalidRequest => "invalid_request",
            Self::ProjectNotOnboarded => "project_not_onboarded",
            Self::QuotaExceeded => "quota_exceeded",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::InvalidQuery => "invalid_query",
            Self::PayloadTooLarge => "payload_too_large",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
