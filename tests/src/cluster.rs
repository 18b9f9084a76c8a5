//! A test cluster: nodes and pods made of network namespaces, veth pairs,
//! bridges and cgroups, with one real `mesh-agent` per node.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ca_service::{CA_SERVICE_NAME, CaAnswer, CaService};
use crate::pod::run_with_timeout;
use crate::pod::{ChildGuard, Pod, tail_of};
use crate::services::{Service, ServiceSpec};
use crate::sys::{self, BPFFS, ip, ip_in};

/// How long an agent may take to log `agent ready`.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
/// Clusters of this process not yet torn down.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// A unique id for one cluster instance: `mt{pid}x{counter}`.
fn next_id() -> String {
    format!(
        "mt{}x{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::SeqCst)
    )
}

/// Directory for the cluster's scratch files (cluster file, logs).
pub fn scratch_root() -> PathBuf {
    std::env::temp_dir().join("mesh-tests")
}

/// What the agent logs when every workload of its node is served, and when one is not.
const AGENT_READY: &str = "agent ready";
const AGENT_NOT_READY: &str = "agent not ready: workloads not served (their IPs stay guarded)";

/// The `mesh-agent` binary: `$MESH_AGENT_BIN`, else
/// `<workspace>/target/release/mesh-agent`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_AGENT_BIN") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .join("target/release/mesh-agent")
}

// ---------------------------------------------------------------- builder

/// A pod to create.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) enrolled: bool,
}

impl PodSpec {
    /// An enrolled pod in namespace `default` with service account `default`.
    pub fn new(name: &str) -> Self {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            enrolled: true,
        }
    }
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
    /// Removes a label (for [`Cluster::update_pod`]).
    pub fn without_label(mut self, key: &str) -> Self {
        self.labels.remove(key);
        self
    }
    /// Whether the pod is listed in the cluster file (captured by the mesh).
    pub fn enrolled(mut self, enrolled: bool) -> Self {
        self.enrolled = enrolled;
        self
    }
}

/// A node to create.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    name: String,
    excluded_ports: Vec<u16>,
    pods: Vec<PodSpec>,
}

impl NodeSpec {
    pub fn new(name: &str) -> Self {
        NodeSpec {
            name: name.into(),
            excluded_ports: Vec::new(),
            pods: Vec::new(),
        }
    }
    pub fn pod(mut self, pod: PodSpec) -> Self {
        self.pods.push(pod);
        self
    }
    /// Destination ports this node's agent must never capture.
    pub fn excluded_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.excluded_ports.extend(ports);
        self
    }
}

/// Describes a cluster; [`ClusterBuilder::build`] creates it.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    trust_domain: String,
    settings: MeshSettings,
    nodes: Vec<NodeSpec>,
    services: Vec<ServiceSpec>,
    ca_service: bool,
}

