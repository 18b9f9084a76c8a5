//! The reconciler: each of the node's workloads has its own lifecycle, started when it appears
//! or when its network namespace or cgroup is recreated, ended when it goes.
//!
//! The kernel guard holds for every workload IP of the node before anything else happens to it
//! and until everything else is gone, so whatever the reconciler has seen yet, the workload is
//! never reachable (or able to reach out) except through the agent.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use anyhow::Context as _;
use tracing::{error, info, warn};

use super::NodeContext;
use crate::{
    ebpf::{self, Capture},
    identity::server_config,
    netns::NetNs,
    proxy::{Lifetime, inbound::Inbound, outbound::Outbound},
    state::{State, WorkloadInfo},
};

pub struct Reconciler {
    capture: Capture,
    context: Arc<NodeContext>,
    workloads: HashMap<String, Served>,
    /// The state the workloads and the guard were last brought in line with: between changes,
    /// a pass only looks at namespaces and cgroups.
    synced: Option<Arc<State>>,
}

/// What the reconciler has done for one workload.
struct Served {
    info: Arc<WorkloadInfo>,
    /// The enrolled cgroup's id.
    cgroup_id: Option<u64>,
    /// Listeners and inbound capture, in the namespace with this inode.
    lifecycle: Option<(u64, Lifetime)>,
    /// Why it is not served, as last reported.
    unserved: Option<String>,
}

/// A workload's kernel facts, as observed now.
struct Observed {
    netns_inode: Option<u64>,
    cgroup_id: Option<u64>,
}

impl Reconciler {
    pub fn new(capture: Capture, context: Arc<NodeContext>) -> Self {
        Self {
            capture,
            context,
            workloads: HashMap::new(),
            synced: None,
        }
    }

    /// Removes what a previous agent left in the kernel for workloads that are not in `state`
    /// (they left while no agent ran), then serves the others.
    pub fn start(&mut self, state: &Arc<State>) -> anyhow::Result<()> {
        self.sync(state);
        let keep_cgroups: HashSet<u64> = self
            .workloads
            .values()
            .filter_map(|w| w.cgroup_id)
            .collect();
        self.capture.retain_enrolled(&keep_cgroups)?;
        // A workload not served yet (its listeners failed) keeps the capture a previous agent
        // attached to its namespace: nothing listens for it, so sk_lookup refuses its inbound
        // connections until it is served, as it does while no agent runs.
        let keep_netns: HashSet<u64> = self
            .workloads
            .values()
            .filter_map(|w| w.lifecycle.as_ref().map(|(inode, _)| *inode))
            .chain(
                state
                    .local_workloads()
                    .iter()
                    .filter_map(|info| Observed::of(info).netns_inode),
            )
            .collect();
        self.capture.retain_inbound_namespaces(&keep_netns)?;
        self.capture.retain_inbound(&local_ips(state))?;
        Ok(())
    }

