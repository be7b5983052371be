//! Who a request comes from: a client certificate of the virtual cluster's CA, or a bearer token
//! the virtual API server accepts (TokenReview, briefly cached, positive and negative, in a bounded
//! cache; reviews of tokens never seen valid are rate limited). Nothing else gets in.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use moka::future::Cache;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
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

/// How long a review is believed: a revoked token works this much longer at most.
const POSITIVE_TTL: Duration = Duration::from_secs(10);
/// Short: a token that was just created must not stay refused for long.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Reviews kept at most (a few hundred bytes each); the least used go first.
const CACHE_CAPACITY: u64 = 10_000;
/// How long a token that was valid stays "known", i.e. re-reviewed without the rate limit.
const KNOWN_TTL: Duration = Duration::from_secs(3600);

type TokenHash = [u8; 32];

/// How many reviews of tokens never seen valid may be sent to the virtual API server: in all,
/// and for the requests of one client address (an IPv6 /64), so that a flood from one place
/// does not take every review a newly issued token needs (burst: twice the rate).
#[derive(Clone, Copy, Debug)]
pub struct ReviewLimit {
    pub per_second: u32,
    pub burst: u32,
    pub per_address_per_second: u32,
}

impl Default for ReviewLimit {
    fn default() -> Self {
        ReviewLimit { per_second: 20, burst: 40, per_address_per_second: 5 }
    }
}

/// The key of a client address for the per-address limit: IPv4 as it is, IPv6 by its /64 (one
/// host holds a whole /64, and could spread a flood over it).
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
        },
        v4 => v4,
    }
}

/// Each cached review lives as long as its kind of answer is believed.
struct ReviewExpiry;

