//! Ingresses. The host's ingress controllers route by class and host name for every namespace,
//! so a tenant's Ingress copied as it is could take another team's host name, catch every host
//! of a class (a rule without a host, a default backend) or point at host objects (a resource
//! backend). The admin names the classes tenants may use and the host names they may claim;
//! anything else is refused with the field that broke the rule.

use k8s_openapi::api::networking::v1::IngressSpec;

use super::Refusal;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ingresses {
    /// Ingress classes tenants may use; the first is given to an Ingress that names none. None:
    /// Ingresses do not reach the host.
    pub classes: Vec<String>,
    /// Host names tenants may claim: exact (`shop.example.com`) or `*.suffix`, which allows any
    /// name under the suffix, wildcard hosts (`*.a.suffix`, `*.suffix`) included; `CLASS=` in
    /// front (`internal=*.corp.example.com`) allows them under that class only.
    pub hosts: Vec<String>,
}

impl Ingresses {
    pub fn enabled(&self) -> bool {
        !self.classes.is_empty()
    }

    /// The host class of an Ingress asking for `class` (none: the admin's first).
    pub fn class(&self, class: Option<&str>) -> Option<String> {
        class.or(self.classes.first().map(String::as_str)).map(str::to_string)
    }

    /// Whether a tenant may claim host name `host` under ingress class `class`.
    pub fn host_allowed(&self, class: &str, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.hosts_for(class).map(str::to_ascii_lowercase).any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host.strip_suffix(suffix).is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => host == p,
        })
    }

    /// The host patterns allowed under `class`: those for every class and those for it.
    fn hosts_for<'a>(&'a self, class: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.hosts.iter().filter_map(move |entry| match entry.split_once('=') {
            Some((only, pattern)) => (only == class).then_some(pattern),
            None => Some(entry.as_str()),
        })
    }

    /// Every rule the spec breaks, each naming its field.
    pub fn violations(&self, spec: &IngressSpec) -> Vec<String> {
        let mut out = vec![];
        let class = self.class(spec.ingress_class_name.as_deref()).unwrap_or_default();
        match self.class(spec.ingress_class_name.as_deref()) {
            Some(c) if self.classes.contains(&c) => {}
            Some(c) => out.push(format!(
                "spec.ingressClassName: {c:?} is not one of the classes allowed here ({})",
                self.classes.join(", ")
            )),
            None => out.push("spec.ingressClassName: no ingress class is allowed here".into()),
        }
        if spec.default_backend.is_some() {
            out.push(
                "spec.defaultBackend: not allowed: it would catch every host name of the class; use rules with a host"
                    .into(),
            );
        }
        let hosts = || super::listed(self.hosts_for(&class));
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            match rule.host.as_deref().filter(|h| !h.is_empty()) {
                None => out.push(format!("spec.rules[{i}].host: required here: a rule without a host would catch every host name of the class")),
                Some(h) if !self.host_allowed(&class, h) => {
                    out.push(format!("spec.rules[{i}].host: {h:?} is not among the host names allowed here ({})", hosts()))
                }
                Some(_) => {}
            }
            for (j, path) in rule.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
                if let Some(p) = path.path.as_deref().filter(|p| !is_plain_path(p)) {
                    out.push(format!(
                        "spec.rules[{i}].http.paths[{j}].path: {p:?} is not allowed here: only a plain path (/, \
                         letters, digits, '.', '_', '~', '-'), as some controllers read others as their own configuration"
                    ));
                }
                if path.backend.resource.is_some() {
                    out.push(format!(
                        "spec.rules[{i}].http.paths[{j}].backend.resource: not allowed: use a service backend"
                    ));
                }
            }
        }
        for (i, tls) in spec.tls.iter().flatten().enumerate() {
            if tls.hosts.as_ref().is_none_or(|h| h.is_empty()) {
                out.push(format!(
                    "spec.tls[{i}].hosts: required here: a certificate for no named host could be served for any"
                ));
            }
            for (j, h) in tls.hosts.iter().flatten().enumerate() {
                if !self.host_allowed(&class, h) {
                    out.push(format!(
                        "spec.tls[{i}].hosts[{j}]: {h:?} is not among the host names allowed here ({})",
                        hosts()
                    ));
                }
            }
        }
        out
    }

    /// The spec checked (`violations`), as a refusal naming every broken rule.
    pub fn check(&self, spec: &IngressSpec) -> Result<(), Refusal> {
        let v = self.violations(spec);
        if v.is_empty() {
            return Ok(());
        }
        Err(Refusal {
            reason: "IngressNotAllowed",
            message: format!("refused by the host's isolation policy: {}", v.join("; ")),
        })
    }
}

/// Whether an Ingress path is plain: `/` and then only unreserved URL characters (no regular
/// expression, no quote or brace a controller's configuration could take for its own).
fn is_plain_path(p: &str) -> bool {
    p.starts_with('/') && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._~-".contains(&b))
}

/// Whether `p` is a host name or `*.` and one, with an ingress class and `=` in front or not
/// (what the admin may allow; a bare `*` is not).
pub fn is_host_pattern(p: &str) -> bool {
    let p = match p.split_once('=') {
        Some((class, pattern)) if is_dns_name(class) => pattern,
        Some(_) => return false,
        None => p,
    };
    is_dns_name(p.strip_prefix("*.").unwrap_or(p))
}

