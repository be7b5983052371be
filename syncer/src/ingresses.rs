//! Ingresses, when the admin allows ingress classes (`--ingress-classes`, `--ingress-hosts`):
//! the host copy routes the same paths to the host copies of the tenant's Services, under a class
//! and host names the policy allows (`policy::ingresses`); its TLS Secrets are copied while it
//! uses them, and the address the host's controller gives it flows back. Off, a tenant's
//! Ingress gets a Warning saying nothing serves it.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressServiceBackend, IngressSpec, ServiceBackendPort};
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;

use crate::context::Context;
use crate::endpointslices::LABEL_SERVICE_NAME;
use crate::informer::{Change, key_of};
use crate::mirror::{Mirror, meta_differs};
use crate::naming::Translator;
use crate::policy::Refusal;
use crate::policy::ingresses::Ingresses;
use crate::refs::RefKind;
use crate::sync::{self, Result};
use vkube_core::contract::WAKE_PORT_NAME;

pub const KIND: &str = "Ingress";

impl Mirror for Ingress {
    const KIND: &'static str = KIND;

    fn wanted(ctx: &Context, _v: &Self) -> bool {
        ctx.policy.ingresses.enabled()
    }

    async fn not_wanted(ctx: &Context, v: &Self) {
        let note = "nothing serves ingresses in this virtual cluster: its admin allows no ingress class \
                    (--ingress-classes and --ingress-hosts, chart values policy.ingress.classes and .hosts)";
        sync::warn(ctx, v, "NotServed", note).await;
    }

    /// Its TLS Secrets are copied while an Ingress that reaches the host uses them (the policy
    /// allows it and its backends are Services it may lead to: the Services' changes come here
    /// too, through [`backends_changed`]).
    fn on_virtual_change(ctx: &Context, v: &Self, change: Change) {
        let (ns, name) = key_of(v);
        let user = user_key(&name);
        let changed = match change {
            Change::Deleted => ctx.refs.remove(&ns, &user),
            Change::Applied | Change::Listed => {
                // (With no class allowed, every Ingress fails the check.)
                let reaches_host = refusal(ctx, v).is_ok();
                ctx.refs.update(&ns, &user, if reaches_host { tls_secrets(v) } else { BTreeSet::new() })
            }
        };
        for (_, tns, tname) in changed {
            ctx.queues.of::<k8s_openapi::api::core::v1::Secret>().add((tns, tname));
        }
        ctx.queues.of::<Self>().add((ns, name));
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        refusal(ctx, v)?;
        let spec = v.spec.clone().unwrap_or_default();
        let ns = v.metadata.namespace.as_deref().unwrap_or_default();
        let mut metadata = ctx.tr.host_meta(KIND, &v.metadata);
        // The class is the spec's, checked: never an annotation the admin made verbatim.
        metadata.annotations.iter_mut().for_each(|a| {
            a.remove(CLASS_ANNOTATION);
        });
        let spec = host_spec(&ctx.tr, ns, spec, &ctx.policy.ingresses, virtual_service(ctx, ns))?;
        Ok(Ingress { metadata, spec: Some(spec), status: None })
    }

    fn differs(d: &Self, c: &Self) -> bool {
        meta_differs(d, c) || d.spec != c.spec
    }

    /// A host copy a sleep pointed at the control plane's wake port stays so after the wake
    /// until the host's EndpointSlices of every Service it leads to list a ready endpoint (what
    /// the controller routes by): the waking page answers meanwhile, not the controller's error
    /// for a backend without endpoints. (The virtual EndpointSlices would not do: they keep the
    /// pods of before the sleep ready until their new host pods' status flows back.)
    fn hold(ctx: &Context, v: &Self, current: &Self) -> bool {
        // Not for ever: a backend the tenant scaled to zero must not keep the waking page.
        if ctx.started.elapsed() > WAKE_HOLD_MAX {
            return false;
        }
        let Some(proxy) = ctx.opts.proxy_service.as_deref() else { return false };
        let asleep = current.spec.as_ref().is_some_and(|s| leads_only_to(s, proxy, WAKE_PORT_NAME));
        if !asleep {
            return false;
        }
        let services: BTreeSet<&str> =
            v.spec.iter().flat_map(|s| service_backends(s).map(|(_, b)| b.name.as_str())).collect();
        !services.into_iter().all(|name| back_or_none_coming(ctx, v, name))
    }

