//! Objects kept in a store as their metadata plus the rest as compact JSON.
//!
//! k8s-openapi's structs hold every optional field inline: a one-container Pod takes about 18 KB
//! of memory as a struct and about 2 KB as JSON. The syncer keeps every pod twice (virtual and
//! host) and reads each one only when it reconciles it, so the stores keep them compact and the
//! reconcile expands the one it works on (tens of microseconds).

use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `K` as stored: metadata parsed (keys, owners and labels are read often), the rest as JSON.
pub struct Compact<K> {
    pub metadata: ObjectMeta,
    body: Box<str>,
    kind: PhantomData<fn() -> K>,
}

// By hand: derived impls would ask the same of `K`.
impl<K> Clone for Compact<K> {
    fn clone(&self) -> Self {
        Compact { metadata: self.metadata.clone(), body: self.body.clone(), kind: PhantomData }
    }
}

impl<K> std::fmt::Debug for Compact<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compact").field("metadata", &self.metadata).field("body", &self.body).finish()
    }
}

/// How an informer keeps the objects it watches: as they are, or compact.
pub trait StoredAs<K>: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static {
    fn store(obj: K) -> Self;
    fn load(&self) -> K;
}

impl<K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static> StoredAs<K> for K {
    fn store(obj: K) -> Self {
        obj
    }
    fn load(&self) -> K {
        self.clone()
    }
}

impl<K> Compact<K>
where
    K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned,
{
    pub fn new(mut obj: K) -> Self {
        let metadata = std::mem::take(obj.metadata_mut());
        let body = serde_json::to_string(&obj).expect("a k8s-openapi object serializes").into_boxed_str();
        Compact { metadata, body, kind: PhantomData }
    }

    /// The whole object again.
    pub fn load(&self) -> K {
        let mut obj: K = serde_json::from_str(&self.body).expect("written by `new` from the same type");
        *obj.metadata_mut() = self.metadata.clone();
        obj
    }
}

impl<K> StoredAs<K> for Compact<K>
where
    K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned + 'static,
{
    fn store(obj: K) -> Self {
        Compact::new(obj)
    }
    fn load(&self) -> K {
        Compact::load(self)
    }
}

impl<K: k8s_openapi::Resource> k8s_openapi::Resource for Compact<K> {
    const API_VERSION: &'static str = K::API_VERSION;
    const GROUP: &'static str = K::GROUP;
    const KIND: &'static str = K::KIND;
    const VERSION: &'static str = K::VERSION;
    const URL_PATH_SEGMENT: &'static str = K::URL_PATH_SEGMENT;
    type Scope = K::Scope;
}

impl<K: k8s_openapi::Resource> k8s_openapi::Metadata for Compact<K> {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;

    #[test]
    fn a_compact_pod_loads_back_equal_and_is_smaller() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "default", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx", "env": [{"name": "A", "value": "1"}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }))
        .unwrap();
        let compact = Compact::new(pod.clone());
        assert_eq!(compact.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(compact.load(), pod);
        assert!(compact.body.len() < 300, "{}", compact.body);
        assert!(std::mem::size_of::<Compact<Pod>>() < std::mem::size_of::<Pod>() / 2);
        assert_eq!(<Compact<Pod> as kube::Resource>::kind(&()), "Pod");
    }
}
