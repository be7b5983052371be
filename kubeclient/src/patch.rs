//! Typed patches of what many objects share: their labels and annotations. The same body works
//! as a JSON merge patch and as a strategic-merge patch.

use std::collections::BTreeMap;

use serde::Serialize;

/// A map patch: each entry set, or removed where `None`.
pub type MapPatch<V> = BTreeMap<String, Option<V>>;

/// The labels and annotations part of a patch.
#[derive(Serialize, Debug, Default, Clone, PartialEq)]
pub struct MetaPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<MapPatch<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<MapPatch<String>>,
}

impl MetaPatch {
    pub fn is_empty(&self) -> bool {
        self.labels.is_none() && self.annotations.is_none()
    }
}

/// A patch of an object's metadata only.
#[derive(Serialize, Debug, Default, Clone, PartialEq)]
pub struct MetadataPatch {
    pub metadata: MetaPatch,
}

impl MetadataPatch {
    /// Sets (`Some`) or removes (`None`) the given annotations.
    pub fn annotations<K: Into<String>, V: Into<String>>(entries: impl IntoIterator<Item = (K, Option<V>)>) -> Self {
        MetadataPatch { metadata: MetaPatch { annotations: Some(entries_patch(entries)), labels: None } }
    }

    /// Also sets or removes the given labels.
    pub fn with_labels<K: Into<String>, V: Into<String>>(
        mut self,
        entries: impl IntoIterator<Item = (K, Option<V>)>,
    ) -> Self {
        self.metadata.labels = Some(entries_patch(entries));
        self
    }
}

fn entries_patch<K: Into<String>, V: Into<String>>(
    entries: impl IntoIterator<Item = (K, Option<V>)>,
) -> MapPatch<String> {
    entries.into_iter().map(|(k, v)| (k.into(), v.map(Into::into))).collect()
}

/// `want` as a patch of `have`: every wanted entry, and the removal of those no longer wanted.
pub fn map_patch<V: Clone>(want: Option<&BTreeMap<String, V>>, have: Option<&BTreeMap<String, V>>) -> MapPatch<V> {
    let wanted = want.into_iter().flatten().map(|(k, v)| (k.clone(), Some(v.clone())));
    let gone = have.into_iter().flatten().filter(|(k, _)| !want.is_some_and(|w| w.contains_key(*k)));
    wanted.chain(gone.map(|(k, _)| (k.clone(), None))).collect()
}

/// [`map_patch`] when `want` and `have` differ (absent and empty are the same).
pub fn map_change<V: Clone + PartialEq>(
    want: Option<&BTreeMap<String, V>>,
    have: Option<&BTreeMap<String, V>>,
) -> Option<MapPatch<V>> {
    let empty = BTreeMap::new();
    (want.unwrap_or(&empty) != have.unwrap_or(&empty)).then(|| map_patch(want, have))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_entries_are_null_and_equal_maps_no_patch() {
        let m = |e: &[(&str, &str)]| e.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        assert_eq!(map_change(Some(&m(&[("a", "1")])), None::<&BTreeMap<String, String>>).map(|p| p.len()), Some(1));
        assert_eq!(map_change(None, Some(&m(&[]))), None::<MapPatch<String>>);
        let patch = map_change(Some(&m(&[("a", "2")])), Some(&m(&[("a", "1"), ("b", "x")]))).unwrap();
        assert_eq!(serde_json::to_value(patch).unwrap(), serde_json::json!({"a": "2", "b": null}));
        let p = MetadataPatch::annotations([("k", None), ("j", Some("v"))]);
        assert_eq!(
            serde_json::to_value(p).unwrap(),
            serde_json::json!({"metadata": {"annotations": {"j": "v", "k": null}}})
        );
    }
}
