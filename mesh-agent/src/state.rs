//! The node's live view of the mesh: workloads (by IP, by UID), Services (by virtual IP) and
//! what is derived from them (SPIFFE IDs, names, endpoints), computed once per change and
//! published as an immutable snapshot.
//!
//! The data path reads the current snapshot with [`StateStore::load`] (an atomic pointer load,
//! no lock, no scan); sources ([`crate::sources`]) replace it whole with [`StateStore::publish`];
//! the reconciler ([`crate::agent`]) follows the changes with [`StateStore::subscribe`].

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::{
    identity::{SpiffeId, SpiffeIdError},
    workload::{Cluster, Name, Node, Service, Workload},
};

/// A workload with what every connection needs to know of it, derived once.
#[derive(Debug, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub workload: Workload,
    /// The node it runs on.
    pub node: Name,
    /// `namespace/name`: how logs and the admin API name it; unique in the mesh.
    pub uid: String,
    pub identity: SpiffeId,
}

/// A Service and its ready endpoints, derived once.
#[derive(Debug)]
pub struct ServiceInfo {
    pub service: Service,
    pub uid: String,
    /// `name.namespace.svc.<trust domain>`.
    pub hostname: String,
    pub endpoints: Vec<Arc<WorkloadInfo>>,
    /// It has ready endpoints outside the mesh (Kubernetes: addresses of its EndpointSlices
    /// that are no mesh workload's): with no mesh endpoint, its clients are passed through to
    /// them as plain TCP, as Istio ambient does.
    pub outside_endpoints: bool,
    /// Turns for spreading connections over the endpoints.
    turns: AtomicUsize,
    /// Per endpoint: until when (ms on [`clock_ms`]) it is tried last, after a failed connect.
    ejected_until: Vec<AtomicU64>,
}

/// How long an endpoint whose agent could not be reached goes to the back of the line.
const EJECTION: Duration = Duration::from_secs(5);

impl ServiceInfo {
    /// The endpoints in the order to try them for one connection: from the next one in turn
    /// (connections are spread evenly), those that failed recently last.
    pub fn endpoints_in_turn(&self) -> Vec<(usize, &Arc<WorkloadInfo>)> {
        let n = self.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let first = self.turns.fetch_add(1, Ordering::Relaxed) % n;
        let now = clock_ms();
        let mut order: Vec<(usize, &Arc<WorkloadInfo>)> = (0..n)
            .map(|k| (first + k) % n)
            .map(|k| (k, &self.endpoints[k]))
            .collect();
        order.sort_by_key(|(k, _)| self.ejected_until[*k].load(Ordering::Relaxed) > now);
        order
    }

    /// The endpoint `k` could not be reached: try it last for a while.
    pub fn eject(&self, k: usize) {
        if let Some(until) = self.ejected_until.get(k) {
            let ms = u64::try_from(EJECTION.as_millis()).unwrap_or(u64::MAX);
            until.store(clock_ms().saturating_add(ms), Ordering::Relaxed);
        }
    }
}

/// Milliseconds on a monotonic clock that starts with the process.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(elapsed).unwrap_or(u64::MAX)
}

/// One snapshot of the mesh as this node sees it.
#[derive(Debug)]
pub struct State {
    pub cluster: Cluster,
    /// This node's entry of the cluster file.
    node: usize,
    local: Vec<Arc<WorkloadInfo>>,
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    by_uid: HashMap<String, Arc<WorkloadInfo>>,
    services_by_ip: HashMap<IpAddr, Arc<ServiceInfo>>,
    services: Vec<Arc<ServiceInfo>>,
}

/// Where a connection to an address goes, as the state knows it.
pub enum Destination<'a> {
    Workload(&'a Arc<WorkloadInfo>),
    /// A Service's virtual IP: one of its endpoints, on `target_port`; none when the Service
    /// does not declare the port (the connection is refused, as kube-proxy does).
    Service {
        service: &'a Arc<ServiceInfo>,
        target_port: Option<u16>,
    },
    /// Not in the mesh.
    Outside,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("node {node:?} is not in the cluster file (nodes: {known})")]
    UnknownNode { node: String, known: String },
    #[error("workload {workload}: {source}")]
    Identity {
        workload: String,
        source: SpiffeIdError,
    },
}

