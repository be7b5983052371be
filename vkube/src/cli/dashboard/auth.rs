//! Who may see the dashboard. Never an open page:
//! - `vkube dashboard` (on the admin's machine, with the admin's host kubeconfig): a random key
//!   made at start and printed in the URL; the first visit trades it for a cookie.
//! - `vkube platform --dashboard-listen` (host-wide): the viewer's own host credentials, a
//!   bearer token in `Authorization` or from the login form (kept in a cookie), reviewed by the
//!   host API server (TokenReview) and allowed only if that user may list Services in every
//!   namespace (SubjectAccessReview): what the page shows.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

pub const KEY_COOKIE: &str = "vkube_dashboard_key";
pub const TOKEN_COOKIE: &str = "vkube_dashboard_token";
/// How long a host review's answer is reused for the same token.
const REVIEWED_FOR: Duration = Duration::from_secs(60);

pub enum Auth {
    Key(String),
    Host { client: kube::Client, reviewed: Mutex<HashMap<[u8; 32], (Instant, Decision)>> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, as this user.
    Allowed(String),
    /// No credentials, or ones the host does not know.
    Unauthenticated,
    /// Known, but may not list Services everywhere.
    Forbidden(String),
    /// The host could not be asked.
    Unavailable(String),
}

/// A cookie's value from a `Cookie` header.
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').filter_map(|c| c.trim().split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// A fresh key: 32 hex digits from the OS's random source.
pub fn new_key() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without stopping at the first difference (the key is a secret).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn host(client: kube::Client) -> Auth {
        Auth::Host { client, reviewed: Mutex::new(HashMap::new()) }
    }

    /// The decision for a request with these credentials: a key from the URL or cookie, or a
    /// bearer token from the header or cookie.
    pub async fn decide(&self, key: Option<&str>, bearer: Option<&str>) -> Decision {
        match self {
            Auth::Key(expected) => match key {
                Some(k) if same(k, expected) => Decision::Allowed("the admin".into()),
                _ => Decision::Unauthenticated,
            },
            Auth::Host { client, reviewed } => {
                let Some(token) = bearer.filter(|t| !t.is_empty()) else { return Decision::Unauthenticated };
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                if let Some((at, d)) = reviewed.lock().unwrap_or_else(|e| e.into_inner()).get(&digest)
                    && at.elapsed() < REVIEWED_FOR
                {
                    return d.clone();
                }
                let d = review(client, token).await;
                if !matches!(d, Decision::Unavailable(_)) {
                    let mut cache = reviewed.lock().unwrap_or_else(|e| e.into_inner());
                    cache.retain(|_, (at, _)| at.elapsed() < REVIEWED_FOR);
                    cache.insert(digest, (Instant::now(), d.clone()));
                }
                d
            }
        }
    }
}

async fn review(client: &kube::Client, token: &str) -> Decision {
    let tr = TokenReview { spec: TokenReviewSpec { token: token.into(), ..Default::default() }, ..Default::default() };
    let reviewed = match Api::<TokenReview>::all(client.clone()).create(&PostParams::default(), &tr).await {
        Ok(r) => r,
        Err(e) => return Decision::Unavailable(format!("reviewing the token with the host: {e}")),
    };
    let status = reviewed.status.unwrap_or_default();
    let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
        return Decision::Unauthenticated;
    };
    let name = user.username.clone().unwrap_or_default();
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            groups: user.groups,
            uid: user.uid,
            extra: user.extra,
            resource_attributes: Some(ResourceAttributes {
                verb: Some("list".into()),
                resource: Some("services".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<SubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &sar).await {
        Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => Decision::Allowed(name),
        Ok(_) => Decision::Forbidden(name),
        Err(e) => Decision::Unavailable(format!("asking the host what {name} may do: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_keys() {
        let h = Some("a=1; vkube_dashboard_key=abc ;b=2");
        assert_eq!(cookie(h, KEY_COOKIE), Some("abc"));
        assert_eq!(cookie(h, "b"), Some("2"));
        assert_eq!(cookie(h, "c"), None);
        assert_eq!(cookie(None, "a"), None);
        let k = new_key().unwrap();
        assert_eq!(k.len(), 32);
        assert_ne!(k, new_key().unwrap());
        assert!(same(&k, &k.clone()) && !same(&k, "x") && !same(&k, &k[1..]));
    }

    #[tokio::test]
    async fn a_key_is_needed_and_must_match() {
        let auth = Auth::Key("secret".into());
        assert_eq!(auth.decide(None, None).await, Decision::Unauthenticated);
        assert_eq!(auth.decide(Some("secreT"), None).await, Decision::Unauthenticated);
        assert_eq!(auth.decide(None, Some("secret")).await, Decision::Unauthenticated, "a bearer is not the key");
        assert!(matches!(auth.decide(Some("secret"), None).await, Decision::Allowed(_)));
    }
}
