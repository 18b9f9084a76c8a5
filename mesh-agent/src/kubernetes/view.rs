//! The facts the watches gave, and the [`Cluster`] (then [`State`]) built from them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
};

use kube::runtime::watcher::Event;

/// A watch event with each object replaced by its key and the facts kept of it (`None`: the
/// object is not kept).
pub(super) type Keyed<T> = Event<(String, Option<T>)>;
use tokio::{sync::oneshot, time::Instant};
use tracing::warn;

use super::{
    Change, SANDBOX_POD_WAIT, Sandbox, SandboxRequest, SandboxVerdict,
    config::MeshConfig,
    facts::{FactsError, NamespaceFacts, PodFacts, ServiceFacts, SliceFacts, TargetPort},
    node::{self, PodCgroups},
};
use crate::{
    state::State,
    workload::{Cluster, Name, Node, Service, ServicePort, Workload},
};

/// Objects of one kind by key, and whether the kind's list has completed.
struct Kind<T> {
    objects: HashMap<String, T>,
    /// Filled during a (re)list, swapped in when it completes.
    relist: Option<HashMap<String, T>>,
    listed: bool,
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Self {
            objects: HashMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<T: PartialEq> Kind<T> {
    /// Applies one watch event, with the object's key and facts already taken (`None`: the
    /// object is not kept, e.g. a Service without virtual IP). Returns whether anything changed.
    fn apply(&mut self, event: Keyed<T>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply((key, facts)) => {
                if let (Some(relist), Some(facts)) = (self.relist.as_mut(), facts) {
                    relist.insert(key, facts);
                }
                false
            }
            Event::InitDone => {
                self.listed = true;
                match self.relist.take() {
                    Some(fresh) if fresh != self.objects => {
                        self.objects = fresh;
                        true
                    }
                    _ => false,
                }
            }
            Event::Apply((key, Some(facts))) => {
                let changed = self.objects.get(&key) != Some(&facts);
                self.objects.insert(key, facts);
                changed
            }
            Event::Apply((key, None)) | Event::Delete((key, _)) => {
                self.objects.remove(&key).is_some()
            }
        }
    }
}

/// A sandbox's ADD waiting for its pod to show up in the watch.
struct WaitingSandbox {
    sandbox: Sandbox,
    reply: oneshot::Sender<SandboxVerdict>,
    until: Instant,
    /// An ADD records the sandbox; a CHECK only asks.
    add: bool,
}

pub(super) struct View {
    node: String,
    cgroups: PodCgroups,
    settings: MeshConfig,
    /// Pods by UID.
    pods: Kind<PodFacts>,
    namespaces: Kind<NamespaceFacts>,
    services: Kind<ServiceFacts>,
    slices: Kind<SliceFacts>,
    /// This node's sandboxes reported by the CNI plugin, by pod UID.
    sandboxes: HashMap<String, Sandbox>,
    /// Network namespaces of this node's pods found through /proc, by pod UID.
    found_netns: HashMap<String, PathBuf>,
    waiting: Vec<WaitingSandbox>,
    /// Answered once the state that serves them is published.
    to_answer: Vec<(String, oneshot::Sender<SandboxVerdict>)>,
}

impl View {
    pub(super) fn new(settings: &MeshConfig, node: &str, cgroups: PodCgroups) -> Self {
        Self {
            node: node.to_owned(),
            cgroups,
            settings: settings.clone(),
            pods: Kind::default(),
            namespaces: Kind::default(),
            services: Kind::default(),
            slices: Kind::default(),
            sandboxes: HashMap::new(),
            found_netns: HashMap::new(),
            waiting: Vec::new(),
            to_answer: Vec::new(),
        }
    }

    pub(super) fn listed(&self) -> bool {
        self.unlisted().is_empty()
    }

    pub(super) fn unlisted(&self) -> Vec<&'static str> {
        [
            ("Pod", self.pods.listed),
            ("Namespace", self.namespaces.listed),
            ("Service", self.services.listed),
            ("EndpointSlice", self.slices.listed),
        ]
        .into_iter()
        .filter(|(_, listed)| !listed)
        .map(|(kind, _)| kind)
        .collect()
    }