impl State {
    /// Indexes `cluster` for node `node`.
    pub fn build(cluster: Cluster, node: &str) -> Result<Self, StateError> {
        let node_index = cluster
            .nodes
            .iter()
            .position(|n| n.name.as_str() == node)
            .ok_or_else(|| StateError::UnknownNode {
                node: node.to_owned(),
                known: cluster.node_names(),
            })?;
        let mut by_ip = HashMap::new();
        let mut by_uid = HashMap::new();
        let mut local = Vec::new();
        for (index, node) in cluster.nodes.iter().enumerate() {
            for workload in &node.workloads {
                let info = Arc::new(WorkloadInfo::new(workload, node, &cluster.trust_domain)?);
                for ip in &workload.ips {
                    by_ip.insert(ip.to_canonical(), info.clone());
                }
                if index == node_index {
                    local.push(info.clone());
                }
                by_uid.insert(info.uid.clone(), info);
            }
        }
        let by_label = LabelIndex::of(by_uid.values());
        let mut services = Vec::new();
        let mut services_by_ip = HashMap::new();
        for service in &cluster.services {
            let mut endpoints: Vec<Arc<WorkloadInfo>> = match &service.endpoint_ips {
                Some(ips) => endpoints_at(ips, &by_ip),
                None => by_label
                    .candidates(service)
                    .iter()
                    .filter(|w| service.selects(&w.workload))
                    .map(|w| Arc::clone(w))
                    .collect(),
            };
            endpoints.sort_by(|a, b| a.uid.cmp(&b.uid));
            let info = Arc::new(ServiceInfo {
                uid: service.qualified_name(),
                hostname: service.hostname(&cluster.trust_domain),
                service: service.clone(),
                ejected_until: endpoints.iter().map(|_| AtomicU64::new(0)).collect(),
                outside_endpoints: service
                    .endpoint_ips
                    .iter()
                    .flatten()
                    .any(|ip| !by_ip.contains_key(&ip.to_canonical())),
                endpoints,
                turns: AtomicUsize::new(0),
            });
            for ip in &service.addresses {
                services_by_ip.insert(ip.to_canonical(), info.clone());
            }
            services.push(info);
        }
        Ok(Self {
            cluster,
            node: node_index,
            local,
            by_ip,
            by_uid,
            services_by_ip,
            services,
        })
    }

    pub fn node(&self) -> &Node {
        &self.cluster.nodes[self.node]
    }

    /// The workloads of this node.
    pub fn local_workloads(&self) -> &[Arc<WorkloadInfo>] {
        &self.local
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip.to_canonical())
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<WorkloadInfo>> {
        self.by_uid.get(uid)
    }

    pub fn services(&self) -> &[Arc<ServiceInfo>] {
        &self.services
    }

    /// What `dst` (an original destination) names.
    pub fn destination(&self, dst: SocketAddr) -> Destination<'_> {
        if let Some(workload) = self.workload_by_ip(dst.ip()) {
            return Destination::Workload(workload);
        }
        if let Some(service) = self.services_by_ip.get(&dst.ip().to_canonical()) {
            let target_port = service
                .service
                .ports
                .iter()
                .find(|p| p.port == dst.port())
                .map(|p| p.target());
            return Destination::Service {
                service,
                target_port,
            };
        }
        Destination::Outside
    }
}

/// The workloads at `ips`, once each (a dual-stack endpoint is listed at both its addresses);
/// addresses of no workload in the mesh are left out.
fn endpoints_at(
    ips: &[IpAddr],
    by_ip: &HashMap<IpAddr, Arc<WorkloadInfo>>,
) -> Vec<Arc<WorkloadInfo>> {
    let mut endpoints: Vec<Arc<WorkloadInfo>> = Vec::new();
    for ip in ips {
        if let Some(w) = by_ip.get(&ip.to_canonical())
            && !endpoints.iter().any(|e| Arc::ptr_eq(e, w))
        {
            endpoints.push(w.clone());
        }
    }
    endpoints
}

/// Workloads by (namespace, label, value): a Service's endpoints are found among those carrying
/// the first label of its selector, not by a scan of every workload (1,000 Services over 10,000
/// workloads would be ten million comparisons per change).
struct LabelIndex<'a> {
    by_label: HashMap<LabelKey<'a>, Vec<&'a Arc<WorkloadInfo>>>,
}

/// (namespace, label, value)
type LabelKey<'k> = (&'k str, &'k str, &'k str);

impl<'a> LabelIndex<'a> {
    fn of(workloads: impl Iterator<Item = &'a Arc<WorkloadInfo>>) -> Self {
        let mut by_label: HashMap<_, Vec<_>> = HashMap::new();
        for w in workloads {
            for (key, value) in &w.workload.labels {
                let entry = (w.workload.namespace.as_str(), key.as_str(), value.as_str());
                by_label.entry(entry).or_default().push(w);
            }
        }
        Self { by_label }
    }

