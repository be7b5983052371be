//! Who a request comes from: a client certificate of the virtual cluster's CA, or a bearer token
//! the virtual API server accepts (TokenReview, briefly cached). Nothing else gets in.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::error::ProxyError;
use crate::tls::ClientCerts;

/// An authenticated user, as the virtual API server should see it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Identity {
    pub user: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Identity {
    /// The identity a client certificate asserts: CN is the user, O the groups.
    pub fn from_cert(der: &CertificateDer<'_>) -> Option<Identity> {
        let info = vkube_pki::CertInfo::from_der(der).ok()?;
        if info.common_name.is_empty() {
            return None;
        }
        let mut groups = info.organizations;
        groups.push("system:authenticated".into());
        Some(Identity { user: info.common_name, groups, ..Default::default() })
    }
}

const POSITIVE_TTL: Duration = Duration::from_secs(10);
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
const CACHE_LIMIT: usize = 4096;

type TokenHash = [u8; 32];
/// When the answer expires, and the answer (`None`: not authenticated).
type CachedReview = (Instant, Option<Identity>);

/// Authenticates requests for one virtual cluster.
pub struct Authenticator {
    certs: ClientCerts,
    /// Privileged client of the virtual API server (TokenReview, SubjectAccessReview).
    admin: kube::Client,
    tokens: Mutex<HashMap<TokenHash, CachedReview>>,
}

impl Authenticator {
    pub fn new(certs: ClientCerts, admin: kube::Client) -> Self {
        Authenticator { certs, admin, tokens: Mutex::new(HashMap::new()) }
    }

    /// Whether a client certificate chain (end entity first) is valid for this cluster.
    pub fn verify_chain(&self, chain: &[CertificateDer<'_>]) -> bool {
        self.certs.verify(chain)
    }

    /// The identity behind a bearer token, or `None` (answer 401).
    pub async fn authenticate_token(&self, headers: &HeaderMap) -> Option<Identity> {
        let token = bearer_token(headers)?;
        self.review_token(token).await
    }

    async fn review_token(&self, token: &str) -> Option<Identity> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((expires, id)) = self.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            && *expires > now
        {
            return id.clone();
        }
        let review =
            TokenReview { spec: TokenReviewSpec { token: token.to_string(), audiences: None }, ..Default::default() };
        let api: Api<TokenReview> = Api::all(self.admin.clone());
        let identity = match api.create(&PostParams::default(), &review).await {
            Ok(r) => r.status.filter(|s| s.authenticated == Some(true)).and_then(|s| s.user).map(|u| Identity {
                user: u.username.unwrap_or_default(),
                uid: u.uid,
                groups: u.groups.unwrap_or_default(),
                extra: u.extra.unwrap_or_default(),
            }),
            Err(e) => {
                // Not cached: a transient failure must not lock a valid token out.
                tracing::warn!(error = %e, "TokenReview failed");
                return None;
            }
        };
        let ttl = if identity.is_some() { POSITIVE_TTL } else { NEGATIVE_TTL };
        let mut cache = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, (expires, _)| *expires > now);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(key, (now + ttl, identity.clone()));
        identity
    }

    /// The identity a request acts as: the authenticated one, or the one it impersonates
    /// (`Impersonate-*` headers, i.e. `kubectl --as`) if RBAC lets it: `Forbidden` if not,
    /// `Upstream` if the virtual API server could not be asked.
    pub async fn effective(&self, id: &Identity, headers: &HeaderMap) -> Result<Identity, ProxyError> {
        let Some(user) = header_str(headers, "impersonate-user") else {
            if headers.contains_key("impersonate-group") {
                // kube-apiserver answers 500 (InternalError) here; 403 is kept: it is the client's
                // mistake, not a server fault, and what the proxy has always answered.
                return Err(ProxyError::Forbidden("requested impersonation of groups without a user".into()));
            }
            return Ok(id.clone());
        };
        let groups: Vec<String> =
            headers.get_all("impersonate-group").iter().filter_map(|v| v.to_str().ok().map(str::to_string)).collect();
        let uid = header_str(headers, "impersonate-uid");
        let (resource, name) = match user.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) {
            Some((ns, sa)) => ("serviceaccounts", (sa.to_string(), Some(ns.to_string()))),
            None => ("users", (user.clone(), None)),
        };
        let mut checks = vec![("", resource, name.0, name.1)];
        checks.extend(groups.iter().map(|g| ("", "groups", g.clone(), None)));
        if let Some(uid) = &uid {
            checks.push(("authentication.k8s.io", "uids", uid.clone(), None));
        }
        for (group, resource, name, namespace) in checks {
            let attrs = ResourceAttributes {
                verb: Some("impersonate".into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                name: Some(name.clone()),
                namespace,
                ..Default::default()
            };
            if !self.allowed(id, attrs).await? {
                return Err(ProxyError::Forbidden(format!(
                    "{resource} \"{name}\" is forbidden: User \"{}\" cannot impersonate resource \"{resource}\" in API group \"{group}\" at the cluster scope",
                    id.user
                )));
            }
        }
        let mut groups = groups;
        if !groups.iter().any(|g| g == "system:authenticated") && user != "system:anonymous" {
            groups.push("system:authenticated".into());
        }
        Ok(Identity { user, uid, groups, extra: BTreeMap::new() })
    }

    /// Asks the virtual API server whether `id` may do `attrs`. A review that fails (unreachable,
    /// timeout, an error answer) is `Upstream`, never a "no": the user may well be allowed.
    pub async fn allowed(&self, id: &Identity, attrs: ResourceAttributes) -> Result<bool, ProxyError> {
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(id.user.clone()),
                uid: id.uid.clone(),
                groups: Some(id.groups.clone()),
                extra: (!id.extra.is_empty()).then(|| id.extra.clone()),
                resource_attributes: Some(attrs),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.admin.clone());
        let review = api.create(&PostParams::default(), &sar).await.map_err(|e| {
            ProxyError::upstream(
                "the virtual API server could not be asked whether this is allowed (SubjectAccessReview); \
                 try again in a moment, and check that the virtual API server is running if this persists",
                e,
            )
        })?;
        Ok(review.status.is_some_and(|s| s.allowed))
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert("authorization", "bearer  abc ".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
        h.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn certificates_name_user_and_groups() {
        let mut b = vkube_pki::Bundle::default();
        b.ensure(
            &vkube_pki::BundleSpec {
                cas: vec![("ca".into(), "ca".into())],
                leaves: vec![vkube_pki::LeafSpec::client("u", "ca", "alice", Some("dev"))],
                key_pairs: vec![],
            },
            Default::default(),
            time_now(),
        )
        .unwrap();
        let der = crate::tls::certs_from_pem(b.get("u.crt").unwrap()).unwrap();
        let id = Identity::from_cert(&der[0]).unwrap();
        assert_eq!(id.user, "alice");
        assert_eq!(id.groups, vec!["dev", "system:authenticated"]);
    }

    fn time_now() -> vkube_pki::OffsetDateTime {
        vkube_pki::OffsetDateTime::now_utc()
    }
}