    /// Applies a watch event; whether the state must be rebuilt.
    pub(super) fn apply(&mut self, change: Change) -> bool {
        let changed = match change {
            Change::Pod(event) => self.pods.apply(event),
            Change::Namespace(event) => self.namespaces.apply(event),
            Change::Service(event) => self.services.apply(event),
            Change::Slice(event) => self.slices.apply(event),
        };
        if changed {
            self.decide_waiting_sandboxes();
        }
        changed
    }
}

/// The event with each object replaced by its key and facts (`None`: not kept). An object
/// whose facts cannot be taken is logged (once per problem) and treated as absent.
pub(super) fn keyed<K, T>(
    reported: &mut HashSet<String>,
    event: Event<K>,
    key: fn(&K) -> String,
    facts: fn(&K) -> Result<Option<T>, FactsError>,
) -> Keyed<T>
where
    K: kube::Resource<DynamicType = ()>,
{
    let mut take = |obj: &K| match facts(obj) {
        Ok(facts) => facts,
        Err(err) => {
            let key = object_key(obj);
            if reported.insert(format!("{key}: {err}")) {
                warn!(kind = %K::kind(&()), object = %key, error = %err, "API object left out of the mesh");
            }
            None
        }
    };
    match event {
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
        Event::InitApply(obj) => Event::InitApply((key(&obj), take(&obj))),
        Event::Apply(obj) => Event::Apply((key(&obj), take(&obj))),
        Event::Delete(obj) => Event::Delete((key(&obj), None)),
    }
}

/// `namespace/name` (`name` for cluster-scoped objects).
pub(super) fn object_key<K: kube::Resource>(obj: &K) -> String {
    let meta = obj.meta();
    let name = meta.name.as_deref().unwrap_or("");
    match meta.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// Pods are kept by UID: a pod deleted and created again under its name is another pod.
pub(super) fn pod_key(pod: &k8s_openapi::api::core::v1::Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_else(|| object_key(pod))
}

// ---- sandboxes from the CNI plugin

impl View {
    /// Handles a request of the CNI server; whether the state must be rebuilt.
    pub(super) fn sandbox(&mut self, request: SandboxRequest) -> bool {
        match request {
            SandboxRequest::Add(sandbox, reply) => self.decide(sandbox, reply, true),
            SandboxRequest::Check(sandbox, reply) => self.decide(sandbox, reply, false),
            SandboxRequest::Remove {
                uid,
                namespace,
                name,
            } => {
                let before = self.sandboxes.len();
                self.sandboxes.retain(|pod_uid, s| match &uid {
                    Some(uid) => pod_uid != uid,
                    None => !(s.namespace == namespace && s.name == name),
                });
                before != self.sandboxes.len()
            }
        }
    }

    /// Answers for a sandbox whose pod is known, else waits for it; whether the state changes.
    fn decide(
        &mut self,
        sandbox: Sandbox,
        reply: oneshot::Sender<SandboxVerdict>,
        add: bool,
    ) -> bool {
        let Some(pod) = self.pod_of(&sandbox) else {
            self.waiting.push(WaitingSandbox {
                sandbox,
                reply,
                until: Instant::now() + SANDBOX_POD_WAIT,
                add,
            });
            return false;
        };
        if let Err(reason) = self.mesh_member(pod) {
            let _ = reply.send(SandboxVerdict::NotInMesh { reason });
            return false;
        }
        let workload = pod.key();
        let uid = pod.uid.clone();
        if !add {
            let _ = reply.send(SandboxVerdict::InMesh { workload });
            return false;
        }
        self.sandboxes.insert(uid, sandbox);
        self.to_answer.push((workload, reply));
        true
    }

    fn pod_of(&self, sandbox: &Sandbox) -> Option<&PodFacts> {
        match &sandbox.uid {
            Some(uid) => self.pods.objects.get(uid),
            None => self.pods.objects.values().find(|p| {
                p.namespace == sandbox.namespace && p.name == sandbox.name && !p.deleting
            }),
        }
    }

    fn decide_waiting_sandboxes(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        for w in waiting {
            if self.pod_of(&w.sandbox).is_some() {
                self.decide(w.sandbox, w.reply, w.add);
            } else {
                self.waiting.push(w);
            }
        }
    }

    pub(super) fn expire_waiting_sandboxes(&mut self) {
        let now = Instant::now();
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.until <= now);
        self.waiting = waiting;
        for w in expired {
            let _ = w.reply.send(SandboxVerdict::UnknownPod);
        }
    }

    /// The state serving the sandboxes added since the last publish is out.
    pub(super) fn answer_sandboxes(&mut self) {
        for (workload, reply) in self.to_answer.drain(..) {
            let _ = reply.send(SandboxVerdict::InMesh { workload });
        }
    }

    /// Looks this node's pods up in /proc again; whether a namespace changed.
    pub(super) fn refresh_netns(&mut self) -> bool {
        let mut changed = false;
        let local: Vec<(String, PathBuf)> = self
            .pods
            .objects
            .values()
            .filter(|p| self.is_local(p) && !self.sandboxes.contains_key(&p.uid))
            .filter(|p| self.mesh_member(p).is_ok())
            .map(|p| {
                (
                    p.uid.clone(),
                    self.cgroups.find(&p.uid, p.qos_class.as_deref()),
                )
            })
            .collect();
        let mut found = HashMap::new();
        for (uid, cgroup) in local {
            if let Some(netns) = node::pod_netns(&cgroup) {
                changed |= self.found_netns.get(&uid) != Some(&netns);
                found.insert(uid, netns);
            }
        }
        changed |= found.len() != self.found_netns.len();
        self.found_netns = found;
        changed
    }
}