    /// The workloads that may match `service`'s selector (all that carry its first label).
    fn candidates<'s>(&'s self, service: &'a Service) -> &'s [&'a Arc<WorkloadInfo>] {
        let first = service.selector.iter().next();
        first
            .and_then(|(key, value)| {
                let wanted: LabelKey<'a> =
                    (service.namespace.as_str(), key.as_str(), value.as_str());
                self.by_label.get(&wanted)
            })
            .map_or(&[], Vec::as_slice)
    }
}

impl WorkloadInfo {
    /// `namespace/name` on node `test`, service account `default`, IP 10.0.0.2.
    #[cfg(test)]
    pub(crate) fn for_tests(uid: &str) -> Self {
        let (namespace, workload_name) = uid.split_once('/').expect("namespace/name");
        let name = |text: &str| Name::try_from(text.to_owned()).expect("a valid name");
        let workload = Workload {
            name: name(workload_name),
            namespace: name(namespace),
            service_account: name("default"),
            labels: Default::default(),
            ips: vec![std::net::IpAddr::from([10, 0, 0, 2])],
            netns: "/var/run/netns/test".into(),
            cgroup: "/sys/fs/cgroup/test".into(),
        };
        let node = Node {
            name: name("test"),
            addresses: Vec::new(),
            workload_cgroup: "/sys/fs/cgroup".into(),
            excluded_ports: Vec::new(),
            workloads: Vec::new(),
        };
        Self::new(&workload, &node, &name("cluster.local")).expect("a valid workload")
    }

    fn new(workload: &Workload, node: &Node, trust_domain: &Name) -> Result<Self, StateError> {
        let uid = workload.qualified_name();
        let identity = workload
            .spiffe_id(trust_domain)
            .map_err(|source| StateError::Identity {
                workload: uid.clone(),
                source,
            })?;
        Ok(Self {
            workload: workload.clone(),
            node: node.name.clone(),
            uid,
            identity,
        })
    }

    /// Whether `other` is served by the same listeners, capture and certificate: it differs at
    /// most in its labels, which policy and metrics read from the state when they need them.
    pub fn serves_like(&self, other: &WorkloadInfo) -> bool {
        let (a, b) = (&self.workload, &other.workload);
        self.uid == other.uid
            && self.identity == other.identity
            && a.ips == b.ips
            && a.netns == b.netns
            && a.cgroup == b.cgroup
    }

    pub fn owns(&self, ip: IpAddr) -> bool {
        self.workload
            .ips
            .iter()
            .any(|own| own.to_canonical() == ip.to_canonical())
    }
}

/// The current [`State`], shared by the data path, the sources and the reconciler. Cheap to
/// clone; clones share the snapshot.
#[derive(Clone)]
pub struct StateStore {
    current: Arc<ArcSwap<State>>,
    changes: watch::Sender<Arc<State>>,
}

impl StateStore {
    pub fn new(initial: State) -> Self {
        let initial = Arc::new(initial);
        Self {
            current: Arc::new(ArcSwap::from(initial.clone())),
            changes: watch::channel(initial).0,
        }
    }

