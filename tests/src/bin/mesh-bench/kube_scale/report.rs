//! The markdown report of the Kubernetes scale benchmark: `bench/results/kubernetes.md`.

use std::fmt::Write as _;

use super::enrol::{self, Enrolment, PodTimes};
use super::objects::{FAKE_NODES, NAMESPACES, PODS, SERVICES};
use super::{IDLE, KubeScale, QUIET, Restart, SETTLE, Window};
use crate::report::{date_utc, machine, median, percentile};

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn f(x: f64) -> String {
    fmt(Some(x))
}

/// The median of `f` over `items`.
fn med<T>(items: &[T], f: impl Fn(&T) -> f64) -> Option<f64> {
    median(&items.iter().map(f).collect::<Vec<_>>())
}

/// The median of `f` over the `items` it has a value for.
fn med_some<T>(items: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    median(&items.iter().filter_map(f).collect::<Vec<_>>())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The agent's CPU seconds and counters of a window, if it ran throughout.
fn agent_cpu(w: &Window) -> Option<f64> {
    w.agent.as_ref().map(|(u, _)| u.cpu_s)
}

pub fn render(m: &KubeScale) -> String {
    let mut s = String::new();
    header(&mut s, m);
    summary(&mut s, m);
    creation(&mut s, m);
    restarts(&mut s, m);
    churns(&mut s, m);
    idle(&mut s, m);
    enrolment(&mut s, m);
    control_plane(&mut s, m);
    s
}

fn header(s: &mut String, m: &KubeScale) {
    let (nproc, kernel, cpu) = machine();
    let _ = writeln!(
        s,
        "# Kubernetes scale: mesh-agent with {PODS} pods and {SERVICES} Services\n\n\
         {}; `cargo xtask bench --kubernetes` (`mesh-bench --kubernetes --reps={}`); {} \
         repetitions where marked, medians of them; run took {:.0} s (of which {:.0} s \
         starting the control plane, the kubelet and the agent).\n\n\
         Machine: {nproc} CPUs (nproc), kernel {kernel}, CPU model: {cpu}. The control plane \
         (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), the harness kubelet \
         of node-a, the agent and mesh-bench itself share these CPUs, with whatever else runs on \
         the machine: its 1-minute load average was {} at the start (before this benchmark's \
         processes) and {} at the end (theirs included).\n",
        date_utc(),
        m.reps,
        m.reps,
        m.elapsed_s,
        m.setup_s,
        m.load.0.map_or("?".into(), |l| format!("{l:.2}")),
        m.load.1.map_or("?".into(), |l| format!("{l:.2}")),
    );
    let _ = writeln!(
        s,
        "Setup: one node with a kubelet, node-a, and its agent, run as the DaemonSet runs it \
         (its arguments and mesh settings from deploy/, its ServiceAccount's token, so the \
         shipped RBAC). The scale set, made through the API by mesh-bench (kube-rs, 32 \
         requests in flight, as admin): {FAKE_NODES} Nodes no kubelet serves (mesh-bench \
         renews their Leases every 10 s), {NAMESPACES} namespaces labelled \
         `istio.io/dataplane-mode=ambient`, {SERVICES} ServiceAccounts and Services \
         (`app-<k>`, port 80 → 8080), {PODS} pods bound to the fake nodes (`spec.nodeName`), \
         10 per Service by their `app` label, each with a status as a kubelet writes it \
         (Running, Ready, one IPv4 and one IPv6 address of its own) through the status \
         subresource. The endpointslice controller makes each Service's EndpointSlice; the \
         agent on node-a watches every Pod, Namespace, Service and EndpointSlice of the \
         cluster, as each node's agent does. What the agent asks of the API server is counted \
         by a FlowSchema matching its ServiceAccount alone (`mesh-bench-agent`, at the \
         priority level it gets anyway): `apiserver_flowcontrol_dispatched_requests_total` \
         and `apiserver_flowcontrol_request_execution_seconds` (the request metrics carry no \
         user). The API server's CPU seconds are its process's (`/proc/<pid>/stat`), its \
         memory `VmRSS`/`VmHWM`; its `/metrics` is read outside each measured stretch.\n"
    );
}

fn summary(s: &mut String, m: &KubeScale) {
    let c = &m.creation;
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(s, "| figure | value |\n|---|---:|");
    let mut row = |what: String, value: String| {
        let _ = writeln!(s, "| {what} | {value} |");
    };
    row(
        "agent RSS, cluster nearly empty (MiB)".into(),
        f(m.empty_rss_mib),
    );
    row(
        format!("agent RSS after following the creation of the {PODS} pods (MiB)"),
        f(c.rss_mib),
    );
    row(
        "agent RSS after its initial sync of them, restarted (MiB, median)".into(),
        fmt(med(&m.restarts, |r| r.rss_mib)),
    );
    row(
        "agent peak RSS during that initial sync (MiB, median)".into(),
        fmt(med(&m.restarts, |r| r.peak_rss_mib)),
    );
    row(
        "agent RSS after 1,000 pod address changes (MiB, median)".into(),
        fmt(med(&m.churns, |c| c.rss_mib)),
    );
    row(
        format!("agent RSS after {} s idle (MiB)", IDLE.as_secs()),
        f(m.idle_rss_mib),
    );
    row(
        format!("agent start → ready, nearly empty cluster / with {PODS} pods (s, median)"),
        format!(
            "{} / {}",
            f(m.empty_sync_s),
            fmt(med(&m.restarts, |r| r.sync_s))
        ),
    );
    row(
        "initial sync: watch events the agent handled per second (median)".into(),
        fmt(med(&m.restarts, |r| r.counters.events() / r.sync_s)),
    );
    row(
        "1,000 pod address changes: first change sent → the EndpointSlices' last change / the \
         agent's last state build (s, median)"
            .into(),
        format!(
            "{} / {}",
            fmt(med_some(&m.churns, |c| c.slices_last_s)),
            fmt(med(&m.churns, |c| c.reflected_s))
        ),
    );
    row(
        "1,000 pod address changes with the agent stopped: first change sent → the \
         EndpointSlices' last change (s, median)"
            .into(),
        fmt(med_some(&m.quiet_churns, |q| q.slices_last_s)),
    );
    row(
        "1,000 pod address changes: the agent's CPU (s, median)".into(),
        fmt(med_some(&m.churns, |c| agent_cpu(&c.window))),
    );
    row(
        format!(
            "enrolment of {} new pods of node-a, created → served, p50 / p99 (ms), nearly empty → with {PODS} pods",
            enrol::LOCAL_PODS
        ),
        format!(
            "{} / {} → {} / {}",
            fmt(pct(
                &m.enrol_empty.pods,
                PodTimes::created_to_served_ms,
                50.0
            )),
            fmt(pct(
                &m.enrol_empty.pods,
                PodTimes::created_to_served_ms,
                99.0
            )),
            fmt(pct(
                &m.enrol_scale.pods,
                PodTimes::created_to_served_ms,
                50.0
            )),
            fmt(pct(
                &m.enrol_scale.pods,
                PodTimes::created_to_served_ms,
                99.0
            )),
        ),
    );
    row(
        format!("served → Running, p50 / p99 (ms), with {PODS} pods"),
        format!(
            "{} / {}",
            fmt(pct(
                &m.enrol_scale.pods,
                PodTimes::served_to_running_ms,
                50.0
            )),
            fmt(pct(
                &m.enrol_scale.pods,
                PodTimes::served_to_running_ms,
                99.0
            )),
        ),
    );
    row(
        "API server CPU during the agent's initial sync (s, median)".into(),
        fmt(med(&m.restarts, |r| r.window.api.cpu_s)),
    );
    row(
        "API server time executing the agent's requests at its initial sync (s, median)".into(),
        fmt(med(&m.restarts, |r| r.window.api_counters.agent_exec_s)),
    );
    row(
        "API server CPU over 1,000 address changes, with / without the agent (s, medians)".into(),
        format!(
            "{} / {}",
            fmt(med(&m.churns, |c| c.window.api.cpu_s)),
            fmt(med(&m.quiet_churns, |q| q.window.api.cpu_s))
        ),
    );
    row(
        format!("API server CPU idle, with {PODS} pods (cores)"),
        f(m.idle.api.cpu_s / m.idle.secs),
    );
    let _ = writeln!(s);
}

fn pct(e: &Enrolment, f: fn(&PodTimes) -> f64, p: f64) -> Option<f64> {
    percentile(&e.pods.values().map(f).collect::<Vec<_>>(), p)
}

fn creation(s: &mut String, m: &KubeScale) {
    let c = &m.creation;
    let _ = writeln!(s, "## Creating the scale set\n");
    let _ = writeln!(
        s,
        "Through the API, one kind after the other, 32 requests in flight (pods: a create, \
         then a status update each), while the agent follows.\n"
    );
    let _ = writeln!(
        s,
        "| objects | count | seconds | per second |\n|---|---:|---:|---:|"
    );
    for step in &c.steps {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            step.what,
            step.count,
            f(step.secs),
            f(step.per_second())
        );
    }
    let total: usize = c.steps.iter().map(|st| st.count).sum();
    let secs: f64 = c.steps.iter().map(|st| st.secs).sum();
    let _ = writeln!(
        s,
        "| all writes | {total} | {} | {} |\n",
        f(secs),
        f(total as f64 / secs)
    );
    let w = &c.window;
    let _ = writeln!(
        s,
        "After the last write, every Service's EndpointSlice had its 10 ready endpoints within \
         {} s, and the agent's state had every Service with its 10 endpoints (workloads) within \
         {} s (polled every second). Over the whole creation ({} s, until the agent's state was \
         complete): the API server used {} CPU seconds ({} cores), peak RSS {} MiB; it served \
         {} requests.",
        f(c.slices_s),
        f(c.agent_s),
        f(w.secs),
        f(w.api.cpu_s),
        f(w.api.cpu_s / w.secs),
        f(w.api.peak_rss_mib),
        f(w.api_counters.requests()),
    );
    if let Some((u, k)) = &w.agent {
        let _ = writeln!(
            s,
            "The agent handled {} watch events ({} Pod, {} EndpointSlice, {} Service, {} \
             Namespace; {} per second over the creation), built its state {} times, used {} \
             CPU seconds ({} ms per state build), peak RSS {} MiB, RSS {} MiB {} s after. Its \
             requests to the API server: {}.\n",
            k.events(),
            k.pods,
            k.slices,
            k.services,
            k.namespaces,
            f(k.events() / w.secs),
            k.builds,
            f(u.cpu_s),
            f(1e3 * u.cpu_s / k.builds.max(1.0)),
            f(u.peak_rss_mib),
            f(c.rss_mib),
            SETTLE.as_secs(),
            w.api_counters.agent_requests,
        );
    }
}

