//! What flows back from the host pod to the virtual one (pure).

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The status the virtual pod should show for its host copy: the host's, restricted to the
/// virtual pod's containers, without what only makes sense on the host. `host_current` says the
/// host copy already carries the virtual pod's spec (nothing was written to it just now).
pub fn virtual_status(host: &Pod, virtual_pod: &Pod, host_current: bool) -> PodStatus {
    let mut s = host.status.clone().unwrap_or_default();
    // Generations are each object's own: the host kubelet observing the host copy's current
    // generation means the virtual pod's current one is observed, if the copy carries its spec;
    // otherwise what the virtual pod showed stays.
    let observed = |g: Option<i64>| -> Option<i64> {
        let caught_up = host_current && g.is_some() && g >= host.metadata.generation;
        if caught_up { virtual_pod.metadata.generation } else { None }
    };
    let shown = virtual_pod.status.as_ref().and_then(|v| v.observed_generation);
    s.observed_generation = observed(s.observed_generation).or(shown);
    // Each condition as its own writer observed it: one not refreshed keeps what it showed.
    let shown_for = |t: &str| {
        let own = virtual_pod.status.as_ref().and_then(|v| v.conditions.as_ref());
        own.into_iter().flatten().find(|c| c.type_ == t).and_then(|c| c.observed_generation)
    };
    // The host kubelet's words, without the node's figures, and naming the pod as the tenant
    // knows it (an eviction for node pressure names the pod: "Pod <host name> was using ...").
    let (hm, vm) = (&host.metadata, &virtual_pod.metadata);
    let kubelet_words = |m: &str| {
        let name = |o: &Option<String>| o.clone().unwrap_or_default();
        let m = vkube_core::naming::names_back(
            m,
            &name(&hm.namespace),
            &name(&hm.name),
            &name(&vm.namespace),
            &name(&vm.name),
        );
        vkube_core::policy::scheduling::host_kubelet_message(&m)
    };
    for c in s.conditions.iter_mut().flatten() {
        if c.observed_generation.is_some() {
            c.observed_generation = observed(c.observed_generation).or_else(|| shown_for(&c.type_));
        }
        // Why the host scheduler does not place it, without the host's node counts and taints.
        // (A scheduling gate is the tenant's own; any other reason is the host scheduler's.)
        if c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() != Some("SchedulingGated") {
            c.message = c.message.as_deref().map(vkube_core::policy::scheduling::host_scheduling_message);
        }
        // Why the host kubelet evicted it, without the node's figures.
        if c.type_ == DISRUPTION_TARGET {
            c.message = c.message.as_deref().map(kubelet_words);
        }
    }
    // Why the host kubelet refused (a pod bound to its node) or evicted it, without the node's
    // figures.
    s.message = s.message.as_deref().map(kubelet_words);
    let spec = virtual_pod.spec.as_ref();
    let names = |list: Option<Vec<String>>| list.unwrap_or_default();
    let containers = names(spec.map(|s| s.containers.iter().map(|c| c.name.clone()).collect()));
    let init = names(spec.and_then(|s| s.init_containers.as_ref()).map(|l| l.iter().map(|c| c.name.clone()).collect()));
    let ephemeral =
        names(spec.and_then(|s| s.ephemeral_containers.as_ref()).map(|l| l.iter().map(|c| c.name.clone()).collect()));
    let keep = |list: Option<Vec<ContainerStatus>>, allowed: &[String]| {
        list.map(|l| l.into_iter().filter(|c| allowed.contains(&c.name)).collect::<Vec<_>>())
    };
    s.container_statuses = keep(s.container_statuses.take(), &containers);
    s.init_container_statuses = keep(s.init_container_statuses.take(), &init);
    s.ephemeral_container_statuses = keep(s.ephemeral_container_statuses.take(), &ephemeral);
    s.nominated_node_name = None;
    s.resource_claim_statuses = None;
    // The virtual pod's own class, which its API server fixed at creation (immutable): the host
    // copy's may differ when a host LimitRange gave it requests the tenant did not write.
    s.qos_class = virtual_pod.status.as_ref().and_then(|v| v.qos_class.clone());
    // Readiness-gate conditions are the tenant's: kept as the tenant set them.
    let gates = gate_types(virtual_pod);
    let own = virtual_pod.status.as_ref().and_then(|v| v.conditions.as_ref());
    let mut conditions: Vec<PodCondition> =
        s.conditions.take().unwrap_or_default().into_iter().filter(|c| !gates.contains(&c.type_)).collect();
    conditions.extend(own.into_iter().flatten().filter(|c| gates.contains(&c.type_)).cloned());
    // A disruption the virtual cluster's control plane recorded (an eviction through its API, its
    // taint manager) stays unless the host records one of its own: a Job's pod failure policy
    // reads it once the pod has failed.
    if !conditions.iter().any(|c| c.type_ == DISRUPTION_TARGET) {
        conditions.extend(own.into_iter().flatten().filter(|c| c.type_ == DISRUPTION_TARGET).cloned());
    }
    s.conditions = (!conditions.is_empty()).then_some(conditions);
    s
}

