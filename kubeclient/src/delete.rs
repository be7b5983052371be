//! Deletes that hit exactly the object that was read, never a replacement of the same name.

use kube::api::{Api, DeleteParams, ObjectMeta, Preconditions};

/// Which version of the object a delete must find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exactly {
    /// The same object (uid): any later write to it is fine.
    Object,
    /// The same object as read (uid and resourceVersion).
    AsRead,
}

/// Deletes the object `meta` describes, with `grace` seconds if given. `Ok(true)` when deleted,
/// `Ok(false)` when it was already gone or is not that object any more (404, 409).
pub async fn delete_exactly<K>(
    api: &Api<K>,
    meta: &ObjectMeta,
    grace: Option<u32>,
    exactly: Exactly,
) -> Result<bool, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        grace_period_seconds: grace,
        preconditions: Some(Preconditions {
            uid: meta.uid.clone(),
            resource_version: if exactly == Exactly::AsRead { meta.resource_version.clone() } else { None },
        }),
        ..Default::default()
    };
    match api.delete(meta.name.as_deref().unwrap_or_default(), &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