fn restarts(s: &mut String, m: &KubeScale) {
    let _ = writeln!(s, "## The agent's initial sync\n");
    let _ = writeln!(
        s,
        "Each repetition stops the agent (SIGTERM) and starts it again as the DaemonSet would \
         (a new token): it lists every Pod, Namespace, Service and EndpointSlice, builds its \
         first state and reports ready. **ready**: from its `following the Kubernetes API` line \
         to its `agent ready` line (their timestamps); on the nearly empty cluster this took {} \
         s. **events**: its watch events counted when ready (the lists' objects). CPU and peak \
         RSS (`VmHWM`) of the new process when ready; RSS {} s later. API server: from the \
         start until ready.\n",
        f(m.empty_sync_s),
        SETTLE.as_secs()
    );
    let _ = writeln!(
        s,
        "| rep | ready s | events | events/s | agent CPU s | peak RSS MiB | RSS MiB | API server \
         CPU s | agent's requests | API time on them s | LISTs (all users) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (i, r) in m.restarts.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            f(r.sync_s),
            r.counters.events(),
            f(r.counters.events() / r.sync_s),
            f(r.agent_cpu_s),
            f(r.peak_rss_mib),
            f(r.rss_mib),
            f(r.window.api.cpu_s),
            r.window.api_counters.agent_requests,
            f(r.window.api_counters.agent_exec_s),
            lists(r),
        );
    }
    let _ = writeln!(
        s,
        "| median | {} | | {} | {} | {} | {} | {} | | {} | |\n",
        fmt(med(&m.restarts, |r| r.sync_s)),
        fmt(med(&m.restarts, |r| r.counters.events() / r.sync_s)),
        fmt(med(&m.restarts, |r| r.agent_cpu_s)),
        fmt(med(&m.restarts, |r| r.peak_rss_mib)),
        fmt(med(&m.restarts, |r| r.rss_mib)),
        fmt(med(&m.restarts, |r| r.window.api.cpu_s)),
        fmt(med(&m.restarts, |r| r.window.api_counters.agent_exec_s)),
    );
}