// ---- the state

impl View {
    fn is_local(&self, pod: &PodFacts) -> bool {
        pod.node.as_deref() == Some(self.node.as_str())
    }

    /// Whether the pod is enrolled, or why not.
    fn mesh_member(&self, pod: &PodFacts) -> Result<(), String> {
        let namespace_ambient = self
            .namespaces
            .objects
            .get(&pod.namespace)
            .is_some_and(|ns| ns.ambient);
        if pod.in_mesh(namespace_ambient) {
            Ok(())
        } else if pod.host_network {
            Err("the pod uses the host's network".to_owned())
        } else {
            Err("neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient (or the pod opts out)".to_owned())
        }
    }

    /// The pod as a workload of the mesh; `None` when it is not one (yet), or when its name,
    /// namespace or service account is no DNS label (the pieces of a SPIFFE ID; pod names of
    /// Deployments and StatefulSets always are).
    fn workload(&self, pod: &PodFacts) -> Option<Workload> {
        self.mesh_member(pod).ok()?;
        let local = self.is_local(pod);
        let sandbox = local.then(|| self.sandboxes.get(&pod.uid)).flatten();
        let ips = match (&pod.ips, sandbox) {
            (ips, _) if !ips.is_empty() => ips.clone(),
            (_, Some(sandbox)) if !sandbox.ips.is_empty() => sandbox.ips.clone(),
            _ => return None,
        };
        let (netns, cgroup) = if local {
            let netns = sandbox
                .map(|s| s.netns.clone())
                .or_else(|| self.found_netns.get(&pod.uid).cloned())
                .unwrap_or_default();
            (netns, self.cgroups.find(&pod.uid, pod.qos_class.as_deref()))
        } else {
            (PathBuf::new(), PathBuf::new())
        };
        Some(Workload {
            name: Name::try_from(pod.name.clone()).ok()?,
            namespace: Name::try_from(pod.namespace.clone()).ok()?,
            service_account: Name::try_from(pod.service_account.clone()).ok()?,
            labels: pod.labels.clone(),
            ips,
            netns,
            cgroup,
        })
    }