/// Mesh-wide settings written to the cluster file (durations as humantime strings, "24h").
#[derive(Debug, Clone, Default)]
struct MeshSettings {
    certificate_lifetime: Option<String>,
    hbone_idle_timeout: Option<String>,
    same_node_mode: Option<String>,
    limits: Option<FileLimits>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterBuilder {
    pub fn new() -> Self {
        ClusterBuilder {
            trust_domain: "cluster.local".into(),
            settings: MeshSettings::default(),
            nodes: Vec::new(),
            services: Vec::new(),
            ca_service: false,
        }
    }
    pub fn trust_domain(mut self, td: &str) -> Self {
        self.trust_domain = td.into();
        self
    }
    /// Lifetime of workload certificates, e.g. "4s" (default: the agent's, 24 h).
    pub fn certificate_lifetime(mut self, lifetime: &str) -> Self {
        self.settings.certificate_lifetime = Some(lifetime.into());
        self
    }
    /// Idle time after which pooled HBONE connections close, e.g. "2s".
    pub fn hbone_idle_timeout(mut self, timeout: &str) -> Self {
        self.settings.hbone_idle_timeout = Some(timeout.into());
        self
    }
    /// `sameNode.mode` of the cluster file: `shortCircuit` (the agent's default) or
    /// `mutualTls`.
    pub fn same_node_mode(mut self, mode: &str) -> Self {
        self.settings.same_node_mode = Some(mode.into());
        self
    }
    /// `limits` of the cluster file: concurrent connections and HBONE handshakes per workload
    /// (default: the agent's, 16384 and 32).
    pub fn limits(
        mut self,
        connections_per_workload: usize,
        handshakes_per_workload: usize,
    ) -> Self {
        self.settings.limits = Some(FileLimits {
            connections_per_workload,
            handshakes_per_workload,
        });
        self
    }
    pub fn node(mut self, node: NodeSpec) -> Self {
        self.nodes.push(node);
        self
    }
    /// Certificates from a central CA service instead of a signing key in the cluster file:
    /// `mesh-agent ca serve` on a host of its own on the fabric ([`CaService`]), each node
    /// enrolled with `ca add-node` into [`Cluster::node_credential_dir`], the cluster file's
    /// `identity.ca` pointing at it, agents started with `--ca-credential`. The CA runs once
    /// [`ClusterBuilder::build`] returns; see [`Cluster::stop_ca`] and [`Cluster::start_ca`].
    pub fn with_ca_service(mut self) -> Self {
        self.ca_service = true;
        self
    }
    /// A Service (virtual IPs given in order: 10.96.1.1, 10.96.1.2, ...; see [`Service`]).
    pub fn service(mut self, service: ServiceSpec) -> Self {
        self.services.push(service);
        self
    }

    /// Creates the namespaces, links, cgroups, pin dirs and cluster file.
    /// Agents are not started. On error, whatever was made is torn down.
    pub fn build(self) -> Result<Cluster> {
        check_spec(&self)?;
        if unsafe { libc::geteuid() } != 0 {
            bail!("the test cluster needs root (network namespaces, cgroups, bpffs)");
        }
        sys::ensure_bpffs()?;
        if let Err(e) = crate::sweep_stale() {
            eprintln!("mesh-tests: sweeping stale leftovers failed: {e:#}");
        }
        let id = next_id();
        LIVE.fetch_add(1, Ordering::SeqCst);
        let workdir = scratch_root().join(&id);
        let mut cluster = Cluster {
            cgroup_dir: sys::cgroup_root().join(&id),
            pin_root: Path::new(BPFFS).join(&id),
            cluster_file: workdir.join("cluster.yaml"),
            workdir,
            id,
            trust_domain: self.trust_domain.clone(),
            settings: self.settings.clone(),
            nodes: Vec::new(),
            services: self
                .services
                .iter()
                .cloned()
                .zip(0..)
                .map(|(spec, k)| Service::allocate(spec, k))
                .collect(),
            netns: Mutex::new(Vec::new()),
            agents: Mutex::new(HashMap::new()),
            edits: Mutex::new(()),
            torn_down: AtomicBool::new(false),
            ca_service: None,
        };
        if self.ca_service {
            cluster.ca_service = Some(CaService::new(&cluster));
        }
        cluster
            .create(&self.nodes)
            .with_context(|| format!("build test cluster {}", cluster.id))?;
        Ok(cluster)
    }
}

fn check_spec(b: &ClusterBuilder) -> Result<()> {
    if b.nodes.is_empty() || b.nodes.len() > 250 {
        bail!("a cluster needs 1..=250 nodes");
    }
    if b.ca_service && b.nodes.iter().any(|n| n.name == CA_SERVICE_NAME) {
        bail!("a node called `{CA_SERVICE_NAME}` would share the CA service's netns name");
    }
    let mut names = std::collections::HashSet::new();
    for n in &b.nodes {
        if !names.insert(&n.name) {
            bail!("duplicate node name {}", n.name);
        }
        if n.pods.len() > 250 {
            bail!("node {}: at most 250 pods", n.name);
        }
        let mut pods = std::collections::HashSet::new();
        for p in &n.pods {
            if !pods.insert(&p.name) {
                bail!("node {}: duplicate pod name {}", n.name, p.name);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- cluster

/// One node: a network namespace, a cgroup subtree, a pin dir, its pods.
#[derive(Debug)]
pub struct Node {
    name: String,
    index: u8,
    netns: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    excluded_ports: Vec<u16>,
    pods: Mutex<NodePods>,
}

/// A node's pods; they change while the cluster runs ([`Cluster::add_pod`] and friends).
#[derive(Debug)]
struct NodePods {
    /// The node's pods now, in creation order.
    live: Vec<Arc<Pod>>,
    /// Pods removed, and old versions of updated ones: kept until the node goes, because
    /// references that [`Node::pods`] and [`Cluster::pod`] handed out may still point at them.
    retired: Vec<Arc<Pod>>,
    /// The index `j` of the next pod (`p{j}`, 10.*i*.0.*j+1*); never reused, as an IPAM that
    /// allocates round-robin does not hand a just-freed address out again at once.
    next_index: u8,
}

impl NodePods {
    /// Where the live pod `name` of `node` is in [`NodePods::live`].
    fn position(&self, name: &str, node: &str) -> Result<usize> {
        self.live
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| anyhow!("no pod {name} on node {node}"))
    }
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// 1-based position; the node's addresses and pod CIDRs derive from it.
    pub fn index(&self) -> u8 {
        self.index
    }
    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 255, 0, self.index)
    }
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, self.index.into())
    }
    pub fn netns_name(&self) -> &str {
        &self.netns
    }
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }
    /// The node's cgroup directory (holds `agent` and `pods`).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
    /// The cgroup subtree of the node's pods (`workloadCgroup`).
    pub fn pods_cgroup(&self) -> PathBuf {
        self.cgroup.join("pods")
    }
    pub fn agent_cgroup(&self) -> PathBuf {
        self.cgroup.join("agent")
    }
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
    pub fn excluded_ports(&self) -> &[u16] {
        &self.excluded_ports
    }
    /// The node's pods now (pods added or removed while the cluster runs included).
    pub fn pods(&self) -> Vec<&Pod> {
        self.lock_pods().live.iter().map(|p| self.hold(p)).collect()
    }
    /// The node's pod called `name` now. After [`Cluster::update_pod`] this is the new
    /// version; a `&Pod` taken before keeps the old spec (addresses, netns and cgroup are the
    /// same in every version).
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.lock_pods()
            .live
            .iter()
            .find(|p| p.name == name)
            .map(|p| self.hold(p))
    }

    fn lock_pods(&self) -> MutexGuard<'_, NodePods> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Borrows a pod of this node for as long as the node lives.
    fn hold(&self, pod: &Arc<Pod>) -> &Pod {
        // SAFETY: every `Arc<Pod>` ever put in `self.pods` stays there (in `live`, or moved to
        // `retired`) until the node is dropped, so the `Pod` it points to lives at least as
        // long as `&self`; a `Pod` is never mutated once shared (no interior mutability).
        unsafe { &*Arc::as_ptr(pod) }
    }
}

/// The cluster file's `policy.path`, relative to the cluster file.
const POLICY_DIR: &str = "policies";

/// A running agent.
struct Agent {
    child: Child,
    /// The cluster file it reads; `None` in Kubernetes mode.
    cluster_file: Option<PathBuf>,
}