fn lists(r: &Restart) -> String {
    let n = r
        .window
        .api_counters
        .requests_by_verb
        .get("LIST")
        .copied()
        .unwrap_or(0.0);
    format!("{n}")
}

fn churns(s: &mut String, m: &KubeScale) {
    let _ = writeln!(s, "## 1,000 pod address changes\n");
    let _ = writeln!(
        s,
        "Each repetition gives one pod of every Service new addresses (status subresource, 32 \
         in flight), and the endpointslice controller updates the Services' EndpointSlices: \
         the agent follows both. Times from the first change sent. **slices**: the last \
         EndpointSlice change of the scale set a watch of mesh-bench's received (no watcher \
         can have it earlier). **last build**: the timestamp of the agent's last `kubernetes \
         state updated` line, once its counters had stood still for {} s; its state then has \
         every Service with all 10 endpoints again (checked). Agent CPU and the API server's \
         CPU over that stretch (window). Right after, with the agent stopped, 1,000 more \
         changes: the API server's CPU over a window as long, and when the EndpointSlices' \
         last change arrived, without this watcher and its CPU use.\n",
        QUIET.as_secs(),
    );
    let _ = writeln!(
        s,
        "| rep | changes s | changes/s | slices s (changes) | last build s | Pod events | \
         EndpointSlice events | state builds | agent CPU s | ms CPU per build | RSS after MiB | \
         API server CPU s (window s) | without the agent: API server CPU s (window s) | \
         without the agent: slices s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (i, c) in m.churns.iter().enumerate() {
        let (cpu, pods, slices, builds) = match &c.window.agent {
            Some((u, k)) => (u.cpu_s, k.pods, k.slices, k.builds),
            None => (f64::NAN, f64::NAN, f64::NAN, f64::NAN),
        };
        let quiet = m.quiet_churns.get(i);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} ({}) | {} | {pods} | {slices} | {builds} | {} | {} | {} | {} ({}) | {} | {} |",
            i + 1,
            f(c.patch.secs),
            f(c.patch.per_second()),
            fmt(c.slices_last_s),
            c.slice_changes,
            f(c.reflected_s),
            f(cpu),
            f(1e3 * cpu / builds.max(1.0)),
            f(c.rss_mib),
            f(c.window.api.cpu_s),
            f(c.window.secs),
            quiet.map_or("–".into(), |q| format!(
                "{} ({})",
                f(q.window.api.cpu_s),
                f(q.window.secs)
            )),
            quiet.map_or("–".into(), |q| fmt(q.slices_last_s)),
        );
    }
    let _ = writeln!(
        s,
        "| median | {} | | {} | {} | | | | {} | | {} | {} | {} | {} |\n",
        fmt(med(&m.churns, |c| c.patch.secs)),
        fmt(med_some(&m.churns, |c| c.slices_last_s)),
        fmt(med(&m.churns, |c| c.reflected_s)),
        fmt(med_some(&m.churns, |c| agent_cpu(&c.window))),
        fmt(med(&m.churns, |c| c.rss_mib)),
        fmt(med(&m.churns, |c| c.window.api.cpu_s)),
        fmt(med(&m.quiet_churns, |q| q.window.api.cpu_s)),
        fmt(med_some(&m.quiet_churns, |q| q.slices_last_s)),
    );
}

