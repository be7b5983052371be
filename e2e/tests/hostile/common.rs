//! What every group of hostile cases uses: host-side views of a virtual cluster and its events.
#![allow(dead_code)] // each group uses part of the common helpers

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use vkube_e2e::{VirtualCluster, eventually};
use vkube_syncer::naming::Translator;

pub fn tr(vc: &VirtualCluster) -> Translator {
    vc.translator()
}

/// Waits for a Warning event on virtual object `object` in `ns` whose message contains `needle`.
pub async fn warned(vc: &VirtualCluster, ns: &str, object: &str, needle: &str) -> Event {
    let api: Api<Event> = Api::namespaced(vc.client().await, ns);
    let what = format!("a Warning event on {ns}/{object} containing {needle:?}");
    eventually(&what, Duration::from_secs(20), || async {
        let list = api
            .list(&ListParams::default().fields(&format!("involvedObject.name={object},type=Warning")))
            .await
            .map_err(|e| e.to_string())?
            .items;
        Ok(list.into_iter().find(|e| e.message.as_deref().is_some_and(|m| m.contains(needle))))
    })
    .await
}