/// The status a bound pod gets when its host copy is gone while it is being deleted or lost: a
/// terminal phase, so the controllers counting it (a Job with a pod failure policy waits for one)
/// can let it go. None if it has one already.
/// - Deleted (`lost` false): as a kubelet gives a pod it stopped (`TerminatePod`): containers not
///   known to have terminated read as a kubelet reads a container it cannot find (once the pod
///   has initialized), and so do init containers up to the last one that started.
/// - Lost (the copy went while the virtual pod was not deleted: evicted or deleted on the host,
///   its status not seen): as pod GC gives a pod whose node is gone, with a DisruptionTarget
///   condition (a Job's pod failure policy may ignore disruptions).
pub fn stopped(virtual_pod: &Pod, lost: bool) -> Option<PodStatus> {
    let mut status = virtual_pod.status.clone().unwrap_or_default();
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status.phase = Some("Failed".into());
    if lost {
        let conditions = status.conditions.get_or_insert_with(Vec::new);
        // One it showed (the host's eviction, mirrored before the copy went) says more.
        if conditions.iter().any(|c| c.type_ == DISRUPTION_TARGET && c.status == "True") {
            return Some(status);
        }
        conditions.retain(|c| c.type_ != DISRUPTION_TARGET);
        conditions.push(PodCondition {
            type_: DISRUPTION_TARGET.into(),
            status: "True".into(),
            reason: Some("DeletionByPodGC".into()),
            message: Some("PodGC: the pod's copy on the host no longer exists".into()),
            last_transition_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        });
        return Some(status);
    }
    let unknown = || ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: 137,
            reason: Some("ContainerStatusUnknown".into()),
            message: Some("The container could not be located when the pod was terminated".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let terminated = |c: &ContainerStatus| c.state.as_ref().is_some_and(|s| s.terminated.is_some());
    let waiting = |c: &ContainerStatus| c.state.as_ref().is_some_and(|s| s.waiting.is_some());
    let ever_ended = |c: &ContainerStatus| c.last_state.as_ref().is_some_and(|s| s.terminated.is_some());
    let init_specs = virtual_pod.spec.as_ref().and_then(|s| s.init_containers.as_deref()).unwrap_or_default();
    let inits = status.init_container_statuses.as_deref().unwrap_or_default();
    // Initialized: no init containers, a container out of waiting, or the last init container
    // done (a restartable one started).
    let last_init_done = inits.last().is_some_and(|c| {
        let restartable = init_specs.iter().any(|s| s.name == c.name && s.restart_policy.as_deref() == Some("Always"));
        let state = c.state.as_ref();
        if restartable {
            c.started == Some(true) && state.is_some_and(|s| s.running.is_some())
        } else {
            let succeeded =
                |s: Option<&ContainerState>| s.and_then(|s| s.terminated.as_ref()).is_some_and(|t| t.exit_code == 0);
            succeeded(state) || succeeded(c.last_state.as_ref())
        }
    });
    let initialized = init_specs.is_empty()
        || status.container_statuses.iter().flatten().any(|c| !waiting(c) || ever_ended(c))
        || last_init_done;
    if initialized {
        for c in status.container_statuses.iter_mut().flatten().filter(|c| !terminated(c)) {
            c.state = Some(unknown());
        }
    }
    // What it showed may be older than the kubelet's last word (which a kubelet writes first).
    for c in status.container_statuses.iter_mut().flatten() {
        c.ready = false;
        c.started = c.started.map(|_| false);
    }
    for c in status.conditions.iter_mut().flatten().filter(|c| c.type_ == "Ready" || c.type_ == "ContainersReady") {
        c.status = "False".into();
        c.reason = Some("PodCompleted".into());
    }
    // All init containers up to the last one with evidence of a start (at least the first).
    let started = inits.iter().rposition(|c| !waiting(c) || ever_ended(c)).unwrap_or(0);
    for c in status.init_container_statuses.iter_mut().flatten().take(started + 1).filter(|c| !terminated(c)) {
        c.state = Some(unknown());
    }
    Some(status)
}

const DISRUPTION_TARGET: &str = "DisruptionTarget";

/// Condition types the host's kubelet and controllers own: a readiness gate naming one (the API
/// server allows it) is not the tenant's to set on the host copy, where it would fight the
/// kubelet and make a pod that is not ready look ready.
const HOST_OWNED_CONDITIONS: &[&str] = &[
    "Ready",
    "ContainersReady",
    "Initialized",
    "PodScheduled",
    "PodReadyToStartContainers",
    DISRUPTION_TARGET,
    "PodResizePending",
    "PodResizeInProgress",
];

/// The condition types a pod's readiness gates name: set by the tenant's controllers on the
/// virtual pod, carried to the host copy so the host's kubelet counts them.
pub fn gate_types(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.readiness_gates.iter().flatten())
        .map(|g| g.condition_type.clone())
        .filter(|t| !HOST_OWNED_CONDITIONS.contains(&t.as_str()))
        .collect()
}

