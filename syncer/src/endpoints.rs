//! Endpoints of selector-less Services: the tenant lists the addresses, so the host needs them
//! too (the host's mirroring controller turns them into EndpointSlices). Services with a
//! selector get their endpoints from the host's own controllers.

use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::runtime::reflector::ObjectRef;

use crate::context::Context;
use crate::mirror::{Mirror, meta_differs};
use crate::policy::Refusal;

impl Mirror for Endpoints {
    const KIND: &'static str = "Endpoints";

    fn wanted(ctx: &Context, v: &Self) -> bool {
        let (ns, name) = crate::informer::key_of(v);
        if ns == "default" && name == "kubernetes" {
            return false;
        }
        let svc: Option<std::sync::Arc<Service>> = ctx.stores.virt::<Service>().get(&ObjectRef::new(&name).within(&ns));
        svc.is_some_and(|s| s.spec.as_ref().is_some_and(|sp| sp.selector.as_ref().is_none_or(|m| m.is_empty())))
    }

    fn host_copy(ctx: &Context, v: &Self) -> Result<Self, Refusal> {
        let mut subsets = v.subsets.clone();
        for s in subsets.iter_mut().flatten() {
            for a in s.addresses.iter_mut().flatten().chain(s.not_ready_addresses.iter_mut().flatten()) {
                // References to virtual objects mean nothing on the host.
                a.target_ref = None;
                a.node_name = None;
            }
        }
        Ok(Endpoints { metadata: ctx.tr.host_meta(Self::KIND, &v.metadata), subsets })
    }

    fn differs(d: &Self, c: &Self) -> bool {
        meta_differs(d, c) || d.subsets != c.subsets
    }
}
