//! Ingresses, when the admin allows ingress classes (`--ingress-classes`, `--ingress-hosts`):
//! the host copy routes the same paths to the host copies of the tenant's Services, under a class
//! and host names the policy allows (`policy::ingresses`); its TLS Secrets are copied while it
//! uses them, and the address the host's controller gives it flows back. Off, a tenant's
//! Ingress gets a Warning saying nothing serves it.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{Ingress, IngressSpec};
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;

use crate::context::Context;
use crate::informer::{Change, key_of};
use crate::mirror::{Mirror, meta_differs};
use crate::naming::Translator;
use crate::policy::Refusal;
use crate::policy::ingresses::Ingresses;
use crate::refs::RefKind;
use crate::sync::{self, Result};

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
                let reaches_host = v.spec.as_ref().is_some_and(|s| {
                    let service = |name: &str| ctx.stores.virt::<Service>().get(&ObjectRef::new(name).within(&ns));
                    ctx.policy.ingresses.check(s).is_ok() && backend_violation(s, &ns, service).is_ok()
                });
                ctx.refs.update(&ns, &user, if reaches_host { tls_secrets(v) } else { BTreeSet::new() })
            }
        };
        for (_, tns, tname) in changed {
            ctx.queues.of::<k8s_openapi::api::core::v1::Secret>().add((tns, tname));
        }
        ctx.queues.of::<Self>().add((ns, name));
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        let spec = v.spec.clone().unwrap_or_default();
        ctx.policy.ingresses.check(&spec)?;
        let ns = v.metadata.namespace.as_deref().unwrap_or_default();
        let service = |name: &str| ctx.stores.virt::<Service>().get(&ObjectRef::new(name).within(ns));
        backend_violation(&spec, ns, service)?;
        let mut metadata = ctx.tr.host_meta(KIND, &v.metadata);
        // The class is the spec's, checked: never an annotation the admin made verbatim.
        metadata.annotations.iter_mut().for_each(|a| {
            a.remove(CLASS_ANNOTATION);
        });
        Ok(Ingress { metadata, spec: Some(host_spec(&ctx.tr, ns, spec, &ctx.policy.ingresses)), status: None })
    }

    fn differs(d: &Self, c: &Self) -> bool {
        meta_differs(d, c) || d.spec != c.spec
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

/// The deprecated way to name a class, which controllers still read.
const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

/// A backend the host's controller must not be sent to, given the virtual Services of the
/// Ingress's namespace: one not there yet (it could come without a selector), and one whose
/// addresses the tenant chooses (no selector: Endpoints it writes; ExternalName: any DNS name),
/// which the controller would reach from where it runs on the host.
pub fn backend_violation(
    spec: &IngressSpec,
    ns: &str,
    service: impl Fn(&str) -> Option<std::sync::Arc<Service>>,
) -> Result<(), Refusal> {
    for ((i, j), name) in service_backends(spec) {
        let field = format!("spec.rules[{i}].http.paths[{j}].backend.service.name");
        let message = match service(name).as_ref().and_then(|s| s.spec.as_ref()) {
            None => format!("{field}: Service {ns}/{name} not found: the Ingress reaches the host once it exists"),
            Some(s) if s.type_.as_deref() == Some("ExternalName") => {
                format!("{field}: Service {ns}/{name} is an ExternalName: not allowed behind an Ingress here")
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
    let names = |i: &Ingress| i.spec.as_ref().is_some_and(|s| service_backends(s).any(|(_, n)| n == service));
    let all = ctx.stores.virt::<Ingress>().state();
    for i in all.iter().filter(|i| i.metadata.namespace.as_deref() == Some(ns) && names(i)) {
        <Ingress as Mirror>::on_virtual_change(ctx, i, Change::Applied);
    }
}

/// The Services an Ingress's paths send to, each with its (rule, path) index.
fn service_backends(spec: &IngressSpec) -> impl Iterator<Item = ((usize, usize), &str)> {
    let rules = spec.rules.iter().flatten().enumerate();
    rules.flat_map(|(i, r)| {
        let paths = r.http.iter().flat_map(|h| h.paths.iter()).enumerate();
        paths.filter_map(move |(j, p)| p.backend.service.as_ref().map(|s| ((i, j), s.name.as_str())))
    })
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

/// A checked virtual spec as the host's (pure): the class the policy gives it, and every Service
/// and Secret named by its host copy's name.
pub fn host_spec(tr: &Translator, ns: &str, mut spec: IngressSpec, policy: &Ingresses) -> IngressSpec {
    spec.ingress_class_name = policy.class(spec.ingress_class_name.as_deref());
    for path in spec.rules.iter_mut().flatten().flat_map(|r| r.http.iter_mut()).flat_map(|h| h.paths.iter_mut()) {
        if let Some(s) = path.backend.service.as_mut() {
            s.name = tr.host_name(ns, &s.name);
        }
    }
    for t in spec.tls.iter_mut().flatten() {
        if let Some(s) = t.secret_name.as_mut().filter(|s| !s.is_empty()) {
            *s = tr.host_name(ns, s);
        }
    }
    spec
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
        let h = host_spec(&tr, "shop", v.spec.clone().unwrap(), &policy);
        assert_eq!(h.ingress_class_name.as_deref(), Some("web"));
        let backend = &h.rules.as_ref().unwrap()[0].http.as_ref().unwrap().paths[0].backend;
        assert_eq!(backend.service.as_ref().unwrap().name, "api-x-shop-x-team-a");
        let tls = h.tls.as_ref().unwrap();
        assert_eq!(tls[0].secret_name.as_deref(), Some("api-tls-x-shop-x-team-a"));
        assert_eq!(tls[1].secret_name, None, "the controller's default certificate");
        assert_eq!(tls_secrets(&v), [(RefKind::Secret, "api-tls".to_string())].into());
        let named = IngressSpec { ingress_class_name: Some("internal".into()), ..Default::default() };
        assert_eq!(host_spec(&tr, "shop", named, &policy).ingress_class_name.as_deref(), Some("internal"));
    }
}