impl moka::Expiry<TokenHash, Option<Identity>> for ReviewExpiry {
    fn expire_after_create(&self, _: &TokenHash, value: &Option<Identity>, _: std::time::Instant) -> Option<Duration> {
        Some(if value.is_some() { POSITIVE_TTL } else { NEGATIVE_TTL })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// authenticated | rejected | failed
    pub result: &'static str,
}

/// What the authenticator counts (registered by `Metrics`).
#[derive(Clone, Default)]
pub struct AuthMetrics {
    /// TokenReviews sent to the virtual API server, by outcome.
    pub reviews: Family<ReviewLabels, Counter>,
    /// Unknown tokens refused without a review (over `ReviewLimit`).
    pub limited: Counter,
}

/// Authenticates requests for one virtual cluster.
pub struct Authenticator {
    certs: ClientCerts,
    /// Privileged client of the virtual API server (TokenReview, SubjectAccessReview).
    admin: kube::Client,
    /// Reviews by token hash; concurrent requests with one token share one review.
    reviews: Cache<TokenHash, Option<Identity>>,
    /// Tokens recently valid, with their user: their re-reviews are not rate limited, so a flood
    /// of random tokens cannot lock out users already signed in; and a sleeping cluster can tell
    /// whose request it is without its API server (sleep mode).
    known: Cache<TokenHash, String>,
    unknown_reviews: UnknownReviews,
    metrics: AuthMetrics,
}

/// Why a review has no answer.
enum ReviewFailed {
    /// Not sent: over [`ReviewLimit`].
    Throttled,
    Upstream(kube::Error),
}

/// Which reviews of tokens never seen valid may be sent now ([`ReviewLimit`]).
struct UnknownReviews {
    all: DefaultDirectRateLimiter,
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    /// When addresses idle long enough to have a full bucket again were last forgotten.
    forgotten: std::sync::Mutex<std::time::Instant>,
}

impl UnknownReviews {
    fn new(limit: ReviewLimit) -> Self {
        let nonzero = |n: u32| NonZeroU32::new(n.max(1)).expect("at least 1");
        let quota = |rate: u32, burst: u32| Quota::per_second(nonzero(rate)).allow_burst(nonzero(burst));
        let per_address = limit.per_address_per_second;
        UnknownReviews {
            all: RateLimiter::direct(quota(limit.per_second, limit.burst)),
            by_address: RateLimiter::keyed(quota(per_address, per_address.saturating_mul(2))),
            forgotten: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// Whether one from `peer` may go: within its address's share, then within the limit for all
    /// (in that order: a flooding address's refusals must not spend the others' reviews).
    fn allow(&self, peer: IpAddr) -> bool {
        self.forget_idle();
        self.by_address.check_key(&address_key(peer)).is_ok() && self.all.check().is_ok()
    }

    /// At most once a second: the addresses whose bucket is full again are forgotten, so the
    /// map holds only those seen in the last few seconds.
    fn forget_idle(&self) {
        let mut last = self.forgotten.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= Duration::from_secs(1) {
            *last = std::time::Instant::now();
            self.by_address.retain_recent();
        }
    }
}

impl Authenticator {
    pub fn new(certs: ClientCerts, admin: kube::Client, limit: ReviewLimit, metrics: AuthMetrics) -> Self {
        Authenticator {
            certs,
            admin,
            reviews: Cache::builder().max_capacity(CACHE_CAPACITY).expire_after(ReviewExpiry).build(),
            known: Cache::builder().max_capacity(CACHE_CAPACITY).time_to_live(KNOWN_TTL).build(),
            unknown_reviews: UnknownReviews::new(limit),
            metrics,
        }
    }

    /// Whether a client certificate chain (end entity first) is valid for this cluster.
    pub fn verify_chain(&self, chain: &[CertificateDer<'_>]) -> bool {
        self.certs.verify(chain)
    }

    /// The identity behind a bearer token sent from `peer`: `Ok(None)` if there is none or it is
    /// not valid (401), `Err` if it could not be reviewed: over the limit of reviews of unknown
    /// tokens (429, `Retry-After`: it was not judged, so clients ask again) or the virtual API
    /// server failed (503: retrying may help).
    pub async fn authenticate_token(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Option<Identity>, ProxyError> {
        let Some(token) = bearer_token(headers) else { return Ok(None) };
        self.review_token(token, peer).await
    }

    /// The user of a bearer token seen valid in the last hour, without asking anyone.
    pub async fn known_user(&self, headers: &HeaderMap) -> Option<String> {
        let token = bearer_token(headers)?;
        let key: TokenHash = Sha256::digest(token.as_bytes()).into();
        self.known.get(&key).await
    }

    async fn review_token(&self, token: &str, peer: IpAddr) -> Result<Option<Identity>, ProxyError> {
        let key: TokenHash = Sha256::digest(token.as_bytes()).into();
        if let Some(answer) = self.reviews.get(&key).await {
            return Ok(answer);
        }
        // Limited per review sent, not per request: requests with one token share its review.
        // Neither a refusal nor a failure is cached: a valid token must not stay locked out.
        let review = async {
            if !self.known.contains_key(&key) && !self.unknown_reviews.allow(peer) {
                self.metrics.limited.inc();
                tracing::debug!(%peer, "too many unknown bearer tokens: not reviewed (429)");
                return Err(ReviewFailed::Throttled);
            }
            self.send_review(token).await.map_err(ReviewFailed::Upstream)
        };
        let identity = self.reviews.try_get_with(key, review).await.map_err(|e| match &*e {
            ReviewFailed::Throttled => {
                ProxyError::Throttled("too many bearer tokens to review at once; retry in a moment".into())
            }
            ReviewFailed::Upstream(e) => ProxyError::upstream(
                "the virtual API server could not review the bearer token (TokenReview); \
                 try again in a moment, and check that the virtual API server is running if this persists",
                e.to_string(),
            ),
        })?;
        match &identity {
            Some(id) => self.known.insert(key, id.user.clone()).await,
            // Revoked or expired: no longer known (nor able to wake a sleeping cluster).
            None => self.known.invalidate(&key).await,
        }
        Ok(identity)
    }

    async fn send_review(&self, token: &str) -> Result<Option<Identity>, kube::Error> {
        let review =
            TokenReview { spec: TokenReviewSpec { token: token.to_string(), audiences: None }, ..Default::default() };
        let api: Api<TokenReview> = Api::all(self.admin.clone());
        let result = api.create(&PostParams::default(), &review).await;
        let outcome = match &result {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.authenticated == Some(true)) => "authenticated",
            Ok(_) => "rejected",
            Err(e) => {
                tracing::warn!(error = %e, "TokenReview failed");
                "failed"
            }
        };
        self.metrics.reviews.get_or_create(&ReviewLabels { result: outcome }).inc();
        Ok(result?.status.filter(|s| s.authenticated == Some(true)).and_then(|s| s.user).map(|u| Identity {
            user: u.username.unwrap_or_default(),
            uid: u.uid,
            groups: u.groups.unwrap_or_default(),
            extra: u.extra.unwrap_or_default(),
        }))
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
        self.review(id, SubjectAccessReviewSpec { resource_attributes: Some(attrs), ..Default::default() }).await
    }

    /// Whether `id` may `verb` the non-resource URL `path` (as `allowed`).
    pub async fn allowed_path(&self, id: &Identity, path: &str, verb: &str) -> Result<bool, ProxyError> {
        let attrs = NonResourceAttributes { path: Some(path.into()), verb: Some(verb.into()) };
        self.review(id, SubjectAccessReviewSpec { non_resource_attributes: Some(attrs), ..Default::default() }).await
    }

    async fn review(&self, id: &Identity, what: SubjectAccessReviewSpec) -> Result<bool, ProxyError> {
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(id.user.clone()),
                uid: id.uid.clone(),
                groups: Some(id.groups.clone()),
                extra: (!id.extra.is_empty()).then(|| id.extra.clone()),
                ..what
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
    fn one_address_cannot_take_every_review_of_unknown_tokens() {
        let reviews = UnknownReviews::new(ReviewLimit { per_second: 1, burst: 100, per_address_per_second: 2 });
        let flood: IpAddr = "192.0.2.1".parse().unwrap();
        let allowed = (0..100).filter(|_| reviews.allow(flood)).count();
        assert_eq!(allowed, 4, "one address gets its burst (twice its rate), no more");
        assert!(reviews.allow("192.0.2.2".parse().unwrap()), "another address still gets a review");
        // IPv6: a /64 is one address; another /64 is another.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(address_key(v6("2001:db8:1:2:aaaa::1")), address_key(v6("2001:db8:1:2:bbbb::2")));
        assert_ne!(address_key(v6("2001:db8:1:2::1")), address_key(v6("2001:db8:1:3::1")));
        assert_eq!(address_key(v6("::ffff:192.0.2.1")), flood, "an IPv4 client on a dual-stack socket");
        let spread = (0..100).filter(|i| reviews.allow(v6(&format!("2001:db8:1:2::{i:x}")))).count();
        assert_eq!(spread, 4, "one /64 gets one address's share, whatever its addresses");
        let tight = UnknownReviews::new(ReviewLimit { per_second: 1, burst: 3, per_address_per_second: 2 });
        let from = |i: u8| IpAddr::from([192, 0, 2, i]);
        assert_eq!((0..10).filter(|i| tight.allow(from(*i))).count(), 3, "and all addresses the limit for all");
    }

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