    async fn back(ctx: &Context, v: &Self, h: &Self) -> Result<()> {
        let addresses =
            |i: &Self| i.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.clone());
        let host = addresses(h).filter(|a| !a.is_empty());
        if addresses(v).filter(|a| !a.is_empty()) == host {
            return Ok(());
        }
        // `null` when the host has none: a merge patch leaves out what it does not name.
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": host}}});
        let api: Api<Self> = Api::namespaced(ctx.virt.clone(), v.metadata.namespace.as_deref().unwrap_or_default());
        api.patch_status(v.metadata.name.as_deref().unwrap_or_default(), &sync::patch_params(), &Patch::Merge(&patch))
            .await?;
        ctx.metrics.wrote(KIND, "status");
        Ok(())
    }
}

/// Why an Ingress does not reach the host, if it does not: the policy, then its backends.
fn refusal(ctx: &Context, v: &Ingress) -> Result<(), Refusal> {
    let spec = v.spec.clone().unwrap_or_default();
    ctx.policy.ingresses.check(&spec)?;
    let ns = v.metadata.namespace.as_deref().unwrap_or_default();
    backend_violation(&spec, ns, virtual_service(ctx, ns))
}

/// The virtual Services of namespace `ns`, by name.
fn virtual_service<'a>(ctx: &'a Context, ns: &'a str) -> impl Fn(&str) -> Option<std::sync::Arc<Service>> + 'a {
    move |name: &str| ctx.stores.virt::<Service>().get(&ObjectRef::new(name).within(ns))
}

/// How long after the syncer starts (a wake) a sleeping host Ingress may wait for its pods.
const WAKE_HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// The deprecated way to name a class, which controllers still read.
const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

/// A backend the host's controller must not be sent to, given the virtual Services of the
/// Ingress's namespace: one not there yet (it could come without a selector), one whose
/// addresses the tenant chooses (no selector: Endpoints it writes; ExternalName: any DNS name),
/// which the controller would reach from where it runs on the host, one with no host copy
/// (`vkube_core::services::has_host_copy`), and a port name the Service does not have (the host
/// copy names the port by number, see [`host_spec`]).
pub fn backend_violation(
    spec: &IngressSpec,
    ns: &str,
    service: impl Fn(&str) -> Option<std::sync::Arc<Service>>,
) -> Result<(), Refusal> {
    for ((i, j), backend) in service_backends(spec) {
        let name = backend.name.as_str();
        let field = format!("spec.rules[{i}].http.paths[{j}].backend.service.name");
        let found = service(name);
        if let (Some(svc), Some(port)) = (&found, port_name(backend))
            && port_number(svc, port).is_none()
        {
            return Err(unknown_port((i, j), ns, name, port));
        }
        let message = match found.as_ref().and_then(|s| s.spec.as_ref()) {
            None => format!("{field}: Service {ns}/{name} not found: the Ingress reaches the host once it exists"),
            Some(s) if s.type_.as_deref() == Some("ExternalName") => {
                format!("{field}: Service {ns}/{name} is an ExternalName: not allowed behind an Ingress here")
            }
            Some(_) if found.as_deref().is_some_and(|s| !vkube_core::services::has_host_copy(s)) => {
                format!("{field}: Service {ns}/{name} has no host copy: not allowed behind an Ingress here")
            }
            Some(s) if s.selector.as_ref().is_none_or(|sel| sel.is_empty()) => format!(
                "{field}: Service {ns}/{name} has no selector: its addresses are the tenant's choice, not \
                 allowed behind an Ingress here"
            ),
            Some(_) => continue,
        };
        return Err(Refusal { reason: "BackendNotAllowed", message });
    }
    Ok(())
}