    /// The current snapshot, without a lock.
    pub fn load(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Replaces the snapshot; subscribers are woken.
    pub fn publish(&self, state: State) {
        let state = Arc::new(state);
        self.current.store(state.clone());
        self.changes.send_replace(state);
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const FILE: &str = r#"
identity: {caCert: ca.pem, caKey: key.pem}
nodes:
  - name: node-a
    workloadCgroup: /sys/fs/cgroup/pods
    workloads:
      - {name: client, namespace: demo, ips: [10.1.0.2], netns: /n/c, cgroup: /c/c}
      - {name: v1, namespace: demo, serviceAccount: rec, labels: {app: rec}, ips: [10.1.0.3], netns: /n/1, cgroup: /c/1}
  - name: node-b
    workloadCgroup: /sys/fs/cgroup/pods
    workloads:
      - {name: v2, namespace: demo, serviceAccount: rec, labels: {app: rec, version: v2}, ips: [10.2.0.2, "fd00:2::2"], netns: /n/2, cgroup: /c/2}
      - {name: other, namespace: prod, labels: {app: rec}, ips: [10.2.0.3], netns: /n/3, cgroup: /c/3}
services:
  - name: rec
    namespace: demo
    addresses: [10.96.0.10, "fd00:96::10"]
    ports: [{port: 80, targetPort: 8080}, {port: 9000}]
    selector: {app: rec}
"#;

    fn state(node: &str) -> State {
        let cluster = Cluster::parse(FILE, Path::new("c.yaml")).unwrap();
        State::build(cluster, node).unwrap()
    }

    #[test]
    fn indexes_workloads_by_ip_and_uid_with_their_identity() {
        let state = state("node-a");
        assert_eq!(
            state
                .local_workloads()
                .iter()
                .map(|w| w.uid.as_str())
                .collect::<Vec<_>>(),
            ["demo/client", "demo/v1"]
        );
        let v2 = state.workload_by_ip("fd00:2::2".parse().unwrap()).unwrap();
        assert_eq!(v2.uid, "demo/v2");
        assert_eq!(v2.node.as_str(), "node-b");
        assert_eq!(
            v2.identity.to_string(),
            "spiffe://cluster.local/ns/demo/sa/rec"
        );
        assert!(state.workload_by_uid("prod/other").is_some());
        assert!(state.workload_by_ip("10.9.9.9".parse().unwrap()).is_none());
    }

    #[test]
    fn a_service_selects_workloads_of_its_namespace_and_maps_ports() {
        let state = state("node-a");
        match state.destination("10.96.0.10:80".parse().unwrap()) {
            Destination::Service {
                service,
                target_port,
            } => {
                assert_eq!(target_port, Some(8080));
                assert_eq!(service.hostname, "rec.demo.svc.cluster.local");
                let endpoints: Vec<_> = service.endpoints.iter().map(|w| w.uid.as_str()).collect();
                assert_eq!(endpoints, ["demo/v1", "demo/v2"]);
            }
            _ => panic!("the VIP is the service's"),
        }
        match state.destination("[fd00:96::10]:9000".parse().unwrap()) {
            Destination::Service { target_port, .. } => assert_eq!(target_port, Some(9000)),
            _ => panic!("the IPv6 VIP is the service's"),
        }
        match state.destination("10.96.0.10:81".parse().unwrap()) {
            Destination::Service { target_port, .. } => assert_eq!(target_port, None),
            _ => panic!("an undeclared port of the VIP is still the service's"),
        }
        assert!(matches!(
            state.destination("10.1.0.3:8080".parse().unwrap()),
            Destination::Workload(w) if w.uid == "demo/v1"
        ));
        assert!(matches!(
            state.destination("192.0.2.1:80".parse().unwrap()),
            Destination::Outside
        ));
    }

    #[test]
    fn endpoints_take_turns_and_an_ejected_one_goes_last() {
        let state = state("node-a");
        let Destination::Service { service, .. } =
            state.destination("10.96.0.10:80".parse().unwrap())
        else {
            panic!("the VIP is the service's");
        };
        let firsts: Vec<&str> = (0..4)
            .map(|_| service.endpoints_in_turn()[0].1.uid.as_str())
            .collect();
        assert_eq!(firsts, ["demo/v1", "demo/v2", "demo/v1", "demo/v2"]);
        service.eject(0);
        for _ in 0..2 {
            let order: Vec<&str> = service
                .endpoints_in_turn()
                .iter()
                .map(|(_, w)| w.uid.as_str())
                .collect();
            assert_eq!(order, ["demo/v2", "demo/v1"]);
        }
    }

    #[test]
    fn an_unknown_node_is_an_error() {
        let cluster = Cluster::parse(FILE, Path::new("c.yaml")).unwrap();
        let err = State::build(cluster, "node-z").unwrap_err();
        assert_eq!(
            err.to_string(),
            "node \"node-z\" is not in the cluster file (nodes: node-a, node-b)"
        );
    }

    #[test]
    fn a_vip_owned_by_a_workload_is_refused() {
        let text = FILE.replace("10.96.0.10,", "10.1.0.2,");
        let err = Cluster::parse(&text, Path::new("c.yaml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("service demo/rec: address 10.1.0.2 already belongs to demo/client"),
            "{err}"
        );
    }

    #[test]
    fn a_published_snapshot_replaces_the_current_one() {
        let store = StateStore::new(state("node-a"));
        let changes = store.subscribe();
        assert_eq!(store.load().local_workloads().len(), 2);
        store.publish(state("node-b"));
        assert!(changes.has_changed().unwrap());
        assert_eq!(store.load().node().name.as_str(), "node-b");
    }
}