    /// The cluster as the state reads it: this node (always), every node with mesh pods, the
    /// Services with virtual IPs.
    fn cluster(&self) -> Cluster {
        let mut nodes: BTreeMap<String, Vec<(&PodFacts, Workload)>> = BTreeMap::new();
        nodes.insert(self.node.clone(), Vec::new());
        for pod in self.pods.objects.values() {
            let (Some(node), Some(workload)) = (&pod.node, self.workload(pod)) else {
                continue;
            };
            nodes.entry(node.clone()).or_default().push((pod, workload));
        }
        let nodes = without_address_conflicts(nodes);
        let nodes = nodes
            .into_iter()
            .filter_map(|(name, workloads)| {
                let local = name == self.node;
                Some(Node {
                    name: Name::try_from(name).ok()?,
                    addresses: Vec::new(),
                    workload_cgroup: if local {
                        self.cgroups.pods_root().to_owned()
                    } else {
                        PathBuf::new()
                    },
                    excluded_ports: if local {
                        self.settings.excluded_ports.clone()
                    } else {
                        Vec::new()
                    },
                    workloads,
                })
            })
            .collect();
        Cluster {
            trust_domain: self.settings.trust_domain.clone(),
            identity: self.settings.identity.clone(),
            hbone: self.settings.hbone.clone(),
            same_node: self.settings.same_node.clone(),
            limits: self.settings.limits.clone(),
            policy: self.settings.policy_config(),
            nodes,
            services: self.mesh_services(),
        }
    }

    fn mesh_services(&self) -> Vec<Service> {
        let mut slices: HashMap<String, Vec<&SliceFacts>> = HashMap::new();
        for slice in self.slices.objects.values() {
            slices.entry(slice.service_key()).or_default().push(slice);
        }
        let mut services: Vec<Service> = self
            .services
            .objects
            .values()
            .filter_map(|svc| {
                let slices = slices.get(&svc.key()).map(Vec::as_slice).unwrap_or(&[]);
                service_of(svc, slices)
            })
            .collect();
        services.sort_by_cached_key(Service::qualified_name);
        services
    }

    pub(super) fn build(&self) -> anyhow::Result<State> {
        Ok(State::build(self.cluster(), &self.node)?)
    }
}

/// A Service as the state routes it: ports with their endpoints' port numbers, endpoints from
/// its EndpointSlices (ready ones).
fn service_of(svc: &ServiceFacts, slices: &[&SliceFacts]) -> Option<Service> {
    let ports = svc
        .ports
        .iter()
        .filter_map(|p| {
            // EndpointSlices carry the resolved number of each Service port, under its name.
            let from_slices = slices
                .iter()
                .flat_map(|s| &s.ports)
                .find(|(name, _)| *name == p.name)
                .map(|(_, number)| *number);
            let target = match (&p.target, from_slices) {
                (_, Some(number)) => number,
                (TargetPort::Number(number), None) => *number,
                (TargetPort::Named(_), None) => return None,
            };
            Some(ServicePort {
                port: p.port,
                target_port: Some(target),
            })
        })
        .collect();
    Some(Service {
        name: Name::try_from(svc.name.clone()).ok()?,
        namespace: Name::try_from(svc.namespace.clone()).ok()?,
        addresses: svc.cluster_ips.clone(),
        ports,
        selector: svc.selector.clone(),
        endpoint_ips: Some(
            slices
                .iter()
                .flat_map(|s| s.ready.iter().copied())
                .collect(),
        ),
    })
}

/// One workload per address: when two pods claim an IP (a deleted pod still shutting down and
/// the new pod its address was given to), the one not being deleted keeps it; between equals,
/// the first by name. The other is left out until it is gone, so an address never means two
/// identities.
fn without_address_conflicts(
    nodes: BTreeMap<String, Vec<(&PodFacts, Workload)>>,
) -> BTreeMap<String, Vec<Workload>> {
    let mut owner: HashMap<IpAddr, (bool, String)> = HashMap::new();
    for (pod, workload) in nodes.values().flatten() {
        let rank = (pod.deleting, pod.key());
        for ip in &workload.ips {
            let current = owner
                .entry(ip.to_canonical())
                .or_insert_with(|| rank.clone());
            if rank < *current {
                *current = rank.clone();
            }
        }
    }
    nodes
        .into_iter()
        .map(|(node, workloads)| {
            let kept = workloads
                .into_iter()
                .filter(|(pod, workload)| {
                    workload.ips.iter().all(|ip| {
                        owner
                            .get(&ip.to_canonical())
                            .is_some_and(|(_, key)| *key == pod.key())
                    })
                })
                .map(|(_, workload)| workload)
                .collect();
            (node, kept)
        })
        .collect()
}