/// A DNS subdomain name (host names, ingress class names), any case.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Ingresses {
        Ingresses {
            classes: vec!["web".into(), "internal".into()],
            hosts: vec!["*.team-a.example.com".into(), "shop.example.com".into()],
        }
    }

    fn spec(v: serde_json::Value) -> IngressSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn host_names_match_exactly_or_under_a_suffix() {
        let p = policy();
        for ok in [
            "api.team-a.example.com",
            "a.b.team-a.example.com",
            "*.team-a.example.com",
            "*.x.team-a.example.com",
            "shop.example.com",
            "Shop.Example.com",
        ] {
            assert!(p.host_allowed("web", ok), "{ok}");
        }
        for no in [
            "team-a.example.com",
            "evilteam-a.example.com",
            "x.team-b.example.com",
            "*.example.com",
            "api.shop.example.com",
            "example.com",
            "",
        ] {
            assert!(!p.host_allowed("web", no), "{no}");
        }
        assert!(!Ingresses::default().host_allowed("web", "a.example.com"), "nothing unless the admin says so");
        for p in ["shop.example.com", "*.team-a.example.com", "localhost", "internal=*.corp.example.com"] {
            assert!(is_host_pattern(p), "{p}");
        }
        for p in [
            "*",
            "*.",
            "a..b",
            "-a.example.com",
            "a.*.example.com",
            "a/b",
            "",
            "=a.example.com",
            "a b=x.example.com",
            "web=*",
        ] {
            assert!(!is_host_pattern(p), "{p}");
        }
    }

    #[test]
    fn a_host_pattern_with_a_class_in_front_holds_for_that_class_only() {
        let p = Ingresses {
            classes: vec!["web".into(), "internal".into()],
            hosts: vec!["*.team-a.example.com".into(), "internal=*.corp.example.com".into()],
        };
        assert!(p.host_allowed("internal", "wiki.corp.example.com"));
        assert!(!p.host_allowed("web", "wiki.corp.example.com"), "not published on another class");
        assert!(p.host_allowed("web", "shop.team-a.example.com") && p.host_allowed("internal", "x.team-a.example.com"));
        let public = spec(serde_json::json!({"ingressClassName": "web", "rules": [{"host": "wiki.corp.example.com"}]}));
        let v = p.violations(&public);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("not among the host names allowed here (*.team-a.example.com)"), "{v:?}");
        let internal =
            spec(serde_json::json!({"ingressClassName": "internal", "rules": [{"host": "wiki.corp.example.com"}]}));
        assert_eq!(p.check(&internal), Ok(()));
    }

    #[test]
    fn an_ingress_within_the_allowed_classes_and_hosts_passes() {
        let ok = spec(serde_json::json!({
            "rules": [{"host": "api.team-a.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}}]}}],
            "tls": [{"hosts": ["api.team-a.example.com"], "secretName": "api-tls"}],
        }));
        assert_eq!(policy().check(&ok), Ok(()));
        assert_eq!(policy().class(None).as_deref(), Some("web"), "the admin's first class when none is named");
        assert_eq!(policy().class(Some("internal")).as_deref(), Some("internal"));
    }

    #[test]
    fn every_broken_rule_is_named_by_its_field() {
        let bad = spec(serde_json::json!({
            "ingressClassName": "public",
            "defaultBackend": {"service": {"name": "api", "port": {"number": 80}}},
            "rules": [
                {"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}}]}},
                {"host": "login.team-b.example.com"},
                {"host": "x.team-a.example.com", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"resource": {"apiGroup": "k8s.example.com", "kind": "Bucket", "name": "b"}}},
                    {"path": "/a;}location /x {", "pathType": "ImplementationSpecific", "backend": {"service": {"name": "api", "port": {"number": 80}}}},
                    {"path": "/v1/(.*)", "pathType": "ImplementationSpecific", "backend": {"service": {"name": "api", "port": {"number": 80}}}},
                    {"path": "/static/app-1.2_x~y", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}},
                ]}},
            ],
            "tls": [{"hosts": ["x.team-a.example.com", "bank.example.com"], "secretName": "t"}, {"secretName": "any"}],
        }));
        let v = policy().violations(&bad);
        let fields: Vec<&str> = v.iter().map(|m| m.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "spec.ingressClassName",
                "spec.defaultBackend",
                "spec.rules[0].host",
                "spec.rules[1].host",
                "spec.rules[2].http.paths[0].backend.resource",
                "spec.rules[2].http.paths[1].path",
                "spec.rules[2].http.paths[2].path",
                "spec.tls[0].hosts[1]",
                "spec.tls[1].hosts"
            ],
            "{v:?}"
        );
        let r = policy().check(&bad).unwrap_err();
        assert_eq!(r.reason, "IngressNotAllowed");
        assert!(r.message.contains("\"login.team-b.example.com\" is not among the host names allowed here (*.team-a.example.com, shop.example.com)"), "{}", r.message);
        let off = Ingresses::default().violations(&spec(serde_json::json!({"rules": [{"host": "a.example.com"}]})));
        assert_eq!(off.len(), 2, "no class and no host allowed: {off:?}");
    }
}