    /// Brings the kernel and the listeners in line with `state` and with the workloads'
    /// namespaces and cgroups as they are now.
    pub fn sync(&mut self, state: &Arc<State>) {
        let changed = !self.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, state));
        let guarded = changed && self.apply_changes(state);
        for info in state.local_workloads() {
            let observed = Observed::of(info);
            let served = self
                .workloads
                .entry(info.uid.clone())
                .or_insert_with(|| Served {
                    info: info.clone(),
                    cgroup_id: None,
                    lifecycle: None,
                    unserved: None,
                });
            follow_cgroup(&mut self.capture, served, observed.cgroup_id);
            follow_netns(
                &mut self.capture,
                &self.context,
                served,
                observed.netns_inode,
            );
        }
        if !guarded {
            return;
        }
        // Last: the guard goes once nothing else of a removed workload is left.
        match self.capture.retain_guarded(&local_ips(state)) {
            Ok(()) => self.synced = Some(state.clone()),
            Err(err) => error!(error = format!("{err:#}"), "cannot update the guarded IPs"),
        }
    }

    /// Follows a new state: label updates in place, removals and replacements, then the guard
    /// for every IP of the node. Returns whether the guard holds for them all.
    fn apply_changes(&mut self, state: &State) -> bool {
        let desired: HashMap<&str, &Arc<WorkloadInfo>> = state
            .local_workloads()
            .iter()
            .map(|w| (w.uid.as_str(), w))
            .collect();
        // A new label changes no listener: policy re-checks the open connections by itself.
        for (uid, served) in &mut self.workloads {
            if let Some(new) = desired.get(uid.as_str())
                && **new != served.info
                && new.serves_like(&served.info)
            {
                info!(workload = %uid, labels = ?new.workload.labels, "workload updated");
                served.info = (*new).clone();
            }
        }
        // Removals first, so that an IP or identity passed to a new workload is free.
        let gone: Vec<String> = self
            .workloads
            .iter()
            .filter(|(uid, served)| desired.get(uid.as_str()).is_none_or(|w| **w != served.info))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some(served) = self.workloads.remove(&uid) {
                let replaced = desired.contains_key(uid.as_str());
                self.remove(served, if replaced { "changed" } else { "removed" });
            }
        }
        match self.capture.guard(&local_ips(state)) {
            Ok(()) => true,
            Err(err) => {
                error!(
                    error = format!("{err:#}"),
                    "cannot guard the node's workload IPs"
                );
                false
            }
        }
    }

    /// Why the node is not ready: one line per workload that is not served.
    pub fn unserved(&self) -> Vec<String> {
        let mut reasons: Vec<String> = self
            .workloads
            .values()
            .filter_map(|w| {
                w.unserved
                    .as_ref()
                    .map(|why| format!("{}: {why}", w.info.uid))
            })
            .collect();
        reasons.sort();
        reasons
    }

    /// The workloads served completely (enrolled, listening, captured inbound), with the
    /// namespace they are served in: what the CNI server waits for.
    pub fn served(&self) -> crate::cni::Served {
        crate::cni::Served(
            self.workloads
                .iter()
                .filter(|(_, w)| w.unserved.is_none() && w.cgroup_id.is_some())
                .filter_map(|(uid, w)| Some((uid.clone(), w.lifecycle.as_ref()?.0)))
                .collect(),
        )
    }

    pub fn served_count(&self) -> usize {
        self.workloads
            .values()
            .filter(|w| w.unserved.is_none())
            .count()
    }

    pub fn guarded_count(&self) -> usize {
        self.capture.guarded_count()
    }

    /// Ends the workload's lifecycle: its connections are reset, its listeners closed, its
    /// capture and certificate dropped.
    fn remove(&mut self, served: Served, why: &str) {
        let uid = served.info.uid.clone();
        if let Some((inode, lifetime)) = served.lifecycle {
            lifetime.end();
            if let Err(err) = self
                .capture
                .release_inbound(inode, &served.info.workload.ips)
            {
                warn!(workload = %uid, error = format!("{err:#}"), "cannot release inbound capture");
            }
        }
        if let Some(id) = served.cgroup_id
            && let Err(err) = self.capture.unenroll(id)
        {
            warn!(workload = %uid, error = format!("{err:#}"), "cannot unenrol the cgroup");
        }
        let identity_still_used = self
            .workloads
            .values()
            .any(|w| w.info.identity == served.info.identity);
        if !identity_still_used {
            self.context.identities.remove(&served.info.identity);
        }
        info!(workload = %uid, change = why, "workload removed");
    }
}

