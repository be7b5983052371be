//! The writes that bring an existing host pod in line with its virtual pod, as typed
//! strategic-merge patches (pure): each says exactly what it changes, and nothing when nothing
//! differs.

use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Serialize;
use vkube_kubeclient::patch::{MapPatch, MetaPatch, map_change, map_patch};

/// The mutable fields of a host pod: labels, annotations, images, deadline, tolerations and
/// scheduling gates.
#[derive(Serialize, Debug, Default, PartialEq)]
pub struct PodPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetaPatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<SpecPatch>,
}

#[derive(Serialize, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SpecPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containers: Option<Vec<ImagePatch>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_containers: Option<Vec<ImagePatch>>,
    /// `Some(None)` removes the deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<Option<i64>>,
    /// The whole list: the host's plus what is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Replaces the list (which merges by name), so removed gates go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduling_gates: Option<Replace<Gate>>,
}

/// A container (merged by name) given a new image.
#[derive(Serialize, Debug, PartialEq)]
pub struct ImagePatch {
    pub name: String,
    pub image: Option<String>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct Gate {
    pub name: String,
}

/// A list that replaces the one on the server whole: strategic merge's `{"$patch": "replace"}`
/// directive, then the items.
#[derive(Debug, PartialEq)]
pub struct Replace<T>(pub Vec<T>);

impl<T: Serialize> Serialize for Replace<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        #[derive(Serialize)]
        struct Directive {
            #[serde(rename = "$patch")]
            patch: &'static str,
        }
        let mut seq = s.serialize_seq(Some(self.0.len() + 1))?;
        seq.serialize_element(&Directive { patch: "replace" })?;
        for item in &self.0 {
            seq.serialize_element(item)?;
        }
        seq.end()
    }
}

/// A patch of the `resize` subresource: containers (merged by name) given new resources.
#[derive(Serialize, Debug, Default, PartialEq)]
pub struct ResizePatch {
    pub spec: ResizeSpec,
}

#[derive(Serialize, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResizeSpec {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ResourcesPatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<ResourcesPatch>,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct ResourcesPatch {
    pub name: String,
    pub resources: ResourcesChange,
}

#[derive(Serialize, Debug, PartialEq)]
pub struct ResourcesChange {
    pub requests: MapPatch<Quantity>,
    pub limits: MapPatch<Quantity>,
}

