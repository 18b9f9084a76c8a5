//! Pod status as kubelet computes it: the phase from the containers' states, and the
//! conditions, whose transition times only move when their status does.

use k8s_openapi::api::core::v1::{ContainerStatus, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The conditions kubelet owns; any other (PodScheduled, DisruptionTarget, readiness gates)
/// belongs to someone else and is kept as it is.
const OWN_CONDITIONS: [&str; 4] = [
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
];

/// kubelet's pod phase from its containers' statuses (`getPhase`): Pending while a container
/// has not started yet; Running while one runs or will be restarted; once all have stopped
/// for good, Succeeded if all exited 0, else Failed.
pub(crate) fn phase(restart_policy: &str, statuses: &[ContainerStatus]) -> &'static str {
    let (mut pending, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for status in statuses {
        let state = status.state.as_ref();
        let last = status
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref());
        if state.is_some_and(|s| s.running.is_some()) {
            running += 1;
        } else if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()).or(last) {
            stopped += 1;
            succeeded += usize::from(terminated.exit_code == 0);
        } else {
            pending += 1;
        }
    }
    if pending > 0 || statuses.is_empty() {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    match restart_policy {
        "Never" if stopped == succeeded => "Succeeded",
        "Never" => "Failed",
        "OnFailure" if stopped == succeeded => "Succeeded",
        _ => "Running",
    }
}

/// The pod's conditions: `ours` (kubelet's) replace those of the same type in `existing`,
/// keeping their `lastTransitionTime` when the status is unchanged; the others stay.
pub(crate) fn merge_conditions(
    existing: &[PodCondition],
    ours: Vec<PodCondition>,
) -> Vec<PodCondition> {
    let now = Time(Timestamp::now());
    let mut out: Vec<PodCondition> = existing
        .iter()
        .filter(|c| !OWN_CONDITIONS.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    for mut condition in ours {
        let before = existing.iter().find(|c| c.type_ == condition.type_);
        condition.last_transition_time = match before {
            Some(b) if b.status == condition.status => b.last_transition_time.clone(),
            _ => Some(now.clone()),
        };
        out.push(condition);
    }
    out
}

/// A condition of ours (its transition time is filled in by [`merge_conditions`]).
pub(crate) fn condition(
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.map(str::to_owned),
        message,
        ..PodCondition::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(state: serde_json::Value, last: Option<serde_json::Value>) -> ContainerStatus {
        serde_json::from_value(json!({
            "name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": state, "lastState": last.unwrap_or(json!({})),
        }))
        .unwrap()
    }

    #[test]
    fn phases_follow_kubelet() {
        let running = status(json!({"running": {}}), None);
        let creating = status(json!({"waiting": {"reason": "ContainerCreating"}}), None);
        let ok = status(json!({"terminated": {"exitCode": 0}}), None);
        let failed = status(json!({"terminated": {"exitCode": 1}}), None);
        let backoff = status(
            json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            Some(json!({"terminated": {"exitCode": 1}})),
        );
        assert_eq!(
            phase("Always", &[running.clone(), creating.clone()]),
            "Pending"
        );
        assert_eq!(phase("Always", &[running.clone(), ok.clone()]), "Running");
        assert_eq!(phase("Always", std::slice::from_ref(&backoff)), "Running");
        assert_eq!(phase("Never", &[ok.clone(), failed.clone()]), "Failed");
        assert_eq!(phase("Never", std::slice::from_ref(&ok)), "Succeeded");
        assert_eq!(phase("OnFailure", std::slice::from_ref(&ok)), "Succeeded");
        assert_eq!(phase("OnFailure", &[backoff]), "Running");
    }

    #[test]
    fn transition_times_move_with_the_status_only() {
        let then = Time("2020-01-01T00:00:00Z".parse().unwrap());
        let existing = vec![
            PodCondition {
                last_transition_time: Some(then.clone()),
                ..condition("Ready", true, None, None)
            },
            PodCondition {
                last_transition_time: Some(then.clone()),
                ..condition("PodScheduled", true, None, None)
            },
            PodCondition {
                last_transition_time: Some(then.clone()),
                ..condition("ContainersReady", true, None, None)
            },
        ];
        let merged = merge_conditions(
            &existing,
            vec![
                condition("Ready", true, None, None),
                condition("ContainersReady", false, None, None),
            ],
        );
        let get = |t: &str| merged.iter().find(|c| c.type_ == t).unwrap();
        assert_eq!(get("PodScheduled").last_transition_time, Some(then.clone()));
        assert_eq!(get("Ready").last_transition_time, Some(then.clone()));
        assert_ne!(get("ContainersReady").last_transition_time, Some(then));
    }
}
