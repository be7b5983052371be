//! Header hygiene between the client, the proxy and the upstream API servers.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::auth::Identity;

/// Hop-by-hop headers (RFC 9110 7.6.1) and their legacy friends: never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Front-proxy headers the virtual API server trusts from us only; a client's copies are dropped.
const REMOTE_PREFIX: &str = "x-remote-";

/// Characters kept as-is in an `X-Remote-Extra-<key>` header name; everything else is
/// percent-encoded, as the API server's request-header authenticator unescapes.
const EXTRA_KEY: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Removes what must not travel upstream: hop-by-hop headers (restoring `Connection: Upgrade`
/// for upgrades), the client's credentials, any front-proxy headers it sent, and `Host`.
/// `Impersonate-*` stays: the virtual API server authorizes it against the front-proxy identity.
/// (Requests to the host are built from an allowlist instead: `for_host_subresource`.)
pub fn sanitize_request(headers: &mut HeaderMap, upgrade: bool) {
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    headers.remove(header::UPGRADE);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    let drop: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with(REMOTE_PREFIX)).cloned().collect();
    for k in drop {
        headers.remove(k);
    }
    if let (true, Some(to)) = (upgrade, upgrade_to) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, to);
    }
}

/// Request headers a pod subresource sent to the host needs (content negotiation and the
/// SPDY/WebSocket handshake); the host request carries nothing else of the client's, so no
/// identity, impersonation or tracing header a client invents can reach the host API server.
const HOST_SUBRESOURCE: [&str; 7] = [
    "accept",
    "user-agent",
    "x-stream-protocol-version",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
];

/// What a request through a pod's or Service's `proxy` subresource carries to its target besides:
/// its content and the usual negotiation and conditional headers (still nothing that names or
/// proves an identity).
/// (Not `accept-encoding`: an HTML page must come back uncompressed, for its links to be given
/// back the virtual path.)
const HOST_PROXY: [&str; 9] = [
    "content-type",
    "content-encoding",
    "accept-language",
    "cache-control",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "range",
];

/// The headers of a pod log/exec/attach/port-forward request to the host: the allowlist, plus
/// `Connection: Upgrade` and `Upgrade` for an upgrade.
pub fn for_host_subresource(from: &HeaderMap, upgrade: bool) -> HeaderMap {
    let mut out = HeaderMap::new();
    copy(from, &mut out, &HOST_SUBRESOURCE);
    if let (true, Some(to)) = (upgrade, from.get(header::UPGRADE)) {
        out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        out.insert(header::UPGRADE, to.clone());
    }
    out
}

/// The headers of a `proxy` subresource request to the host: those of [`for_host_subresource`]
/// and [`HOST_PROXY`].
pub fn for_host_proxy(from: &HeaderMap, upgrade: bool) -> HeaderMap {
    let mut out = for_host_subresource(from, upgrade);
    copy(from, &mut out, &HOST_PROXY);
    out
}

fn copy(from: &HeaderMap, to: &mut HeaderMap, names: &[&'static str]) {
    for name in names {
        for v in from.get_all(*name) {
            to.append(HeaderName::from_static(name), v.clone());
        }
    }
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !t.is_empty() && t != "upgrade")
        .collect();
    for h in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(h.as_str());
    }
}

/// The identity as front-proxy request headers.
pub fn add_identity(headers: &mut HeaderMap, id: &Identity) {
    if let Ok(v) = HeaderValue::from_str(&id.user) {
        headers.insert("x-remote-user", v);
    }
    if let Some(uid) = id.uid.as_deref().and_then(|u| HeaderValue::from_str(u).ok()) {
        headers.insert("x-remote-uid", uid);
    }
    for g in &id.groups {
        if let Ok(v) = HeaderValue::from_str(g) {
            headers.append("x-remote-group", v);
        }
    }
    for (key, values) in &id.extra {
        let name = format!("{REMOTE_PREFIX}extra-{}", utf8_percent_encode(key, EXTRA_KEY));
        let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else { continue };
        for v in values {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.append(name.clone(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn client_credentials_and_forged_identity_never_travel() {
        let mut h = headers(&[
            ("authorization", "Bearer secret"),
            ("x-remote-user", "system:admin"),
            ("x-remote-group", "system:masters"),
            ("X-Remote-Extra-Scopes", "x"),
            ("impersonate-user", "bob"),
            ("host", "proxy:8443"),
            ("accept", "application/json"),
            ("connection", "keep-alive, x-custom"),
            ("x-custom", "1"),
            ("transfer-encoding", "chunked"),
        ]);
        sanitize_request(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["accept", "impersonate-user"]);
    }

    #[test]
    fn host_subresource_requests_carry_only_the_allowlist() {
        let from = headers(&[
            ("authorization", "Bearer secret"),
            ("x-remote-user", "system:admin"),
            ("x-remote-group", "system:masters"),
            ("x-remote-extra-scopes", "x"),
            ("impersonate-user", "system:admin"),
            ("impersonate-group", "system:masters"),
            ("impersonate-extra-x", "y"),
            ("x-forwarded-for", "10.0.0.1"),
            ("cookie", "c"),
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v5.channel.k8s.io"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
            ("accept", "*/*"),
        ]);
        let h = for_host_subresource(&from, true);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["accept", "connection", "upgrade", "x-stream-protocol-version"]);
        assert_eq!(h.get_all("x-stream-protocol-version").iter().count(), 2);
        assert_eq!(h["upgrade"], "SPDY/3.1");
        let plain = for_host_subresource(&from, false);
        assert!(!plain.contains_key("upgrade") && !plain.contains_key("connection"));
    }

    #[test]
    fn upgrades_keep_their_upgrade_headers() {
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-protocol", "v5.channel.k8s.io"),
            ("sec-websocket-key", "k"),
            ("sec-websocket-version", "13"),
        ]);
        assert!(is_upgrade(&h));
        sanitize_request(&mut h, true);
        assert_eq!(h["connection"], "Upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-protocol"], "v5.channel.k8s.io");
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])), "Upgrade without Connection");
    }

    #[test]
    fn identity_headers_escape_extra_keys() {
        let mut h = HeaderMap::new();
        let id = Identity {
            user: "system:serviceaccount:default:app".into(),
            uid: Some("u-1".into()),
            groups: vec!["system:serviceaccounts".into(), "system:authenticated".into()],
            extra: [("authentication.kubernetes.io/pod-name".to_string(), vec!["web-1".to_string()])].into(),
        };
        add_identity(&mut h, &id);
        assert_eq!(h["x-remote-user"], "system:serviceaccount:default:app");
        assert_eq!(h.get_all("x-remote-group").iter().count(), 2);
        assert_eq!(h["x-remote-extra-authentication.kubernetes.io%2fpod-name"], "web-1");
    }
}