/// A test cluster. Everything it made is removed on drop (or [`Cluster::teardown`]).
pub struct Cluster {
    id: String,
    trust_domain: String,
    settings: MeshSettings,
    workdir: PathBuf,
    cluster_file: PathBuf,
    cgroup_dir: PathBuf,
    pin_root: PathBuf,
    nodes: Vec<Node>,
    services: Vec<Service>,
    /// Network namespaces created so far, in creation order.
    netns: Mutex<Vec<String>>,
    agents: Mutex<HashMap<String, Agent>>,
    /// Held while the cluster file (and the pods it lists) changes: one change at a time.
    edits: Mutex<()>,
    torn_down: AtomicBool,
    /// The central CA, with [`ClusterBuilder::with_ca_service`].
    ca_service: Option<CaService>,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::new()
    }

    /// The run id (`mt{pid}x{n}`) that prefixes every name of this cluster.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The mesh's trust domain (SPIFFE IDs are `spiffe://<it>/ns/<ns>/sa/<sa>`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    /// Scratch directory (cluster file, agent and server logs); removed on teardown.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }
    pub fn cluster_file(&self) -> &Path {
        &self.cluster_file
    }
    /// The cluster's cgroup directory (a subdirectory per node); everything in it is killed
    /// and removed on teardown, so other parts of the harness put their processes below it.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }
    /// The fabric's network namespace, whose bridge `br0` links the nodes.
    pub fn fabric_netns(&self) -> String {
        format!("{}-fab", self.id)
    }
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name} in cluster {}", self.id))
    }
    /// The pod called `pod` on `node` now (see [`Node::pod`]).
    pub fn pod(&self, node: &str, pod: &str) -> Result<&Pod> {
        self.node(node)?
            .pod(pod)
            .ok_or_else(|| anyhow!("no pod {pod} on node {node}"))
    }

    // ------------------------------------------------------------ creation

    fn create(&mut self, specs: &[NodeSpec]) -> Result<()> {
        sys::mkdir_all(&self.workdir)?;
        let fab = self.fabric_netns();
        self.add_netns(&fab)?;
        ip_in(&fab, &["link", "set", "lo", "up"])?;
        ip_in(
            &fab,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        ip_in(&fab, &["link", "set", "br0", "up"])?;

        for (i, spec) in specs.iter().enumerate() {
            let node = self.create_node(&fab, (i + 1) as u8, spec)?;
            self.nodes.push(node);
        }
        self.add_node_routes()?;
        if let Some(ca) = &self.ca_service {
            ca.set_up(self).context("set up the CA service")?;
        }
        self.write_cluster_file()?;
        self.program_kube_proxy()?;
        if let Some(ca) = &self.ca_service {
            ca.start().context("start the CA service")?;
        }
        Ok(())
    }

    /// Attaches a host of its own to the fabric, as a machine on the nodes' network: makes the
    /// netns `netns` (removed on teardown) with `eth0` holding `ipv4`/24 and `ipv6`/64, whose
    /// peer `port` is a port of the fabric's bridge. (The control plane and the CA service
    /// live on such hosts.)
    pub(crate) fn add_fabric_host(
        &self,
        netns: &str,
        port: &str,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> Result<()> {
        let fab = self.fabric_netns();
        self.add_netns(netns)?;
        ip(&[
            "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", port, "netns",
            &fab,
        ])?;
        ip_in(&fab, &["link", "set", port, "master", "br0", "up"])?;
        ip_in(netns, &["link", "set", "lo", "up"])?;
        ip_in(netns, &["link", "set", "eth0", "up"])?;
        ip_in(
            netns,
            &["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"],
        )?;
        ip_in(
            netns,
            &["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"],
        )
    }

    /// Creates a netns (IPv6 DAD off, see [`sys::netns_add`]), removed on teardown.
    pub(crate) fn add_netns(&self, name: &str) -> Result<()> {
        self.register_netns(name);
        sys::netns_add(name)
    }

    /// Notes a netns name for teardown (before it is made, so a half-made one goes too).
    fn register_netns(&self, name: &str) {
        let mut netns = self.netns.lock().unwrap_or_else(|e| e.into_inner());
        if !netns.iter().any(|n| n == name) {
            netns.push(name.to_owned());
        }
    }

    fn create_node(&self, fab: &str, i: u8, spec: &NodeSpec) -> Result<Node> {
        let ns = format!("{}-{}", self.id, spec.name);
        self.add_netns(&ns)?;
        let fab_port = format!("n{i}");
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &fab_port,
            "netns", fab,
        ])?;
        ip_in(fab, &["link", "set", &fab_port, "master", "br0", "up"])?;
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        ip_in(&ns, &["link", "set", "eth0", "up"])?;
        ip_in(
            &ns,
            &["addr", "add", &format!("10.255.0.{i}/24"), "dev", "eth0"],
        )?;
        ip_in(
            &ns,
            &[
                "addr",
                "add",
                &format!("fd00:ff::{i}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ip_in(
            &ns,
            &[
                "link",
                "add",
                "cbr0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        ip_in(&ns, &["link", "set", "cbr0", "up"])?;
        ip_in(
            &ns,
            &["addr", "add", &format!("10.{i}.0.1/24"), "dev", "cbr0"],
        )?;
        ip_in(
            &ns,
            &[
                "addr",
                "add",
                &format!("fd00:{i}::1/64"),
                "dev",
                "cbr0",
                "nodad",
            ],
        )?;

        let cgroup = self.cgroup_dir.join(&spec.name);
        sys::mkdir_all(&cgroup.join("agent"))?;
        let pin_dir = self.pin_root.join(&spec.name);
        sys::mkdir_all(&pin_dir)?;

        let settings = [
            ("net/ipv4/ip_forward".to_string(), "1"),
            ("net/ipv6/conf/all/forwarding".to_string(), "1"),
        ]
        .into_iter()
        .chain(
            ["all", "default", "eth0", "cbr0"]
                .map(|d| (format!("net/ipv4/conf/{d}/rp_filter"), "0")),
        )
        .collect::<Vec<_>>();
        sys::sysctls_in(&sys::netns_path(&ns), &settings)
            .with_context(|| format!("sysctls in {ns}"))?;

        let node = Node {
            name: spec.name.clone(),
            index: i,
            netns: ns,
            cgroup,
            pin_dir,
            excluded_ports: spec.excluded_ports.clone(),
            pods: Mutex::new(NodePods {
                live: Vec::new(),
                retired: Vec::new(),
                next_index: 1,
            }),
        };
        for pspec in &spec.pods {
            self.create_pod(&node, pspec)?;
        }
        Ok(node)
    }

    /// Creates a pod on `node` (the next index, see [`NodePods::next_index`]): its network
    /// namespace ([`Pod::create_netns`]) and cgroup; it is listed in the node from then on.
    /// The cluster file is not rewritten.
    fn create_pod<'n>(&self, node: &'n Node, spec: &PodSpec) -> Result<&'n Pod> {
        let j = {
            let mut pods = node.lock_pods();
            if pods.live.iter().any(|p| p.name == spec.name) {
                bail!("node {} already has a pod {}", node.name, spec.name);
            }
            if pods.next_index > 250 {
                bail!("node {}: no pod index left (at most 250 pods)", node.name);
            }
            pods.next_index += 1;
            pods.next_index - 1
        };
        let i = node.index;
        let pod = Pod {
            name: spec.name.clone(),
            node: node.name.clone(),
            namespace: spec.namespace.clone(),
            service_account: spec.service_account.clone(),
            labels: spec.labels.clone(),
            enrolled: spec.enrolled,
            ipv4: Ipv4Addr::new(10, i, 0, j + 1),
            ipv6: Ipv6Addr::new(0xfd00, i.into(), 0, 0, 0, 0, 0, (j + 1).into()),
            netns: format!("{}-{}-{}", self.id, node.name, spec.name),
            cgroup: node.pods_cgroup().join(&spec.name),
            node_netns: node.netns.clone(),
            veth: format!("p{j}"),
            gateway4: Ipv4Addr::new(10, i, 0, 1),
            gateway6: Ipv6Addr::new(0xfd00, i.into(), 0, 0, 0, 0, 0, 1),
            workdir: self.workdir.clone(),
        };
        self.register_netns(&pod.netns);
        pod.create_netns()
            .with_context(|| format!("create the netns of pod {}", pod.name))?;
        sys::mkdir_all(&pod.cgroup)?;
        let pod = Arc::new(pod);
        node.lock_pods().live.push(pod.clone());
        Ok(node.hold(&pod))
    }

    /// Each node routes the other nodes' pod CIDRs via their fabric address.
    fn add_node_routes(&self) -> Result<()> {
        for n in &self.nodes {
            for k in self.nodes.iter().filter(|k| k.index != n.index) {
                let k = k.index;
                ip_in(
                    &n.netns,
                    &[
                        "route",
                        "add",
                        &format!("10.{k}.0.0/24"),
                        "via",
                        &format!("10.255.0.{k}"),
                    ],
                )?;
                ip_in(
                    &n.netns,
                    &[
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:{k}::/64"),
                        "via",
                        &format!("fd00:ff::{k}"),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// A `Command` that runs `program` in the node's network namespace and the node's own
    /// cgroup (outside its pods, so the mesh does not capture it).
    pub fn node_command<I, S>(&self, node: &str, program: &str, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let n = self.node(node)?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        sys::place(&mut cmd, n.cgroup(), &n.netns_path())?;
        Ok(cmd)
    }

    /// Starts `program` in the node (see [`Cluster::node_command`]), e.g. a packet capture on
    /// the node's link; killed on drop.
    pub fn spawn_in_node<I, S>(&self, node: &str, program: &str, args: I) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let child = self
            .node_command(node, program, args)?
            .spawn()
            .with_context(|| format!("spawn {program} in node {node}"))?;
        Ok(ChildGuard {
            child,
            name: format!("{program} in node {node}"),
        })
    }

    /// Runs `program` in the node (see [`Cluster::node_command`]) to completion, like
    /// [`Pod::run`].
    pub fn run_in_node<I, S>(
        &self,
        node: &str,
        program: &str,
        args: I,
        timeout: Duration,
    ) -> Result<crate::RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run_with_timeout(&mut self.node_command(node, program, args)?, timeout)
            .with_context(|| format!("{program} in node {node}"))
    }

    /// `GET http://127.0.0.1:15021/healthz/ready` from inside the node: the agent's answer as
    /// (status code, body). Fails if nothing answers.
    pub fn readiness(&self, node: &str) -> Result<(u16, String)> {
        const URL: &str = "http://127.0.0.1:15021/healthz/ready";
        let out = self.run_in_node(
            node,
            "curl",
            ["-sS", "--max-time", "5", "-w", "\n%{http_code}", URL],
            Duration::from_secs(10),
        )?;
        if !out.success() {
            bail!(
                "GET {URL} in node {node}: curl exited {:?}: {}",
                out.code(),
                out.stderr_str().trim()
            );
        }
        let text = out.stdout_str();
        let (body, code) = text
            .rsplit_once('\n')
            .ok_or_else(|| anyhow!("GET {URL} in node {node}: no status in {text:?}"))?;
        let code = code
            .parse()
            .with_context(|| format!("GET {URL} in node {node}: status {code:?}"))?;
        Ok((code, body.to_owned()))
    }

    /// The mesh CA made by `mesh-agent ca init` for this cluster: `ca-cert.pem`, `ca-key.pem`.
    /// With [`ClusterBuilder::with_ca_service`] it is the CA service's directory, on the CA's
    /// host only ([`CaService::dir`]); otherwise `ca/` next to the cluster file, which names it.
    pub fn ca_dir(&self) -> PathBuf {
        match &self.ca_service {
            Some(ca) => ca.dir().to_owned(),
            None => self.workdir.join("ca"),
        }
    }

    /// The central CA ([`ClusterBuilder::with_ca_service`]).
    pub fn ca_service(&self) -> Result<&CaService> {
        self.ca_service
            .as_ref()
            .ok_or_else(|| anyhow!("cluster {} has no CA service (with_ca_service)", self.id))
    }

    /// A CA outage: stops `mesh-agent ca serve` (SIGTERM, then waits for it to exit).
    pub fn stop_ca(&self) -> Result<ExitStatus> {
        self.ca_service()?.stop()
    }

    /// Starts the CA service again (same directory, same signing key, same node registry) and
    /// waits until it is ready.
    pub fn start_ca(&self) -> Result<()> {
        self.ca_service()?.start()
    }

    /// The node's own directory of files (none of them the CA's): the node credential lives
    /// in it ([`Cluster::node_credential_dir`]).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.workdir.join("nodes").join(node)
    }

    /// Where `mesh-agent ca add-node` put the node's credential (`node-cert.pem`,
    /// `node-key.pem`, `ca-roots.pem`); its agent runs with `--ca-credential` this directory.
    pub fn node_credential_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("ca-credential")
    }

    /// The CA service's trust bundle as the agents get it (`identity.ca.roots` of the cluster
    /// file): a copy of the `ca-roots.pem` that `ca add-node` handed out.
    pub fn ca_roots_path(&self) -> PathBuf {
        self.workdir.join("ca-roots.pem")
    }

    /// Asks the CA service for a certificate for `identity` from inside `node`'s netns, as an
    /// agent there would, authenticating with the node credential in `credential` (a directory
    /// with `node-cert.pem` and `node-key.pem`; `None`: no client certificate). See
    /// [`CaService::request_certificate`].
    pub fn request_certificate(
        &self,
        node: &str,
        credential: Option<&Path>,
        identity: &str,
    ) -> Result<CaAnswer> {
        let netns = self.node(node)?.netns_path();
        self.ca_service()?
            .request_certificate(&netns, &self.ca_roots_path(), credential, identity)
            .with_context(|| format!("ask the CA for {identity} from node {node}"))
    }

    fn create_ca(&self) -> Result<()> {
        let mut init = Command::new(agent_bin());
        init.arg("ca").arg("init").arg(self.ca_dir());
        let output = run_with_timeout(&mut init, Duration::from_secs(20))?;
        if !output.success() {
            bail!("mesh-agent ca init failed: {}", output.stderr_str());
        }
        Ok(())
    }

    /// Every pod's name resolves to its addresses, as a Service name would in Kubernetes.
    fn write_hosts_file(&self) -> Result<()> {
        // The machine's own entries first: programs look up their host's name at start (Python's
        // http.server does), and a miss goes to DNS, which is out of reach here.
        let mut hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
        // A name that is both a Service's and a pod's is the Service's alone (resolvers return
        // every address of a name and may prefer the pod's).
        hosts.push_str("\n# services of this test cluster\n");
        for service in &self.services {
            hosts.push_str(&service.hosts_lines(&self.trust_domain));
        }
        hosts.push_str("\n# pods of this test cluster\n");
        let pods = self.nodes.iter().flat_map(|n| n.pods());
        for pod in pods.filter(|p| self.services.iter().all(|s| s.name() != p.name)) {
            hosts.push_str(&format!(
                "{} {}\n{} {}\n",
                pod.ipv4, pod.name, pod.ipv6, pod.name
            ));
        }
        sys::write_atomic(&self.workdir.join(crate::pod::HOSTS_FILE), hosts.as_bytes())
    }

    /// The cluster's Services, as created (with their virtual IPs).
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| anyhow!("no service {name} in cluster {}", self.id))
    }

    /// Every node plays kube-proxy for the pods outside the mesh (mesh pods' connections to a
    /// virtual IP are the agent's).
    fn program_kube_proxy(&self) -> Result<()> {
        if self.services.is_empty() {
            return Ok(());
        }
        let pods: Vec<&Pod> = self.nodes.iter().flat_map(|n| n.pods()).collect();
        for node in &self.nodes {
            crate::services::program_node(&node.netns, &self.workdir, &self.services, &pods)?;
        }
        Ok(())
    }

    /// Where the agents read Istio security policies from (`policy.path` of the cluster file).
    pub fn policy_dir(&self) -> PathBuf {
        self.workdir.join(POLICY_DIR)
    }

    /// Writes `yaml` (Istio `security.istio.io/v1` documents) as `policies/<name>.yaml` and
    /// waits until every running agent has loaded it.
    pub fn apply_policy(&self, name: &str, yaml: &str) -> Result<()> {
        self.change_policies(|dir| {
            fs::write(dir.join(format!("{name}.yaml")), yaml).context("write policy")
        })
    }

    /// Removes `policies/<name>.yaml` and waits until every running agent has reloaded.
    pub fn delete_policy(&self, name: &str) -> Result<()> {
        self.change_policies(|dir| {
            fs::remove_file(dir.join(format!("{name}.yaml"))).context("remove policy")
        })
    }

    /// Runs `change` (given the policy directory; on Kubernetes it changes API objects
    /// instead) and waits until every running agent has loaded, or rejected, the result.
    pub fn change_policies(&self, change: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let running: Vec<String> = self.agents.lock().unwrap().keys().cloned().collect();
        let loaded = |node: &str| -> Result<usize> {
            Ok(self
                .agent_logs(node)?
                .iter()
                .filter(|l| {
                    l["message"] == "policy loaded"
                        || l["message"] == "policy rejected; keeping the last good policy"
                })
                .count())
        };
        let before: Vec<usize> = running.iter().map(|n| loaded(n)).collect::<Result<_>>()?;
        change(&self.policy_dir())?;
        for (node, before) in running.iter().zip(before) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while loaded(node)? <= before {
                if Instant::now() > deadline {
                    bail!(
                        "agent of {node} did not reload the policies; {}",
                        self.agent_log_tail(node)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The first cluster file (and the CA, the policy dir, the hosts file), before any agent.
    fn write_cluster_file(&self) -> Result<()> {
        if self.ca_service.is_none() {
            self.create_ca()?;
        }
        sys::mkdir_all(&self.policy_dir())?;
        self.write_hosts_file()?;
        sys::write_atomic(&self.cluster_file, self.cluster_file_text()?.as_bytes())
    }

    /// The cluster file for the cluster as it is now (every node, every enrolled pod), as the
    /// harness writes it; a start for hand-made edits ([`Cluster::write_raw_cluster_file`]).
    pub fn cluster_file_text(&self) -> Result<String> {
        let doc = FileDoc {
            trust_domain: self.trust_domain.clone(),
            identity: match &self.ca_service {
                None => FileIdentity {
                    ca_cert: Some("ca/ca-cert.pem".into()),
                    ca_key: Some("ca/ca-key.pem".into()),
                    ca: None,
                    certificate_lifetime: self.settings.certificate_lifetime.clone(),
                },
                Some(ca) => FileIdentity {
                    ca_cert: None,
                    ca_key: None,
                    ca: Some(FileCa {
                        address: ca.address(),
                        roots: self.ca_roots_path().display().to_string(),
                    }),
                    certificate_lifetime: self.settings.certificate_lifetime.clone(),
                },
            },
            hbone: FileHbone {
                idle_timeout: self.settings.hbone_idle_timeout.clone(),
            },
            same_node: self
                .settings
                .same_node_mode
                .clone()
                .map(|mode| FileSameNode { mode }),
            limits: self.settings.limits.clone(),
            policy: FilePolicy {
                path: POLICY_DIR.into(),
            },
            nodes: self
                .nodes
                .iter()
                .map(|n| FileNode {
                    name: n.name.clone(),
                    addresses: vec![n.ipv4().to_string(), n.ipv6().to_string()],
                    workload_cgroup: n.pods_cgroup().display().to_string(),
                    excluded_ports: n.excluded_ports.clone(),
                    workloads: n
                        .pods()
                        .into_iter()
                        .filter(|p| p.enrolled)
                        .map(|p| FileWorkload {
                            name: p.name.clone(),
                            namespace: p.namespace.clone(),
                            service_account: p.service_account.clone(),
                            labels: p.labels.clone(),
                            ips: p.ips().iter().map(ToString::to_string).collect(),
                            netns: p.netns_path().display().to_string(),
                            cgroup: p.cgroup.display().to_string(),
                        })
                        .collect(),
                })
                .collect(),
            services: self.services.iter().map(Service::file_entry).collect(),
        };
        serde_yaml_ng::to_string(&doc).context("serialize cluster file")
    }

    // ------------------------------------------------------------ live changes

    /// What a kubelet and a CNI do when a pod is scheduled on `node` while the mesh runs: makes
    /// the pod as the builder does (next free index on the node: veth `p{j}`, addresses
    /// 10.*i*.0.*j+1* and fd00:*i*::*j+1*, netns, cgroup), adds it to the hosts file, rewrites
    /// the cluster file and waits until every running agent has loaded it (see
    /// [`Cluster::write_raw_cluster_file`]). A pod that is not enrolled is not in the cluster
    /// file, so then nothing is waited for.
    pub fn add_pod(&self, node: &str, spec: PodSpec) -> Result<&Pod> {
        let _edit = self.lock_edits();
        let n = self.node(node)?;
        let pod = self
            .create_pod(n, &spec)
            .with_context(|| format!("add pod {} to {node}", spec.name))?;
        self.publish()
            .with_context(|| format!("publish pod {} on {node}", spec.name))?;
        Ok(pod)
    }

    /// What happens when a pod is deleted: it leaves the cluster file (rewritten; every
    /// running agent must load it), then its processes are killed and its veth, network
    /// namespace and cgroup deleted. The pod's resources go even if an agent failed to
    /// reload (that failure is returned).
    pub fn remove_pod(&self, node: &str, name: &str) -> Result<()> {
        let _edit = self.lock_edits();
        let n = self.node(node)?;
        let pod = {
            let mut pods = n.lock_pods();
            let k = pods.position(name, node)?;
            let pod = pods.live.remove(k);
            pods.retired.push(pod.clone());
            pod
        };
        let published = self.publish();
        pod.destroy()
            .with_context(|| format!("remove pod {name} from {node}"))?;
        self.netns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|ns| *ns != pod.netns);
        published.with_context(|| format!("unpublish pod {name} on {node}"))
    }

    /// Changes a pod's spec (labels, service account, namespace, enrolment; not its name) the
    /// way an edit of the pod's metadata reaches the mesh: the cluster file is rewritten and
    /// every running agent must load it. The pod's netns, cgroup, addresses and processes
    /// stay. Returns the pod's new version (see [`Node::pod`]).
    pub fn update_pod(
        &self,
        node: &str,
        name: &str,
        change: impl FnOnce(PodSpec) -> PodSpec,
    ) -> Result<&Pod> {
        let _edit = self.lock_edits();
        let n = self.node(node)?;
        let new = {
            let mut pods = n.lock_pods();
            let k = pods.position(name, node)?;
            let spec = change(pods.live[k].spec());
            if spec.name != name {
                bail!("update_pod cannot rename pod {name} to {}", spec.name);
            }
            let new = Arc::new(Pod {
                namespace: spec.namespace,
                service_account: spec.service_account,
                labels: spec.labels,
                enrolled: spec.enrolled,
                ..Pod::clone(&pods.live[k])
            });
            let old = std::mem::replace(&mut pods.live[k], new.clone());
            pods.retired.push(old);
            new
        };
        self.publish()
            .with_context(|| format!("publish the update of pod {name} on {node}"))?;
        Ok(n.hold(&new))
    }

    /// Replaces the cluster file with `text` (atomically: a new file renamed over it) and
    /// waits up to 10 s until every running agent that reads it has logged its verdict, the
    /// first [`CLUSTER_FILE_LOADED`] or [`CLUSTER_FILE_REJECTED`] line after the change.
    /// Returns each agent's line, by node. The harness's own view of the pods does not change:
    /// the next [`Cluster::add_pod`] (or friend) writes the file from it again.
    pub fn write_raw_cluster_file(&self, text: &str) -> Result<BTreeMap<String, Reload>> {
        let _edit = self.lock_edits();
        self.replace_cluster_file(text)
    }

    fn lock_edits(&self) -> MutexGuard<'_, ()> {
        self.edits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the hosts file and the cluster file for the pods as they are now; unless the
    /// cluster file stays the same, waits until every running agent has loaded it.
    fn publish(&self) -> Result<()> {
        self.write_hosts_file()?;
        self.program_kube_proxy()?;
        let text = self.cluster_file_text()?;
        if fs::read_to_string(&self.cluster_file).is_ok_and(|old| old == text) {
            return Ok(());
        }
        for (node, reload) in self.replace_cluster_file(&text)? {
            if let Reload::Rejected(line) = reload {
                bail!("{node}'s agent rejected the cluster file the harness wrote: {line}");
            }
        }
        Ok(())
    }

    fn replace_cluster_file(&self, text: &str) -> Result<BTreeMap<String, Reload>> {
        let watching: Vec<String> = self
            .agents
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|(_, a)| a.cluster_file.as_deref() == Some(self.cluster_file.as_path()))
            .filter_map(|(node, a)| matches!(a.child.try_wait(), Ok(None)).then(|| node.clone()))
            .collect();
        let verdicts = |node: &str| -> Result<Vec<Value>> {
            Ok(self
                .agent_logs(node)?
                .into_iter()
                .filter(|l| {
                    l["message"] == CLUSTER_FILE_LOADED || l["message"] == CLUSTER_FILE_REJECTED
                })
                .collect())
        };
        let before: Vec<usize> = watching
            .iter()
            .map(|n| verdicts(n).map(|v| v.len()))
            .collect::<Result<_>>()?;
        sys::write_atomic(&self.cluster_file, text.as_bytes())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = BTreeMap::new();
        for (node, before) in watching.into_iter().zip(before) {
            let line = loop {
                if let Some(line) = verdicts(&node)?.into_iter().nth(before) {
                    break line;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{node}'s agent logged neither `{CLUSTER_FILE_LOADED}` nor \
                         `{CLUSTER_FILE_REJECTED}` within 10 s of the cluster file change; {}",
                        self.agent_log_tail(&node)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            };
            let reload = if line["message"] == CLUSTER_FILE_LOADED {
                Reload::Loaded(line)
            } else {
                Reload::Rejected(line)
            };
            out.insert(node, reload);
        }
        Ok(out)
    }

    // ------------------------------------------------------------ agents

    /// Path of the node's agent log (all runs of the agent append to it).
    pub fn agent_log_path(&self, node: &str) -> PathBuf {
        self.workdir.join(format!("{node}-agent.log"))
    }

    /// Starts `mesh-agent run` for `node` (in the node's `agent` cgroup and
    /// netns) and waits until it logs `agent ready`.
    pub fn start_agent(&self, node: &str) -> Result<()> {
        self.start_agent_with(node, &self.cluster_file)
    }

    /// Like [`Cluster::start_agent`], but the agent reads `cluster_file` (for tests where one
    /// node's view of the mesh differs from the others').
    pub fn start_agent_with(&self, node: &str, cluster_file: &Path) -> Result<()> {
        self.start_agent_until(node, cluster_file, AGENT_READY)
    }

    /// Starts the node's agent and returns once it has said that it is *not* ready (some
    /// workload unserved: its certificate cannot be had, say), for tests of what it does then.
    pub fn start_agent_unready(&self, node: &str) -> Result<()> {
        let file = self.cluster_file.clone();
        self.start_agent_until(node, &file, AGENT_NOT_READY)
    }

    fn start_agent_until(&self, node: &str, cluster_file: &Path, until: &str) -> Result<()> {
        let mut run: Vec<OsString> = vec!["--cluster".into(), cluster_file.into()];
        run.extend(["--node".into(), node.into()]);
        if self.ca_service.is_some() {
            run.extend([
                "--ca-credential".into(),
                self.node_credential_dir(node).into(),
            ]);
        }
        let cgroup = self.node(node)?.agent_cgroup();
        self.spawn_agent(node, run, &cgroup, Some(cluster_file), Vec::new(), until)
    }

    /// Starts `mesh-agent run RUN_ARGS` with `env` in the node's netns and `cgroup` (Kubernetes
    /// mode: no cluster file), and waits until it is ready.
    pub(crate) fn spawn_agent_with_env(
        &self,
        node: &str,
        run_args: Vec<OsString>,
        cgroup: &Path,
        env: Vec<(String, OsString)>,
    ) -> Result<()> {
        self.spawn_agent(node, run_args, cgroup, None, env, AGENT_READY)
    }

    /// Starts `mesh-agent run RUN_ARGS --bpf-pin-dir <node's> --log-format json` in the node's
    /// netns and `cgroup`, logging to [`Cluster::agent_log_path`], and waits until it logs
    /// `until` (ready, or not).
    fn spawn_agent(
        &self,
        node: &str,
        run_args: Vec<OsString>,
        cgroup: &Path,
        cluster_file: Option<&Path>,
        env: Vec<(String, OsString)>,
        until: &str,
    ) -> Result<()> {
        let n = self.node(node)?;
        if self.agents.lock().unwrap().contains_key(node) {
            bail!("agent for {node} already running");
        }
        let bin = agent_bin();
        if !bin.exists() {
            bail!(
                "mesh-agent binary not found at {} (build it with `cargo build --release -p mesh-agent`, or set MESH_AGENT_BIN)",
                bin.display()
            );
        }
        let log_path = self.agent_log_path(node);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let start_offset = log.metadata()?.len();
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .args(run_args)
            .arg("--bpf-pin-dir")
            .arg(&n.pin_dir)
            .args(["--log-format", "json"])
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        sys::place(&mut cmd, cgroup, &n.netns_path())?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;

        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            let ready = read_log(&log_path, start_offset)?
                .iter()
                .any(|v| v.get("message").and_then(Value::as_str) == Some(until));
            if ready {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "agent for {node} exited ({status}) before it was ready; {}",
                    tail_of(&log_path)
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "agent for {node} did not log `{until}` within {AGENT_READY_TIMEOUT:?}; {}",
                    tail_of(&log_path)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        // Not locked while waiting, so a teardown can run meanwhile (it kills
        // this agent through its cgroup even though it is not listed yet).
        self.agents.lock().unwrap().insert(
            node.to_owned(),
            Agent {
                child,
                cluster_file: cluster_file.map(Path::to_owned),
            },
        );
        Ok(())
    }

    /// Starts every node's agent.
    pub fn start_agents(&self) -> Result<()> {
        for n in &self.nodes {
            self.start_agent(&n.name)?;
        }
        Ok(())
    }

    /// Sends SIGTERM to the node's agent and waits (up to 10 s, then SIGKILL
    /// and an error) for it to exit; returns its exit status.
    pub fn stop_agent(&self, node: &str) -> Result<ExitStatus> {
        let mut agent = self
            .agents
            .lock()
            .unwrap()
            .remove(node)
            .ok_or_else(|| anyhow!("no agent running for {node}"))?;
        match terminate(&mut agent.child, Duration::from_secs(10))? {
            (status, false) => Ok(status),
            (status, true) => bail!(
                "agent for {node} ignored SIGTERM for 10 s; killed ({status}); {}",
                tail_of(&self.agent_log_path(node))
            ),
        }
    }

    /// Whether the node's agent is (still) running.
    pub fn agent_running(&self, node: &str) -> bool {
        let mut agents = self.agents.lock().unwrap();
        match agents.get_mut(node) {
            Some(a) => matches!(a.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id of the node's agent, while the harness runs one: for figures read from
    /// /proc (its memory, its CPU time) in modes where its cgroup is not the node's `agent`.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents.lock().unwrap().get(node).map(|a| a.child.id())
    }

    /// Every JSON line the node's agent has logged so far (all runs; non-JSON
    /// lines skipped).
    pub fn agent_logs(&self, node: &str) -> Result<Vec<Value>> {
        read_log(&self.agent_log_path(node), 0)
    }

    /// The last lines of the node's agent log, for messages.
    pub fn agent_log_tail(&self, node: &str) -> String {
        tail_of(&self.agent_log_path(node))
    }

    /// Polls the node's agent log until a line satisfies `pred`.
    pub fn wait_for_log(
        &self,
        node: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        wait_for_line(&self.agent_log_path(node), pred, timeout)
            .with_context(|| format!("{node}'s agent"))
    }

    /// The node's outbound `connection closed` log lines (`direction` `outbound`: what the
    /// node's agent reported for connections its captured workloads made).
    pub fn connections(&self, node: &str) -> Result<Vec<ConnectionLog>> {
        self.agent_logs(node)?
            .into_iter()
            .filter(|v| is_connection_closed(v, "outbound"))
            .map(|v| {
                serde_json::from_value(v.clone())
                    .with_context(|| format!("unexpected outbound `connection closed` line: {v}"))
            })
            .collect()
    }

    /// The node's inbound `connection closed` log lines (`direction` `inbound`: what the
    /// node's agent reported for connections to its workloads, delivered or refused), with
    /// every field as logged. Not [`ConnectionLog`]s: a plaintext caller's line has no
    /// `src_workload` or `src_identity`.
    pub fn inbound_connections(&self, node: &str) -> Result<Vec<Value>> {
        Ok(self
            .agent_logs(node)?
            .into_iter()
            .filter(|v| is_connection_closed(v, "inbound"))
            .collect())
    }

    /// Polls until the node's agent logs an outbound `connection closed` line that
    /// satisfies `pred`.
    pub fn wait_for_connection(
        &self,
        node: &str,
        pred: impl Fn(&ConnectionLog) -> bool,
        timeout: Duration,
    ) -> Result<ConnectionLog> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.connections(node)?.into_iter().find(|c| pred(c)) {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{node}'s agent logged no matching outbound `connection closed` line within {timeout:?}; {}",
                    self.agent_log_tail(node)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    // ------------------------------------------------------------ teardown

    /// Stops agents, kills every process in the cluster's cgroups, removes the
    /// cgroups, network namespaces, pin dirs and scratch dir. Idempotent; also
    /// run on drop. Errors are printed, not returned, so every step is tried.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if thread::panicking() {
            for n in &self.nodes {
                if self.agent_log_path(&n.name).exists() {
                    eprintln!(
                        "--- {} agent log ---\n{}",
                        n.name,
                        self.agent_log_tail(&n.name)
                    );
                }
            }
        }
        let agents: Vec<(String, Agent)> = self.agents.lock().unwrap().drain().collect();
        for (node, mut a) in agents {
            if let Err(e) = terminate(&mut a.child, Duration::from_secs(3)) {
                eprintln!("mesh-tests: stopping agent {node}: {e:#}");
            }
        }
        if let Some(ca) = &self.ca_service {
            if thread::panicking() {
                eprintln!("--- CA service log ---\n{}", tail_of(&ca.log_path()));
            }
            ca.kill();
        }
        let mut problems = Vec::new();
        if let Err(e) = sys::kill_and_remove_cgroup(&self.cgroup_dir) {
            problems.push(format!("{e:#}"));
        }
        // Pods' netns may be gone already (deleted by a test) or made again under the same
        // name (recreated); pods added later are listed too.
        let netns: Vec<String> = self.netns.lock().unwrap().drain(..).rev().collect();
        for ns in netns {
            if let Err(e) = sys::netns_del(&ns) {
                problems.push(format!("{e:#}"));
            }
        }
        let ca_dir = self.ca_service.as_ref().map(|ca| ca.dir().to_owned());
        for dir in [Some(&self.pin_root), Some(&self.workdir), ca_dir.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                problems.push(format!("rm -rf {}: {e}", dir.display()));
            }
        }
        // The shared parents go when the last cluster of this process goes
        // (best effort: another process may still use them).
        if LIVE.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = fs::remove_dir(sys::cgroup_root());
            let _ = fs::remove_dir(scratch_root());
        }
        for p in problems {
            eprintln!("mesh-tests: teardown of {}: {p}", self.id);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status and
/// whether SIGKILL was needed.
pub(crate) fn terminate(child: &mut Child, grace: Duration) -> Result<(ExitStatus, bool)> {
    if let Some(status) = child.try_wait()? {
        return Ok((status, false));
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok((status, false));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    Ok((child.wait()?, true))
}

/// Parses the JSON lines of a log file from byte `offset` on. Lines with a
/// nested `fields` object (tracing's default JSON layout) are flattened.
/// Polls the JSON log at `path` until a line satisfies `pred`; the error has the log's tail.
pub(crate) fn wait_for_line(
    path: &Path,
    pred: impl Fn(&Value) -> bool,
    timeout: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = read_log(path, 0)?.into_iter().find(|v| pred(v)) {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("no matching log line within {timeout:?}; {}", tail_of(path));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn read_log(path: &Path, offset: u64) -> Result<Vec<Value>> {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&line) else {
            continue;
        };
        if let Some(Value::Object(fields)) = obj.remove("fields") {
            for (k, v) in fields {
                obj.entry(k).or_insert(v);
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(out)
}

/// The agent's log message after it applied a changed cluster file.
pub const CLUSTER_FILE_LOADED: &str = "cluster file loaded";
/// The agent's log message after it refused a changed cluster file.
pub const CLUSTER_FILE_REJECTED: &str = "cluster file rejected; keeping the last good state";

/// One agent's verdict on a changed cluster file: its log line (fields flattened).
#[derive(Debug, Clone)]
pub enum Reload {
    Loaded(Value),
    Rejected(Value),
}

/// The agent's log message when a connection closes, either direction (`direction`
/// `outbound` or `inbound`).
pub const CONNECTION_CLOSED: &str = "connection closed";

/// Whether `line` is a `connection closed` line of `direction` (`outbound` or `inbound`).
pub fn is_connection_closed(line: &Value, direction: &str) -> bool {
    line.get("message").and_then(Value::as_str) == Some(CONNECTION_CLOSED)
        && line.get("direction").and_then(Value::as_str) == Some(direction)
}

/// One outbound `connection closed` line of an agent log.
#[derive(Debug, Clone, Deserialize)]
pub struct ConnectionLog {
    /// `namespace/name` of the captured pod.
    pub src_workload: String,
    /// Original destination, `ip:port` or `[ip]:port` (a Service VIP for a Service).
    #[serde(rename = "dst_addr")]
    pub dst: String,
    /// Client to server.
    pub bytes_sent: u64,
    /// Server to client.
    pub bytes_received: u64,
    pub duration_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
    /// Everything else on the line.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

// ---------------------------------------------------------------- cluster file

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileDoc {
    trust_domain: String,
    identity: FileIdentity,
    hbone: FileHbone,
    #[serde(skip_serializing_if = "Option::is_none")]
    same_node: Option<FileSameNode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<FileLimits>,
    policy: FilePolicy,
    nodes: Vec<FileNode>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    services: Vec<crate::services::FileService>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileIdentity {
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<FileCa>,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate_lifetime: Option<String>,
}

/// `identity.ca`: the CA service the agents take their certificates from.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileCa {
    address: String,
    roots: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FilePolicy {
    path: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileHbone {
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout: Option<String>,
}

#[derive(Serialize)]
struct FileSameNode {
    mode: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct FileLimits {
    connections_per_workload: usize,
    handshakes_per_workload: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileNode {
    name: String,
    addresses: Vec<String>,
    workload_cgroup: String,
    excluded_ports: Vec<u16>,
    workloads: Vec<FileWorkload>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileWorkload {
    name: String,
    namespace: String,
    service_account: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    ips: Vec<String>,
    netns: String,
    cgroup: String,
}