impl Observed {
    fn of(info: &WorkloadInfo) -> Self {
        let netns_inode = inode(&info.workload.netns);
        Self {
            netns_inode,
            cgroup_id: ebpf::cgroup_id(&info.workload.cgroup).ok(),
        }
    }
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Enrols the workload's cgroup, again when it was recreated (a new id).
fn follow_cgroup(capture: &mut Capture, served: &mut Served, observed: Option<u64>) {
    if served.cgroup_id == observed {
        return;
    }
    let uid = &served.info.uid;
    if let Some(old) = served.cgroup_id.take()
        && let Err(err) = capture.unenroll(old)
    {
        warn!(workload = %uid, error = format!("{err:#}"), "cannot unenrol the old cgroup");
    }
    let Some(id) = observed else {
        warn!(workload = %uid, cgroup = %served.info.workload.cgroup.display(), "the workload's cgroup is gone; its IPs stay guarded");
        return;
    };
    match capture.enroll(&served.info.workload.cgroup) {
        Ok(enrolled) if enrolled == id => {
            info!(workload = %uid, cgroup = %served.info.workload.cgroup.display(), cgroup_id = id, "workload enrolled");
            served.cgroup_id = Some(id);
        }
        // Recreated between the two looks: the next pass enrols the newest.
        Ok(_) => {}
        Err(err) => {
            error!(workload = %uid, error = format!("{err:#}"), "cannot enrol the workload; its IPs stay guarded")
        }
    }
}

/// Serves the workload in its namespace, again when it was recreated (a new inode); while it
/// has none, nothing is served and the guard refuses its traffic.
fn follow_netns(
    capture: &mut Capture,
    context: &NodeContext,
    served: &mut Served,
    observed: Option<u64>,
) {
    let current = served.lifecycle.as_ref().map(|(inode, _)| *inode);
    if current.is_some() && current == observed {
        return;
    }
    let uid = served.info.uid.clone();
    if let Some((old, lifetime)) = served.lifecycle.take() {
        lifetime.end();
        if let Err(err) = capture.release_inbound(old, &served.info.workload.ips) {
            warn!(workload = %uid, error = format!("{err:#}"), "cannot release the old inbound capture");
        }
        info!(workload = %uid, old_netns_inode = old, "the workload's network namespace changed; its connections were reset");
    }
    let result = match observed {
        None => Err(anyhow::anyhow!(
            "network namespace {} does not exist",
            served.info.workload.netns.display()
        )),
        Some(inode) => {
            serve(capture, context, &served.info, inode).map(|lifetime| (inode, lifetime))
        }
    };
    match result {
        Ok((inode, lifetime)) => {
            info!(workload = %uid, netns_inode = inode, "workload served");
            served.lifecycle = Some((inode, lifetime));
            served.unserved = None;
        }
        Err(err) => {
            let why = format!("{err:#}");
            if served.unserved.as_ref() != Some(&why) {
                error!(workload = %uid, error = %why, "workload not served; its IPs stay guarded");
            }
            served.unserved = Some(why);
        }
    }
}

/// Outbound listeners (captured connections), inbound HBONE listeners (the workload's IPs, port
/// 15008) and inbound plaintext listeners (15006, fed by `sk_lookup`), all inside the
/// workload's namespace; inbound capture starts once they listen.
fn serve(
    capture: &mut Capture,
    context: &NodeContext,
    info: &Arc<WorkloadInfo>,
    expected_inode: u64,
) -> anyhow::Result<Lifetime> {
    require_certificate(context, info)?;
    let netns = NetNs::open(&info.workload.netns)?;
    let inode = netns.inode();
    if inode != expected_inode {
        anyhow::bail!("the network namespace was recreated while opening it");
    }
    if let Err(err) = netns.migrate_queued_connections() {
        warn!(workload = %info.uid, error = %err, "cannot set tcp_migrate_req; an upgrade may reset queued connections");
    }
    let lifetime = Lifetime::within(&context.shutdown);
    let outbound = Outbound::listen(
        info.clone(),
        NetNs::open(&info.workload.netns)?,
        capture.orig_dst_table(),
        context.mesh.clone(),
        lifetime.clone(),
    )?;
    let trust_domain = context.mesh.state.load().cluster.trust_domain.clone();
    let tls = server_config(
        context.identities.clone(),
        info.identity.clone(),
        context.bundle.clone(),
        trust_domain.as_str(),
    )?;
    let inbound = Inbound::listen(
        info.clone(),
        netns,
        tls,
        context.inbound.clone(),
        lifetime.clone(),
    )?;
    capture
        .capture_inbound(
            inbound.netns(),
            &info.workload.ips,
            inbound.plaintext_listener(),
        )
        .context("capturing inbound connections")?;
    outbound.serve(&context.tracker);
    inbound.serve(&context.tracker);
    Ok(lifetime)
}

/// A workload is served only with a certificate for its identity: until the issuer (perhaps a
/// CA across the network) has given one, its IPs stay guarded and its traffic refused.
fn require_certificate(context: &NodeContext, info: &WorkloadInfo) -> anyhow::Result<()> {
    if context.identities.want(&info.identity).is_some() {
        return Ok(());
    }
    match context.identities.last_error(&info.identity) {
        Some(error) => anyhow::bail!("no certificate for {} yet: {error}", info.identity),
        None => anyhow::bail!("waiting for the certificate of {}", info.identity),
    }
}

fn local_ips(state: &State) -> Vec<IpAddr> {
    state
        .local_workloads()
        .iter()
        .flat_map(|w| w.workload.ips.iter().copied())
        .collect()
}