/// Service `service` of namespace `ns` changed: the Ingresses with a backend of that name are
/// looked at again, their TLS Secrets included (a backend may appear, lose its selector, become
/// an ExternalName).
pub fn backends_changed(ctx: &Context, ns: &str, service: &str) {
    let names = |i: &Ingress| i.spec.as_ref().is_some_and(|s| service_backends(s).any(|(_, b)| b.name == service));
    let all = ctx.stores.virt::<Ingress>().state();
    for i in all.iter().filter(|i| i.metadata.namespace.as_deref() == Some(ns) && names(i)) {
        <Ingress as Mirror>::on_virtual_change(ctx, i, Change::Applied);
    }
}

/// Whether Service `service` of the Ingress's namespace can be routed to again: the host's
/// EndpointSlices of its host copy (what ingress controllers route by) list a ready endpoint, or
/// its virtual ones list none at all (scaled to zero: nothing is coming back to wait for).
fn back_or_none_coming(ctx: &Context, v: &Ingress, service: &str) -> bool {
    let ns = v.metadata.namespace.as_deref().unwrap_or_default();
    let of = |slices: &[std::sync::Arc<EndpointSlice>], ns: &str, name: &str| -> Vec<std::sync::Arc<EndpointSlice>> {
        let named = |s: &EndpointSlice| {
            s.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)).map(String::as_str) == Some(name)
        };
        slices.iter().filter(|s| s.metadata.namespace.as_deref() == Some(ns) && named(s)).cloned().collect()
    };
    let virtual_slices = of(&ctx.stores.virt::<EndpointSlice>().state(), ns, service);
    if virtual_slices.iter().all(|s| s.endpoints.as_ref().is_none_or(|e| e.is_empty())) {
        return true;
    }
    let host_slices =
        of(&ctx.stores.host::<EndpointSlice>().state(), ctx.tr.host_namespace(), &ctx.tr.host_name(ns, service));
    host_slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
}

/// Whether every path of a spec leads to port `port` of Service `service` (and there is one).
pub fn leads_only_to(spec: &IngressSpec, service: &str, port: &str) -> bool {
    let paths: Vec<_> = spec.rules.iter().flatten().flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter())).collect();
    !paths.is_empty()
        && paths.iter().all(|p| {
            p.backend
                .service
                .as_ref()
                .is_some_and(|s| s.name == service && s.port.as_ref().and_then(|p| p.name.as_deref()) == Some(port))
        })
}

/// The Services an Ingress's paths send to, each with its (rule, path) index.
fn service_backends(spec: &IngressSpec) -> impl Iterator<Item = ((usize, usize), &IngressServiceBackend)> {
    let rules = spec.rules.iter().flatten().enumerate();
    rules.flat_map(|(i, r)| {
        let paths = r.http.iter().flat_map(|h| h.paths.iter()).enumerate();
        paths.filter_map(move |(j, p)| p.backend.service.as_ref().map(|s| ((i, j), s)))
    })
}

/// The port a backend names by name, if it does.
fn port_name(backend: &IngressServiceBackend) -> Option<&str> {
    backend.port.as_ref().and_then(|p| p.name.as_deref()).filter(|n| !n.is_empty())
}

/// The number of Service `svc`'s port named `name`.
fn port_number(svc: &Service, name: &str) -> Option<i32> {
    let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten());
    ports.clone().find(|p| p.name.as_deref() == Some(name)).map(|p| p.port)
}

/// The reference index's user key of an Ingress: no pod has a name with a colon.
fn user_key(name: &str) -> String {
    format!("ingress:{name}")
}