fn idle(s: &mut String, m: &KubeScale) {
    let w = &m.idle;
    let _ = writeln!(s, "## Idle, with the scale set\n");
    let _ = writeln!(
        s,
        "{} s with nothing changing: the API server used {} CPU seconds ({} cores; the \
         controllers' and the kubelet's routine work, the fake nodes' Lease renewals), the \
         agent {} CPU seconds and {} requests; agent RSS {} MiB.\n",
        f(w.secs),
        f(w.api.cpu_s),
        f(w.api.cpu_s / w.secs),
        fmt(agent_cpu(w)),
        w.api_counters.agent_requests,
        f(m.idle_rss_mib),
    );
}

fn enrolment(s: &mut String, m: &KubeScale) {
    let _ = writeln!(s, "## Enrolment of new pods of node-a\n");
    let _ = writeln!(
        s,
        "{} real pods (`sleep`, run by node-a's harness kubelet) created one every {} ms in an \
         ambient namespace of their own, first with the cluster nearly empty (they are then \
         deleted), last with the scale set. **created**: the API server answered the pod's \
         creation; **served**: the `timestamp` of the agent's `workload served` line for it \
         (listeners up in the pod's netns, inbound captured); **Running**: a watch of \
         mesh-bench's received the pod with `phase: Running` (the API's announcement, ms \
         precision; the pods' own `startTime`, Ready `lastTransitionTime` and `startedAt` have \
         whole seconds). The CNI ADD of a pod's sandbox waits for the agent to serve it before \
         the kubelet starts its containers, so the agent serves a pod *before* it is Running: \
         served → Running is how long before the API shows the pod Running its traffic is \
         already captured. With {} pods, p99 is the largest.\n",
        enrol::LOCAL_PODS,
        enrol::PACE.as_millis(),
        enrol::LOCAL_PODS,
    );
    let _ = writeln!(
        s,
        "| cluster | pods | created → served p50 / p99 ms | served → Running p50 / p99 ms | \
         created → Running p50 / p99 ms | agent CPU s (state builds) over s |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    for (what, e) in [
        ("nearly empty", &m.enrol_empty),
        ("with the scale set", &m.enrol_scale),
    ] {
        let both = |g: fn(&PodTimes) -> f64| {
            format!(
                "{} / {}",
                fmt(pct(&e.pods, g, 50.0)),
                fmt(pct(&e.pods, g, 99.0))
            )
        };
        let agent = match &e.window.agent {
            Some((u, k)) => format!("{} ({})", f(u.cpu_s), k.builds),
            None => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {what} (`{}`) | {} | {} | {} | {} | {agent} over {} |",
            e.pods.namespace,
            e.pods.pods.len(),
            both(PodTimes::created_to_served_ms),
            both(PodTimes::served_to_running_ms),
            both(PodTimes::created_to_running_ms),
            f(e.window.secs),
        );
    }
    let _ = writeln!(s);
}

fn control_plane(s: &mut String, m: &KubeScale) {
    let _ = writeln!(s, "## Control plane memory\n");
    let _ = writeln!(
        s,
        "`VmRSS` of each component before the scale set was made and once the agent had it \
         all.\n\n| component | before MiB | after MiB |\n|---|---:|---:|"
    );
    let [before, after] = &m.control_plane_rss;
    for (name, bytes) in before {
        let later = after.iter().find(|(n, _)| n == name).map(|(_, b)| mib(*b));
        let _ = writeln!(s, "| {name} | {} | {} |", f(mib(*bytes)), fmt(later));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(25.0));
        assert_eq!(percentile(&v, 99.0), Some(50.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
