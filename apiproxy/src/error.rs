//! The proxy's own errors. Each kind answers one HTTP status with one Kubernetes `Status` reason
//! (so kubectl prints it like the API server's own) and counts under one metrics label (so a
//! refusal can be told from an outage). Answers relayed from an upstream are not errors here.

use http::{Response, StatusCode};

use crate::{BoxError, ProxyBody, status};

/// Seconds a client is told to wait before asking a sleeping cluster again.
const RETRY_ASLEEP: &str = "5";
/// Seconds a client over a rate is told to wait.
const RETRY_THROTTLED: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Neither a valid client certificate nor a bearer token the virtual API server accepts.
    #[error("Unauthorized")]
    Unauthorized,
    /// RBAC, impersonation rules or the isolation policy say no.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A request body over what the proxy reads.
    #[error("{0}")]
    TooLarge(String),
    /// The host still has an object of that name (a deletion in progress).
    #[error("{0}")]
    AlreadyExists(String),
    /// The host API server rejected the object.
    #[error("{0}")]
    Invalid(String),
    /// Not servable yet, nothing failed (e.g. the host pod is still being created).
    #[error("{0}")]
    Unavailable(String),
    /// The cluster sleeps and this request does not wake it (a watch, a service account), or
    /// it did not wake in time: answered with `Retry-After`.
    #[error("{0}")]
    Asleep(String),
    /// Over a rate the proxy keeps (reviews of unknown tokens): 429 with `Retry-After`, which
    /// clients honour by asking again.
    #[error("{0}")]
    Throttled(String),
    /// The control plane tried and failed (e.g. a restore of etcd's data): 500.
    #[error("{0}")]
    Failed(String),
    /// An API server could not be reached or did not answer a call the proxy needs: retrying
    /// may help, refusing (403) would be wrong.
    #[error("{context}: {source}")]
    Upstream {
        context: String,
        #[source]
        source: BoxError,
    },
}

impl ProxyError {
    pub fn upstream(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        ProxyError::Upstream { context: context.into(), source: source.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::AlreadyExists(_) => StatusCode::CONFLICT,
            ProxyError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ProxyError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Unavailable(_) | ProxyError::Asleep(_) | ProxyError::Upstream { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The Kubernetes `Status` reason (`metav1.StatusReason`).
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "Unauthorized",
            ProxyError::Forbidden(_) => "Forbidden",
            ProxyError::BadRequest(_) => "BadRequest",
            ProxyError::NotFound(_) => "NotFound",
            ProxyError::TooLarge(_) => "RequestEntityTooLarge",
            ProxyError::AlreadyExists(_) => "AlreadyExists",
            ProxyError::Invalid(_) => "Invalid",
            ProxyError::Failed(_) => "InternalError",
            ProxyError::Throttled(_) => "TooManyRequests",
            ProxyError::Unavailable(_) | ProxyError::Asleep(_) | ProxyError::Upstream { .. } => "ServiceUnavailable",
        }
    }

    /// The `kind` label of `vkube_proxy_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NotFound(_) => "not_found",
            ProxyError::TooLarge(_) => "too_large",
            ProxyError::AlreadyExists(_) => "already_exists",
            ProxyError::Invalid(_) => "invalid",
            ProxyError::Failed(_) => "failed",
            ProxyError::Throttled(_) => "throttled",
            ProxyError::Unavailable(_) => "unavailable",
            ProxyError::Asleep(_) => "asleep",
            ProxyError::Upstream { .. } => "upstream",
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = status::status(self.status(), self.reason(), &self.to_string());
        let retry_after = match self {
            ProxyError::Asleep(_) => Some(RETRY_ASLEEP),
            ProxyError::Throttled(_) => Some(RETRY_THROTTLED),
            _ => None,
        };
        if let Some(after) = retry_after {
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static(after));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn all() -> Vec<ProxyError> {
        vec![
            ProxyError::Unauthorized,
            ProxyError::Forbidden("f".into()),
            ProxyError::BadRequest("b".into()),
            ProxyError::NotFound("n".into()),
            ProxyError::TooLarge("t".into()),
            ProxyError::AlreadyExists("a".into()),
            ProxyError::Invalid("i".into()),
            ProxyError::Failed("x".into()),
            ProxyError::Throttled("t".into()),
            ProxyError::Unavailable("u".into()),
            ProxyError::Asleep("s".into()),
            ProxyError::upstream("reaching x", "connection refused"),
        ]
    }

    #[test]
    fn each_kind_has_its_own_label() {
        let mut kinds: Vec<_> = all().iter().map(ProxyError::kind).collect();
        let n = kinds.len();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), n);
    }

    #[test]
    fn asleep_says_when_to_retry() {
        let resp = ProxyError::Asleep("zzz".into()).into_response();
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], RETRY_ASLEEP);
        // client-go asks again on a 429 with Retry-After.
        let resp = ProxyError::Throttled("t".into()).into_response();
        assert_eq!(
            (resp.status(), &resp.headers()[http::header::RETRY_AFTER]),
            (StatusCode::TOO_MANY_REQUESTS, &http::HeaderValue::from_static("1"))
        );
        assert!(!ProxyError::Unavailable("u".into()).into_response().headers().contains_key(http::header::RETRY_AFTER));
    }

    #[test]
    fn failures_to_reach_an_upstream_are_503_not_403() {
        let e = ProxyError::upstream("checking authorization", "connection refused");
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.reason(), "ServiceUnavailable");
        assert_eq!(e.to_string(), "checking authorization: connection refused");
    }

    #[tokio::test]
    async fn responses_are_kubernetes_status_objects() {
        for e in all() {
            let (code, reason, message) = (e.status(), e.reason(), e.to_string());
            let resp = e.into_response();
            assert_eq!(resp.status(), code);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["kind"], "Status");
            assert_eq!(v["status"], "Failure");
            assert_eq!(v["reason"], reason);
            assert_eq!(v["message"], message);
            assert_eq!(v["code"], code.as_u16());
        }
    }
}
