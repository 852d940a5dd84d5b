//! The API's error responses: `{"error": {"code", "message"}}` with the status each code implies.

use actors::ErrorCode;
use actors::auth::AuthError;
use actors::query::QueryError;
use actors::tenant::TenantError;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Seconds a client is told to wait before retrying after a transient failure.
const RETRY_AFTER_SECONDS: u64 = 5;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status = default_status(code);
        // A quota frees only when the instance deprovisions a project: waiting would not help.
        let transient = code != ErrorCode::QuotaExceeded
            && matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::GATEWAY_TIMEOUT
            );
        let retry_after = transient.then_some(RETRY_AFTER_SECONDS);
        Self {
            status,
            code,
            message: message.into(),
            retry_after,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    }

    pub fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "no such endpoint")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            ErrorCode::MethodNotAllowed,
            "this endpoint does not accept that method",
        )
    }
}

pub fn default_status(code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match code {
        MissingToken
        | MalformedToken
        | UnknownIssuer
        | UnknownKey
        | InvalidSignature
        | TokenExpired
        | TokenNotYetValid
        | WrongAudience
        | InstanceMismatch
        | RealmMismatch
        | UnsupportedAuthenticationType => StatusCode::UNAUTHORIZED,
        MissingScope => StatusCode::FORBIDDEN,
        KeysUnavailable | Overloaded | UpstreamUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        InvalidProjectId | InvalidRequest | InvalidQuery => StatusCode::BAD_REQUEST,
        ProjectNotOnboarded | NotFound => StatusCode::NOT_FOUND,
        MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        QuotaExceeded | RateLimited => StatusCode::TOO_MANY_REQUESTS,
        UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code.as_str(), "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                self.code
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        Self::new(err.code, err.message)
    }
}

impl From<TenantError> for ApiError {
    fn from(err: TenantError) -> Self {
        let mut error = Self::new(err.code(), err.to_string());
        if let TenantError::RateLimited(seconds) = err {
            error.retry_after = Some(seconds);
        }
        error
    }
}

impl From<QueryError> for ApiError {
    fn from(err: QueryError) -> Self {
        let mut error = Self::new(err.code(), err.to_string());
        match err {
            // Cube itself failing is a bad gateway; the dispatcher being gone is ours (503).
            QueryError::Upstream(_) => error.with_status(StatusCode::BAD_GATEWAY),
            // A place comes free as soon as one of the instance's queries ends.
            QueryError::TooManyQueries(_) => {
                error.retry_after = Some(1);
                error
            }
            _ => error,
        }
    }
}