/// A patch of the `ephemeralcontainers` subresource adding containers (`kubectl debug`).
#[derive(Serialize, Debug, PartialEq)]
pub struct EphemeralPatch {
    pub spec: EphemeralSpec,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EphemeralSpec {
    pub ephemeral_containers: Vec<EphemeralContainer>,
}

/// Gives the host pod the mutable fields of `desired`, if any differ.
pub fn host_pod_patch(desired: &Pod, current: &Pod) -> Option<PodPatch> {
    let meta = MetaPatch {
        labels: map_change(desired.metadata.labels.as_ref(), current.metadata.labels.as_ref()),
        annotations: map_change(desired.metadata.annotations.as_ref(), current.metadata.annotations.as_ref()),
    };
    let (ds, cs) = (desired.spec.clone().unwrap_or_default(), current.spec.clone().unwrap_or_default());
    let images = |want: &[Container], have: &[Container]| {
        let changed: Vec<ImagePatch> = want
            .iter()
            .filter(|d| have.iter().find(|c| c.name == d.name).is_some_and(|c| c.image != d.image))
            .map(|d| ImagePatch { name: d.name.clone(), image: d.image.clone() })
            .collect();
        (!changed.is_empty()).then_some(changed)
    };
    // Tolerations can only be added (the host refuses a removal, and its own admission may have
    // added some): send the current list plus what is missing, if anything is.
    let have = cs.tolerations.clone().unwrap_or_default();
    let missing: Vec<_> = ds.tolerations.iter().flatten().filter(|t| !have.contains(t)).cloned().collect();
    let gates = |s: &k8s_openapi::api::core::v1::PodSpec| {
        s.scheduling_gates.iter().flatten().map(|g| Gate { name: g.name.clone() }).collect::<Vec<_>>()
    };
    let spec = SpecPatch {
        containers: images(&ds.containers, &cs.containers),
        init_containers: images(
            ds.init_containers.as_deref().unwrap_or_default(),
            cs.init_containers.as_deref().unwrap_or_default(),
        ),
        active_deadline_seconds: (ds.active_deadline_seconds != cs.active_deadline_seconds)
            .then_some(ds.active_deadline_seconds),
        tolerations: (!missing.is_empty()).then(|| have.into_iter().chain(missing).collect()),
        scheduling_gates: (gates(&ds) != gates(&cs)).then(|| Replace(gates(&ds))),
    };
    let meta = (!meta.is_empty()).then_some(meta);
    let spec = (spec != SpecPatch::default()).then_some(spec);
    (meta.is_some() || spec.is_some()).then_some(PodPatch { metadata: meta, spec })
}

/// Gives the host pod's containers the cpu and memory of `desired`'s, if any differ (the only
/// resources a resize may change; others the host copy may lack on purpose: resources its node
/// does not have, taken out at creation). Requests and limits that are gone are removed.
pub fn resize_patch(desired: &Pod, current: &Pod) -> Option<ResizePatch> {
    let resizable = |r: Option<&ResourceRequirements>| {
        let mut r = r.cloned().unwrap_or_default();
        super::translate::keep_resources(&mut r, |name| name == "cpu" || name == "memory");
        r
    };
    let changed = |want: &[Container], have: &[Container]| -> Vec<ResourcesPatch> {
        want.iter()
            .filter_map(|d| {
                let c = have.iter().find(|c| c.name == d.name)?;
                let (dr, cr) = (resizable(d.resources.as_ref()), resizable(c.resources.as_ref()));
                let both = |r: &ResourceRequirements| {
                    (r.requests.clone().unwrap_or_default(), r.limits.clone().unwrap_or_default())
                };
                // Each list is stated whole (unchanged entries too).
                (both(&dr) != both(&cr)).then(|| ResourcesPatch {
                    name: d.name.clone(),
                    resources: ResourcesChange {
                        requests: map_patch(dr.requests.as_ref(), cr.requests.as_ref()),
                        limits: map_patch(dr.limits.as_ref(), cr.limits.as_ref()),
                    },
                })
            })
            .collect()
    };
    let (ds, cs) = (desired.spec.clone().unwrap_or_default(), current.spec.clone().unwrap_or_default());
    let spec = ResizeSpec {
        containers: changed(&ds.containers, &cs.containers),
        // Sidecars (init containers that keep running) can be resized too.
        init_containers: changed(
            ds.init_containers.as_deref().unwrap_or_default(),
            cs.init_containers.as_deref().unwrap_or_default(),
        ),
    };
    (spec != ResizeSpec::default()).then_some(ResizePatch { spec })
}

/// Adds the desired ephemeral containers the host pod does not have yet, if there are any.
pub fn ephemeral_patch(desired: &Pod, current: &Pod) -> Option<EphemeralPatch> {
    let have: Vec<&str> =
        current.spec.iter().flat_map(|s| s.ephemeral_containers.iter().flatten()).map(|c| c.name.as_str()).collect();
    let added: Vec<_> = desired
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter(|c| !have.contains(&c.name.as_str()))
        .cloned()
        .collect();
    (!added.is_empty()).then_some(EphemeralPatch { spec: EphemeralSpec { ephemeral_containers: added } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn to_json(p: impl Serialize) -> serde_json::Value {
        serde_json::to_value(p).unwrap()
    }

    #[test]
    fn resize_patch_carries_changed_resources_only() {
        let res = |cpu: &str, mem: Option<&str>| {
            let mut requests = serde_json::json!({"cpu": cpu});
            if let Some(m) = mem {
                requests["memory"] = m.into();
            }
            serde_json::json!({"requests": requests, "limits": {"cpu": "1"}})
        };
        let with = |app: serde_json::Value, side: serde_json::Value| {
            pod(serde_json::json!({"spec": {
                "containers": [{"name": "app", "resources": app}, {"name": "other", "resources": res("1", None)}],
                "initContainers": [{"name": "side", "restartPolicy": "Always", "resources": side}]}}))
        };
        let current = with(res("100m", Some("64Mi")), res("10m", None));
        assert_eq!(resize_patch(&current, &current).map(to_json), None);
        let mut extended = res("100m", Some("64Mi"));
        extended["requests"]["example.com/slots"] = "1".into();
        assert_eq!(resize_patch(&with(extended, res("10m", None)), &current).map(to_json), None, "not resizable");
        let desired = with(res("200m", None), res("20m", None));
        assert_eq!(
            resize_patch(&desired, &current).map(to_json),
            Some(serde_json::json!({"spec": {
                "containers": [{"name": "app", "resources": {"requests": {"cpu": "200m", "memory": null}, "limits": {"cpu": "1"}}}],
                "initContainers": [{"name": "side", "resources": {"requests": {"cpu": "20m"}, "limits": {"cpu": "1"}}}],
            }}))
        );
    }

    #[test]
    fn only_new_ephemeral_containers_are_added() {
        let current =
            pod(serde_json::json!({"spec": {"containers": [{"name": "c"}], "ephemeralContainers": [{"name": "a"}]}}));
        let desired = pod(serde_json::json!({"spec": {"containers": [{"name": "c"}],
            "ephemeralContainers": [{"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox"}]}}));
        let added = ephemeral_patch(&desired, &current).unwrap().spec.ephemeral_containers;
        assert_eq!(added.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["b"]);
        assert!(ephemeral_patch(&current, &current).is_none());
    }

    #[test]
    fn only_mutable_fields_move_and_nothing_moves_when_equal() {
        let full = pod(serde_json::json!({
            "metadata": {"name": "h", "labels": {"a": "1", "old": "x"}, "resourceVersion": "7"},
            "spec": {"nodeName": "n1", "schedulingGates": [{"name": "g1"}, {"name": "g2"}],
                "containers": [{"name": "c", "image": "nginx:1", "env": [{"name": "E", "value": "v"}]}, {"name": "d", "image": "busybox"}]}}));
        let mut current = full.clone();
        crate::pods::slim_host_pod(&mut current);
        assert_eq!(current.spec.as_ref().unwrap().containers[0].env, None, "slimmed");
        assert_eq!(current.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
        assert!(host_pod_patch(&full, &current).is_none(), "a slim copy is no difference");

        let mut desired = full.clone();
        desired.spec.as_mut().unwrap().containers[0].image = Some("nginx:2".into());
        desired.spec.as_mut().unwrap().scheduling_gates =
            Some(vec![serde_json::from_value(serde_json::json!({"name": "g2"})).unwrap()]);
        desired.metadata.labels = Some([("a".to_string(), "2".to_string())].into());
        let patch = to_json(host_pod_patch(&desired, &current).unwrap());
        assert_eq!(
            patch,
            serde_json::json!({
                "metadata": {"labels": {"a": "2", "old": null}},
                "spec": {"containers": [{"name": "c", "image": "nginx:2"}],
                    "schedulingGates": [{"$patch": "replace"}, {"name": "g2"}]}})
        );
    }

    #[test]
    fn tolerations_are_only_ever_added() {
        let t = |key: &str| serde_json::json!({"key": key, "operator": "Exists"});
        let with = |keys: &[&str]| {
            pod(
                serde_json::json!({"spec": {"containers": [{"name": "c"}], "tolerations": keys.iter().map(|k| t(k)).collect::<Vec<_>>()}}),
            )
        };
        // The host's admission added one (a runtime class's): nothing to send.
        assert!(host_pod_patch(&with(&["a"]), &with(&["a", "host-added"])).is_none());
        // A new one: the host's list plus it, never a list without the host's.
        let patch = to_json(host_pod_patch(&with(&["a", "b"]), &with(&["a", "host-added"])).unwrap());
        assert_eq!(patch["spec"]["tolerations"], serde_json::json!([t("a"), t("host-added"), t("b")]));
    }
}