/// The Secrets an Ingress's TLS sections name.
pub fn tls_secrets(v: &Ingress) -> BTreeSet<(RefKind, String)> {
    let tls = v.spec.iter().flat_map(|s| s.tls.iter().flatten());
    tls.filter_map(|t| t.secret_name.clone()).filter(|s| !s.is_empty()).map(|s| (RefKind::Secret, s)).collect()
}

/// A checked virtual spec as the host's (pure): the class the policy gives it, every Service and
/// Secret named by its host copy's name, and every port by its number (given the virtual
/// Services of namespace `ns`): a port name that does not resolve is refused, never passed on.
pub fn host_spec(
    tr: &Translator,
    ns: &str,
    mut spec: IngressSpec,
    policy: &Ingresses,
    service: impl Fn(&str) -> Option<std::sync::Arc<Service>>,
) -> Result<IngressSpec, Refusal> {
    spec.ingress_class_name = policy.class(spec.ingress_class_name.as_deref());
    for (i, rule) in spec.rules.iter_mut().flatten().enumerate() {
        for (j, path) in rule.http.iter_mut().flat_map(|h| h.paths.iter_mut()).enumerate() {
            let Some(s) = path.backend.service.as_mut() else { continue };
            // By number: traefik and ingress-nginx name a backend `NAMESPACE-SERVICE-PORT` with
            // no separator of their own, and a port name of the tenant's (`a-80`) could complete
            // another cluster's Service name into the same string, taking its traffic.
            if let Some(name) = port_name(s) {
                let number = service(&s.name).and_then(|svc| port_number(&svc, name));
                let number = number.ok_or_else(|| unknown_port((i, j), ns, &s.name, name))?;
                s.port = Some(ServiceBackendPort { number: Some(number), name: None });
            }
            s.name = tr.host_name(ns, &s.name);
        }
    }
    for t in spec.tls.iter_mut().flatten() {
        if let Some(s) = t.secret_name.as_mut().filter(|s| !s.is_empty()) {
            *s = tr.host_name(ns, s);
        }
    }
    Ok(spec)
}