/// The gate conditions the host copy lacks or has otherwise than the virtual pod (timestamps
/// aside), for a patch of the host copy's status; empty when they agree.
pub fn gates_down(virtual_pod: &Pod, host: &Pod) -> Vec<PodCondition> {
    let gates = gate_types(virtual_pod);
    let conditions = |p: &Pod| p.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    let on_host = conditions(host);
    conditions(virtual_pod)
        .into_iter()
        .filter(|c| gates.contains(&c.type_))
        .filter(|c| !on_host.iter().any(|h| h.type_ == c.type_ && h.status == c.status && h.reason == c.reason))
        .collect()
}

/// Whether the virtual pod's status differs from what it should be in substance: condition
/// timestamps alone do not count (the binding sets PodScheduled on the virtual pod a moment
/// after the host's scheduler did on the host copy; rewriting it would be a write per pod for
/// nothing).
pub fn differs(current: Option<&PodStatus>, desired: &PodStatus) -> bool {
    normalized(current.cloned().unwrap_or_default()) != normalized(desired.clone())
}

fn normalized(mut s: PodStatus) -> PodStatus {
    for c in s.conditions.iter_mut().flatten() {
        c.last_probe_time = None;
        c.last_transition_time = None;
    }
    if let Some(cs) = s.conditions.as_mut() {
        cs.sort_by(|a, b| a.type_.cmp(&b.type_));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_virtual_containers_and_no_host_scheduling_hints() {
        let host: Pod = serde_json::from_value(serde_json::json!({
            "status": {"phase": "Running", "podIP": "10.244.0.5", "hostIP": "10.0.0.1", "nominatedNodeName": "n",
                "containerStatuses": [
                    {"name": "app", "ready": true, "restartCount": 0, "image": "nginx", "imageID": ""},
                    {"name": "injected-by-host", "ready": true, "restartCount": 0, "image": "x", "imageID": ""}]}
        }))
        .unwrap();
        let virtual_pod: Pod =
            serde_json::from_value(serde_json::json!({"spec": {"containers": [{"name": "app"}]}})).unwrap();
        let s = virtual_status(&host, &virtual_pod, true);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.0.5"));
        assert_eq!(s.nominated_node_name, None);
        let names: Vec<&str> = s.container_statuses.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["app"]);
        let pending: Pod = serde_json::from_value(serde_json::json!({"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/9 nodes are available: 9 Insufficient memory. preemption: 0/9 nodes are available: 9 No preemption victims found for incoming pod."}]}}))
        .unwrap();
        let why = virtual_status(&pending, &virtual_pod, true).conditions.unwrap()[0].message.clone();
        assert_eq!(why.as_deref(), Some("0 nodes are available: Insufficient memory."), "no host node count");
        assert!(differs(None, &s));
        assert!(!differs(Some(&s), &s));
        let cond = |t: &str, status: &str| {
            serde_json::from_value(
                serde_json::json!({"type": "PodScheduled", "status": status, "lastTransitionTime": t}),
            )
            .unwrap()
        };
        let (mut earlier, mut later) = (s.clone(), s.clone());
        earlier.conditions = Some(vec![cond("2026-01-01T00:00:00Z", "True")]);
        later.conditions = Some(vec![cond("2026-01-01T00:00:01Z", "True")]);
        assert!(!differs(Some(&earlier), &later), "timestamps alone are no difference");
        later.conditions = Some(vec![cond("2026-01-01T00:00:01Z", "False")]);
        assert!(differs(Some(&earlier), &later));
    }

    #[test]
    fn a_kubelet_refusal_names_the_resource_not_the_nodes_figures() {
        let host: Pod = serde_json::from_value(serde_json::json!({"status": {"phase": "Failed", "reason": "OutOfcpu",
            "message": "Pod was rejected: Node didn't have enough resource: cpu, requested: 1500, used: 1900, capacity: 2000"}}))
        .unwrap();
        let virtual_pod: Pod = serde_json::from_value(serde_json::json!({"spec": {"containers": []}})).unwrap();
        let s = virtual_status(&host, &virtual_pod, true);
        assert_eq!((s.phase.as_deref(), s.reason.as_deref()), (Some("Failed"), Some("OutOfcpu")));
        assert_eq!(s.message.as_deref(), Some("Pod was rejected: Node didn't have enough resource: cpu"));

        let evicted: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "web-1-x-shop-x-team"},
            "status": {"phase": "Failed", "reason": "Evicted",
                "message": "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi. Pod web-1-x-shop-x-team was using 200Mi, request is 0, has larger consumption of memory. ",
                "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                    "message": "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi. "}]}}))
        .unwrap();
        let mut own = virtual_pod.clone();
        own.metadata.name = Some("web-1".into());
        let s = virtual_status(&evicted, &own, true);
        assert_eq!(
            s.message.as_deref(),
            Some(
                "The node was low on resource: memory. Pod web-1 was using 200Mi, request is 0, has larger consumption of memory. "
            )
        );
        assert_eq!(s.conditions.unwrap()[0].message.as_deref(), Some("The node was low on resource: memory. "));
    }

    #[test]
    fn a_disruption_recorded_in_the_virtual_cluster_stays() {
        let pod = |conditions: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"spec": {"containers": []},
                "status": {"phase": "Running", "conditions": conditions}}))
            .unwrap()
        };
        let evicted = pod(serde_json::json!([{"type": "Ready", "status": "True"},
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]));
        let host = pod(serde_json::json!([{"type": "Ready", "status": "True"}]));
        let s = virtual_status(&host, &evicted, true);
        let reasons: Vec<_> = s.conditions.unwrap().into_iter().map(|c| (c.type_, c.reason)).collect();
        assert_eq!(
            reasons,
            [("Ready".into(), None), ("DisruptionTarget".into(), Some("EvictionByEvictionAPI".into()))]
        );
        let host_own =
            pod(serde_json::json!([{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}]));
        let s = virtual_status(&host_own, &evicted, true);
        let reasons: Vec<_> = s.conditions.unwrap().into_iter().map(|c| c.reason.unwrap_or_default()).collect();
        assert_eq!(reasons, ["TerminationByKubelet"], "the host's own, when it records one");
    }

    #[test]
    fn a_pod_stopped_without_its_copy_gets_a_terminal_phase() {
        let pod = |phase: &str| -> Pod {
            serde_json::from_value(serde_json::json!({"status": {"phase": phase, "containerStatuses": [
                {"name": "app", "ready": true, "restartCount": 0, "image": "x", "imageID": "", "started": true,
                 "state": {"running": {"startedAt": "2026-12-06T09:00:00Z"}}},
                {"name": "done", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
                 "state": {"terminated": {"exitCode": 0}}}]}}))
            .unwrap()
        };
        let s = stopped(&pod("Running"), false).expect("not terminal yet");
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert!(s.conditions.is_none(), "a deletion is no disruption");
        let cs = s.container_statuses.unwrap();
        let app = cs[0].state.as_ref().and_then(|s| s.terminated.as_ref()).unwrap();
        assert_eq!((app.exit_code, app.reason.as_deref()), (137, Some("ContainerStatusUnknown")));
        assert_eq!(cs[1].state.as_ref().and_then(|s| s.terminated.as_ref()).map(|t| t.exit_code), Some(0));
        assert_eq!(stopped(&pod("Failed"), false), None);
        assert_eq!(stopped(&pod("Succeeded"), true), None);

        // Lost: as pod GC marks a pod whose node is gone, its containers as they were.
        let s = stopped(&pod("Running"), true).expect("not terminal yet");
        let c = &s.conditions.as_ref().unwrap()[0];
        assert_eq!((c.type_.as_str(), c.reason.as_deref()), ("DisruptionTarget", Some("DeletionByPodGC")));
        assert_eq!(
            (s.phase.as_deref(), s.container_statuses),
            (Some("Failed"), pod("x").status.unwrap().container_statuses)
        );

        // Not initialized: its containers never started and are left as they are; the init
        // containers up to the last that started read as stopped.
        let initializing: Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [], "initContainers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]},
            "status": {"phase": "Pending",
                "initContainerStatuses": [
                    {"name": "a", "ready": false, "restartCount": 0, "image": "x", "imageID": "", "state": {"terminated": {"exitCode": 0}}},
                    {"name": "b", "ready": false, "restartCount": 0, "image": "x", "imageID": "", "state": {"running": {}}},
                    {"name": "c", "ready": false, "restartCount": 0, "image": "x", "imageID": "", "state": {"waiting": {}}}],
                "containerStatuses": [
                    {"name": "app", "ready": false, "restartCount": 0, "image": "x", "imageID": "", "state": {"waiting": {"reason": "PodInitializing"}}}]}}))
        .unwrap();
        let s = stopped(&initializing, false).unwrap();
        let exit = |l: &Option<Vec<ContainerStatus>>| -> Vec<Option<i32>> {
            l.iter()
                .flatten()
                .map(|c| c.state.as_ref().and_then(|s| s.terminated.as_ref()).map(|t| t.exit_code))
                .collect()
        };
        assert_eq!(exit(&s.init_container_statuses), [Some(0), Some(137), None]);
        assert_eq!(exit(&s.container_statuses), [None]);
    }

    #[test]
    fn generations_observed_are_the_virtual_pods() {
        let host: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"generation": 5},
            "status": {"observedGeneration": 5, "conditions": [{"type": "Ready", "status": "True", "observedGeneration": 5}]}
        }))
        .unwrap();
        let virtual_pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"generation": 2}, "spec": {"containers": []}, "status": {"observedGeneration": 1}
        }))
        .unwrap();
        let s = virtual_status(&host, &virtual_pod, true);
        assert_eq!(s.observed_generation, Some(2), "the host copy is current and observed");
        assert_eq!(s.conditions.unwrap()[0].observed_generation, Some(2));
        // Just patched (the host copy in hand is older), or the kubelet is behind: not yet.
        assert_eq!(virtual_status(&host, &virtual_pod, false).observed_generation, Some(1));
        let mut behind = host.clone();
        behind.metadata.generation = Some(6);
        assert_eq!(virtual_status(&behind, &virtual_pod, true).observed_generation, Some(1));
        // A condition its writer has not refreshed keeps its own, not the pod's.
        let mut stale = host.clone();
        stale.metadata.generation = Some(6);
        stale.status.as_mut().unwrap().observed_generation = Some(6);
        let mut shown = virtual_pod.clone();
        shown.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(serde_json::json!({"type": "Ready", "status": "True", "observedGeneration": 1}))
                .unwrap(),
        ]);
        let s = virtual_status(&stale, &shown, true);
        assert_eq!((s.observed_generation, s.conditions.unwrap()[0].observed_generation), (Some(2), Some(1)));
    }

    #[test]
    fn the_virtual_pods_qos_class_and_gate_conditions_are_its_own() {
        let host: Pod = serde_json::from_value(serde_json::json!({
            "status": {"phase": "Running", "qosClass": "Burstable", "conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "example.com/lb", "status": "False", "reason": "NotYet"}]}
        }))
        .unwrap();
        let virtual_pod: Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "app"}], "readinessGates": [{"conditionType": "example.com/lb"}]},
            "status": {"phase": "Pending", "qosClass": "BestEffort", "conditions": [
                {"type": "example.com/lb", "status": "True"}, {"type": "PodScheduled", "status": "True"}]}
        }))
        .unwrap();
        let s = virtual_status(&host, &virtual_pod, true);
        assert_eq!(s.qos_class.as_deref(), Some("BestEffort"), "immutable on the virtual pod");
        let conds: Vec<(&str, &str)> =
            s.conditions.iter().flatten().map(|c| (c.type_.as_str(), c.status.as_str())).collect();
        assert_eq!(conds, vec![("Ready", "False"), ("example.com/lb", "True")]);
        let down = gates_down(&virtual_pod, &host);
        assert_eq!(down.len(), 1);
        assert_eq!((down[0].type_.as_str(), down[0].status.as_str()), ("example.com/lb", "True"));
        let mut synced = host.clone();
        synced.status.as_mut().unwrap().conditions = Some(down);
        assert!(gates_down(&virtual_pod, &synced).is_empty());

        // A gate on a condition the kubelet owns is not the tenant's to set on the host.
        let spoof: Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "app"}], "readinessGates": [{"conditionType": "Ready"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        assert!(gates_down(&spoof, &host).is_empty());
        let s = virtual_status(&host, &spoof, true);
        assert_eq!(s.conditions.unwrap()[0].status, "False", "the host's Ready, not the tenant's");
    }
}
