//! What every group of hostile cases uses: host-side views of a virtual cluster and its events.
#![allow(dead_code)] // each group uses part of the common helpers

use k8s_openapi::api::core::v1::Event;
use vkube_e2e::VirtualCluster;
use vkube_syncer::naming::Translator;

pub fn tr(vc: &VirtualCluster) -> Translator {
    vc.translator()
}

/// Waits for a Warning event on virtual object `object` in `ns` whose message contains `needle`.
pub async fn warned(vc: &VirtualCluster, ns: &str, object: &str, needle: &str) -> Event {
    vc.warned(ns, object, needle).await
}