/// Path `(i, j)` names a port `port` that Service `ns/service` does not have.
fn unknown_port((i, j): (usize, usize), ns: &str, service: &str, port: &str) -> Refusal {
    Refusal {
        reason: "BackendNotAllowed",
        message: format!(
            "spec.rules[{i}].http.paths[{j}].backend.service.port.name: Service {ns}/{service} has no port named {port:?}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn only_services_that_select_pods_may_be_backends() {
        let spec: IngressSpec =
            serde_json::from_value(serde_json::json!({"rules": [{"host": "a.example.com", "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}},
                {"path": "/x", "pathType": "Prefix", "backend": {"service": {"name": "other", "port": {"number": 80}}}},
            ]}}]}))
            .unwrap();
        let svc = |v: serde_json::Value| Some(Arc::new(serde_json::from_value::<Service>(v).unwrap()));
        let web = || svc(serde_json::json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}));
        let with_other =
            |other: Option<Arc<Service>>| move |name: &str| if name == "web" { web() } else { other.clone() };
        assert_eq!(backend_violation(&spec, "shop", with_other(web())), Ok(()));
        let why = |other| backend_violation(&spec, "shop", with_other(other)).unwrap_err().message;
        let missing = why(None);
        assert!(
            missing.starts_with("spec.rules[0].http.paths[1].backend.service.name: Service shop/other not found"),
            "{missing}"
        );
        assert!(why(svc(serde_json::json!({"spec": {"ports": [{"port": 80}]}}))).contains("has no selector"));
        assert!(
            why(svc(serde_json::json!({"spec": {"selector": {}, "ports": [{"port": 80}]}})))
                .contains("has no selector")
        );
        let external =
            svc(serde_json::json!({"spec": {"type": "ExternalName", "externalName": "api.vkube-team-b.svc"}}));
        assert!(why(external).contains("is an ExternalName"));
    }

    #[test]
    fn a_spec_leads_only_to_the_wake_port_when_every_path_does() {
        let spec = |backends: &[(&str, &str)]| -> IngressSpec {
            let paths: Vec<_> = backends
                .iter()
                .map(|(svc, port)| serde_json::json!({"path": "/", "pathType": "Prefix", "backend": {"service": {"name": svc, "port": {"name": port}}}}))
                .collect();
            serde_json::from_value(serde_json::json!({"rules": [{"host": "a.example.com", "http": {"paths": paths}}]}))
                .unwrap()
        };
        assert!(leads_only_to(&spec(&[("team-a", "wake"), ("team-a", "wake")]), "team-a", "wake"));
        assert!(!leads_only_to(&spec(&[("team-a", "wake"), ("web-x-shop-x-team-a", "http")]), "team-a", "wake"));
        assert!(!leads_only_to(&spec(&[("team-a", "https")]), "team-a", "wake"));
        assert!(!leads_only_to(&spec(&[]), "team-a", "wake"), "no path leads anywhere");
    }

    #[test]
    fn backends_and_tls_secrets_name_the_host_copies() {
        let tr = Translator::new("team-a", "vkube-team-a");
        let v: Ingress = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "rules": [{"host": "api.team-a.example.com", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"name": "http"}}}},
                ]}}],
                "tls": [{"hosts": ["api.team-a.example.com"], "secretName": "api-tls"}, {"hosts": ["x.team-a.example.com"]}],
            },
        }))
        .unwrap();
        let policy = Ingresses { classes: vec!["web".into(), "internal".into()], hosts: vec![] };
        let api: Service = serde_json::from_value(serde_json::json!({"spec": {"selector": {"app": "api"}, "ports": [
            {"name": "metrics", "port": 9100}, {"name": "http", "port": 8080},
        ]}}))
        .unwrap();
        let api = Arc::new(api);
        let services = |name: &str| (name == "api").then(|| api.clone());
        let h = host_spec(&tr, "shop", v.spec.clone().unwrap(), &policy, services).unwrap();
        assert_eq!(h.ingress_class_name.as_deref(), Some("web"));
        let backend = &h.rules.as_ref().unwrap()[0].http.as_ref().unwrap().paths[0].backend;
        assert_eq!(backend.service.as_ref().unwrap().name, "api-x-shop-x-team-a");
        let port = backend.service.as_ref().unwrap().port.clone().unwrap();
        assert_eq!((port.number, port.name), (Some(8080), None), "a named port by its number");
        assert_eq!(backend_violation(v.spec.as_ref().unwrap(), "shop", services), Ok(()));
        let unknown =
            serde_json::to_string(v.spec.as_ref().unwrap()).unwrap().replace(r#""name":"http""#, r#""name":"nope""#);
        let unknown: IngressSpec = serde_json::from_str(&unknown).unwrap();
        let why = backend_violation(&unknown, "shop", services).unwrap_err().message;
        assert_eq!(
            why,
            "spec.rules[0].http.paths[0].backend.service.port.name: Service shop/api has no port named \"nope\""
        );
        let passed_on = host_spec(&tr, "shop", unknown, &policy, services);
        assert_eq!(passed_on.unwrap_err().message, why, "never the tenant's port name on the host");
        let tls = h.tls.as_ref().unwrap();
        assert_eq!(tls[0].secret_name.as_deref(), Some("api-tls-x-shop-x-team-a"));
        assert_eq!(tls[1].secret_name, None, "the controller's default certificate");
        assert_eq!(tls_secrets(&v), [(RefKind::Secret, "api-tls".to_string())].into());
        let named = IngressSpec { ingress_class_name: Some("internal".into()), ..Default::default() };
        assert_eq!(
            host_spec(&tr, "shop", named, &policy, services).unwrap().ingress_class_name.as_deref(),
            Some("internal")
        );
    }
}
