//! ConfigMaps and Secrets: copied while a pod (or an Ingress's TLS) uses them (or always, if the
//! admin asks), updated
//! as they change, removed from the host when nothing uses them any more.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};

use kube::runtime::watcher;

use crate::context::Context;
use crate::mirror::{Mirror, meta_differs};
use crate::naming::Translator;
use crate::policy::Refusal;
use crate::refs::RefKind;

impl Mirror for ConfigMap {
    const KIND: &'static str = "ConfigMap";

    fn wanted(ctx: &Context, v: &Self) -> bool {
        let (ns, name) = crate::informer::key_of(v);
        ctx.opts.sync_all_configmaps || ctx.refs.is_used(RefKind::ConfigMap, &ns, &name)
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        Ok(ConfigMap {
            metadata: ctx.tr.host_meta(Self::KIND, &v.metadata),
            data: v.data.clone(),
            binary_data: v.binary_data.clone(),
            immutable: v.immutable,
        })
    }

    fn differs(d: &Self, c: &Self) -> bool {
        meta_differs(d, c) || d.data != c.data || d.binary_data != c.binary_data || d.immutable != c.immutable
    }

    fn needs_recreate(c: &Self) -> bool {
        c.immutable == Some(true)
    }
}

impl Mirror for Secret {
    const KIND: &'static str = "Secret";

    /// Token Secrets (one per pod) are not watched: see `tokens`.
    fn host_watch(tr: &Translator) -> watcher::Config {
        let copies = format!("{},!{}", tr.cluster_selector(), crate::naming::LABEL_TOKEN);
        watcher::Config::default().labels(&copies).any_semantic()
    }

    fn wanted(ctx: &Context, v: &Self) -> bool {
        let (ns, name) = crate::informer::key_of(v);
        // Legacy service-account token Secrets are filled by the virtual token controller and
        // mean nothing to the host.
        if v.type_.as_deref() == Some("kubernetes.io/service-account-token") {
            return false;
        }
        ctx.opts.sync_all_secrets || ctx.refs.is_used(RefKind::Secret, &ns, &name)
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        Ok(Secret {
            metadata: ctx.tr.host_meta(Self::KIND, &v.metadata),
            data: v.data.clone(),
            string_data: None,
            type_: v.type_.clone(),
            immutable: v.immutable,
        })
    }

    fn differs(d: &Self, c: &Self) -> bool {
        meta_differs(d, c) || d.data != c.data || d.type_ != c.type_ || d.immutable != c.immutable
    }

    fn needs_recreate(c: &Self) -> bool {
        c.immutable == Some(true)
    }
}
