//! The node's view of the mesh: nodes and their workloads, read from the cluster file.
//!
//! The schema is documented in docs/cluster-file.md. Every problem is reported with the file, the
//! line and the field, and the whole file is rejected: a half-read mesh is worse than none.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, de::Error as _};

use crate::identity::{DEFAULT_CERT_LIFETIME, SpiffeId, SpiffeIdError};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_HBONE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: Name,
    pub identity: IdentityConfig,
    #[serde(default)]
    pub hbone: HboneConfig,
    #[serde(default)]
    pub same_node: SameNodeConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(deserialize_with = "nodes_without_conflicts")]
    pub nodes: Vec<Node>,
    /// Kubernetes-style Services: virtual IPs spread over the workloads their selector picks.
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A Service, as in Kubernetes: connections to one of its `addresses` on one of its ports go to
/// a ready workload of its namespace whose labels include `selector`, on the port's `targetPort`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: Name,
    #[serde(default = "default_name")]
    pub namespace: Name,
    /// Virtual IPs (IPv4 and/or IPv6), owned by no workload.
    #[serde(deserialize_with = "at_least_one_address")]
    pub addresses: Vec<IpAddr>,
    #[serde(deserialize_with = "ports_without_duplicates")]
    pub ports: Vec<ServicePort>,
    /// Labels a workload must carry to be an endpoint; empty selects none (as in Kubernetes, a
    /// Service without selector has no automatic endpoints).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The endpoints' addresses when a source knows them (Kubernetes EndpointSlices: ready
    /// endpoints only); `None`: the workloads `selector` picks.
    #[serde(skip)]
    pub endpoint_ips: Option<Vec<IpAddr>>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port; default: `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

impl Service {
    /// `namespace/name`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `name.namespace.svc.<trust domain>`, Istio's `destination_service`.
    pub fn hostname(&self, trust_domain: &Name) -> String {
        format!("{}.{}.svc.{}", self.name, self.namespace, trust_domain)
    }

    pub fn selects(&self, workload: &Workload) -> bool {
        !self.selector.is_empty()
            && workload.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(key, value)| workload.labels.get(key) == Some(value))
    }
}

/// Who signs the workload certificates (the CA service, or for a single-host trial a CA key on
/// the node), which roots peers must chain to, and how long certificates live. Relative paths
/// are relative to the file's directory.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    /// The CA service that signs this node's workload certificates (`mesh-agent ca serve`, or
    /// istiod): no signing key on the node.
    #[serde(default)]
    pub ca: Option<RemoteCaConfig>,
    /// A signing certificate on the node (a root, or an intermediate followed by its parents),
    /// for a single-host trial: whoever holds `caKey` can mint any identity of the mesh.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// The roots peers must chain to; several allow rotating the root. Default: `ca.roots`, or
    /// the root of `caCert`.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub certificate_lifetime: Duration,
}

/// How to reach the CA service and prove who is asking.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoteCaConfig {
    /// `https://host:port` of the CA's gRPC endpoint (Istio's `IstioCertificateService`).
    pub address: String,
    /// The roots the CA's serving certificate chains to.
    pub roots: PathBuf,
    /// A service account token file (Kubernetes: projected, audience `istio-ca`), sent as a
    /// bearer token and read again for every request, as the kubelet rotates it. Without it,
    /// the agent authenticates with its node credential (`mesh-agent run --ca-credential`).
    #[serde(default)]
    pub token: Option<PathBuf>,
    /// The name the CA's serving certificate is checked against, when not the address's host
    /// (istiod's is `istiod.istio-system.svc`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Sent as the `clusterid` header, which istiod requires before it lets a node agent ask
    /// for its workloads' identities (its default cluster ID is `Kubernetes`).
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
}

fn default_cluster_id() -> String {
    "Kubernetes".to_owned()
}

/// Where an agent's workload certificates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer<'a> {
    Service(&'a RemoteCaConfig),
    Local { cert: &'a Path, key: &'a Path },
}

impl IdentityConfig {
    /// The one signer the section names.
    pub fn signer(&self) -> Result<Signer<'_>, String> {
        match (&self.ca, &self.ca_cert, &self.ca_key) {
            (Some(ca), None, None) => Ok(Signer::Service(ca)),
            (None, Some(cert), Some(key)) => Ok(Signer::Local { cert, key }),
            (Some(_), _, _) => Err(
                "identity: give either ca (the CA service) or caCert and caKey, not both"
                    .to_owned(),
            ),
            (None, Some(_), None) => Err("identity: caCert needs caKey".to_owned()),
            (None, None, Some(_)) => Err("identity: caKey needs caCert".to_owned()),
            (None, None, None) => Err(
                "identity: give ca (the CA service), or caCert and caKey for a single-host trial"
                    .to_owned(),
            ),
        }
    }

    /// Makes its relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let paths = [&mut self.ca_cert, &mut self.ca_key, &mut self.trust_bundle]
            .into_iter()
            .flatten()
            .chain(
                self.ca
                    .iter_mut()
                    .flat_map(|ca| std::iter::once(&mut ca.roots).chain(ca.token.as_mut())),
            );
        for path in paths {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// How connections between two workloads of one node go (docs/agent.md, "Same-node
/// connections").
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SameNodeConfig {
    #[serde(default)]
    pub mode: SameNodeMode,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum SameNodeMode {
    /// Authorized with the source identity the kernel proves (the capturing listener's
    /// workload), delivered without TLS: the bytes never leave the node.
    #[default]
    ShortCircuit,
    /// Through HBONE, as across nodes, for rules that want every connection encrypted.
    MutualTls,
}

/// A destination workload with this label set to `mutual-tls` is reached through HBONE from
/// its own node too, whatever `sameNode.mode` says.
pub const SAME_NODE_LABEL: &str = "mesh-agent.dev/same-node";
pub const SAME_NODE_LABEL_MUTUAL_TLS: &str = "mutual-tls";

impl SameNodeConfig {
    /// Whether a connection from this node to `destination`, a workload it serves, may skip
    /// HBONE.
    pub fn short_circuits_to(&self, destination: &Workload) -> bool {
        self.mode == SameNodeMode::ShortCircuit
            && destination.labels.get(SAME_NODE_LABEL).map(String::as_str)
                != Some(SAME_NODE_LABEL_MUTUAL_TLS)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HboneConfig {
    /// A pooled connection without streams for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Streams this agent's HBONE server allows on one connection (`SETTINGS_MAX_CONCURRENT_STREAMS`);
    /// clients open another connection beyond it. Read at start.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
}

/// Fair sharing between workloads (docs/reliability.md); read at start.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Concurrent connections one workload may have through the agent: from a local workload,
    /// and to this node's workloads from one calling workload. Beyond it a connection is
    /// refused (`response_flags` `UO`).
    #[serde(
        default = "default_connections_per_workload",
        deserialize_with = "at_least_one"
    )]
    pub connections_per_workload: usize,
    /// HBONE TLS handshakes in progress for one workload: a local workload's connections wait
    /// for a turn, a calling workload's handshakes beyond it are refused.
    #[serde(
        default = "default_handshakes_per_workload",
        deserialize_with = "at_least_one"
    )]
    pub handshakes_per_workload: usize,
}

pub const DEFAULT_CONNECTIONS_PER_WORKLOAD: usize = 16_384;
pub const DEFAULT_HANDSHAKES_PER_WORKLOAD: usize = 32;

fn default_connections_per_workload() -> usize {
    DEFAULT_CONNECTIONS_PER_WORKLOAD
}

fn default_handshakes_per_workload() -> usize {
    DEFAULT_HANDSHAKES_PER_WORKLOAD
}

fn at_least_one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    let value = usize::deserialize(deserializer)?;
    if value == 0 {
        return Err(D::Error::custom("must be at least 1"));
    }
    Ok(value)
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            connections_per_workload: DEFAULT_CONNECTIONS_PER_WORKLOAD,
            handshakes_per_workload: DEFAULT_HANDSHAKES_PER_WORKLOAD,
        }
    }
}

/// Where Istio security policies are read from (docs/policy.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyConfig {
    /// A YAML file or a directory of them; none means no policy (PERMISSIVE, allow all).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The namespace whose policies without selector apply to the whole mesh.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            path: None,
            root_namespace: default_root_namespace(),
        }
    }
}

fn default_root_namespace() -> String {
    "istio-system".to_owned()
}

impl Default for HboneConfig {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_HBONE_IDLE_TIMEOUT,
            max_concurrent_streams: default_max_concurrent_streams(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    pub name: Name,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The cgroup v2 directory whose subtree holds this node's pods; capture attaches here.
    pub workload_cgroup: PathBuf,
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
    #[serde(default, deserialize_with = "workloads_without_duplicates")]
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: Name,
    #[serde(default = "default_name")]
    pub namespace: Name,
    #[serde(default = "default_name")]
    pub service_account: Name,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "at_least_one_ip")]
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

/// A lowercase RFC 1123 label (Kubernetes names): the pieces of SPIFFE IDs and log fields.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    #[error("cannot read cluster file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    InvalidNoLocation { path: PathBuf, message: String },
    #[error("{path}: node {node:?} is not in the cluster file (nodes: {known})")]
    UnknownNode {
        path: PathBuf,
        node: String,
        known: String,
    },
}

impl Cluster {
    pub fn load(path: &Path) -> Result<Self, ClusterFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a cluster file; `path` names it in errors, and relative paths in it
    /// are relative to its directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ClusterFileError> {
        let mut cluster: Self = Self::deserialize_located(text, path)?;
        cluster.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        cluster.check_identities(path)?;
        cluster.check_services(path)?;
        Ok(cluster)
    }

    fn deserialize_located(text: &str, path: &Path) -> Result<Self, ClusterFileError> {
        serde_yaml_ng::from_str(text).map_err(|err| {
            let message = strip_location(&err.to_string());
            match err.location() {
                Some(at) => ClusterFileError::Invalid {
                    path: path.to_owned(),
                    line: at.line(),
                    column: at.column(),
                    message,
                },
                None => ClusterFileError::InvalidNoLocation {
                    path: path.to_owned(),
                    message,
                },
            }
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.identity.resolve_paths(base);
        if let Some(path) = self.policy.path.as_mut()
            && path.is_relative()
        {
            *path = base.join(&*path);
        }
    }

    /// Every workload must have a valid SPIFFE ID, so routing never meets one that has not.
    fn check_identities(&self, path: &Path) -> Result<(), ClusterFileError> {
        self.identity
            .signer()
            .map_err(|message| ClusterFileError::InvalidNoLocation {
                path: path.to_owned(),
                message,
            })?;
        for workload in self.nodes.iter().flat_map(|node| &node.workloads) {
            workload.spiffe_id(&self.trust_domain).map_err(|err| {
                ClusterFileError::InvalidNoLocation {
                    path: path.to_owned(),
                    message: format!("workload {}: {err}", workload.qualified_name()),
                }
            })?;
        }
        Ok(())
    }

    /// Service names and virtual IPs must each mean one thing, and a virtual IP is no workload's.
    fn check_services(&self, path: &Path) -> Result<(), ClusterFileError> {
        let invalid = |message: String| ClusterFileError::InvalidNoLocation {
            path: path.to_owned(),
            message,
        };
        let mut names = HashSet::new();
        let mut owners: HashMap<IpAddr, String> = self
            .nodes
            .iter()
            .flat_map(|node| &node.workloads)
            .flat_map(|w| {
                w.ips
                    .iter()
                    .map(|ip| (ip.to_canonical(), w.qualified_name()))
            })
            .collect();
        for service in &self.services {
            let name = service.qualified_name();
            if !names.insert(name.clone()) {
                return Err(invalid(format!("service {name} is listed twice")));
            }
            for ip in &service.addresses {
                if let Some(other) = owners.insert(ip.to_canonical(), format!("service {name}")) {
                    return Err(invalid(format!(
                        "service {name}: address {ip} already belongs to {other}"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str, path: &Path) -> Result<&Node, ClusterFileError> {
        self.nodes
            .iter()
            .find(|node| node.name.as_str() == name)
            .ok_or_else(|| ClusterFileError::UnknownNode {
                path: path.to_owned(),
                node: name.to_owned(),
                known: self.node_names(),
            })
    }

    /// The nodes' names, for messages: `node-a, node-b`.
    pub fn node_names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The workload that owns `ip`, on any node.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<(&Node, &Workload)> {
        self.nodes.iter().find_map(|node| {
            node.workloads
                .iter()
                .find(|w| {
                    w.ips
                        .iter()
                        .any(|own| own.to_canonical() == ip.to_canonical())
                })
                .map(|w| (node, w))
        })
    }
}

impl Workload {
    /// `namespace/name`, how workloads are named in logs and metrics.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn spiffe_id(&self, trust_domain: &Name) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(
            trust_domain.as_str(),
            self.namespace.as_str(),
            self.service_account.as_str(),
        )
    }
}

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Name {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let valid_chars = value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        let valid_ends = !value.starts_with(['-', '.']) && !value.ends_with(['-', '.']);
        if value.is_empty() || value.len() > 253 || !valid_chars || !valid_ends {
            return Err(format!(
                "{value:?} is not a valid name: use lowercase letters, digits, '-' and '.', \
                 starting and ending with a letter or digit"
            ));
        }
        Ok(Name(value))
    }
}

fn default_trust_domain() -> Name {
    Name(DEFAULT_TRUST_DOMAIN.to_owned())
}

fn default_cert_lifetime() -> Duration {
    DEFAULT_CERT_LIFETIME
}

fn default_max_concurrent_streams() -> u32 {
    crate::proxy::tunnel::MAX_CONCURRENT_STREAMS
}

fn default_idle_timeout() -> Duration {
    DEFAULT_HBONE_IDLE_TIMEOUT
}

fn default_name() -> Name {
    Name("default".to_owned())
}

fn at_least_one_ip<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<IpAddr>, D::Error> {
    let ips = Vec::<IpAddr>::deserialize(de)?;
    if ips.is_empty() {
        return Err(D::Error::custom("a workload needs at least one IP address"));
    }
    Ok(ips)
}

fn at_least_one_address<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<IpAddr>, D::Error> {
    let ips = Vec::<IpAddr>::deserialize(de)?;
    if ips.is_empty() {
        return Err(D::Error::custom("a service needs at least one address"));
    }
    Ok(ips)
}

fn ports_without_duplicates<'de, D: Deserializer<'de>>(
    de: D,
) -> Result<Vec<ServicePort>, D::Error> {
    let ports = Vec::<ServicePort>::deserialize(de)?;
    if ports.is_empty() {
        return Err(D::Error::custom("a service needs at least one port"));
    }
    let mut seen = HashSet::new();
    for port in &ports {
        if port.port == 0 || port.target() == 0 {
            return Err(D::Error::custom("port 0 is not a service port"));
        }
        if !seen.insert(port.port) {
            return Err(D::Error::custom(format!(
                "port {} is listed twice",
                port.port
            )));
        }
    }
    Ok(ports)
}

fn workloads_without_duplicates<'de, D: Deserializer<'de>>(
    de: D,
) -> Result<Vec<Workload>, D::Error> {
    let workloads = Vec::<Workload>::deserialize(de)?;
    let mut seen = HashSet::new();
    for workload in &workloads {
        if !seen.insert((&workload.namespace, &workload.name)) {
            return Err(D::Error::custom(format!(
                "workload {} is listed twice",
                workload.qualified_name()
            )));
        }
    }
    Ok(workloads)
}

/// Node names, workload names and IPs must each mean one thing across the whole mesh.
fn nodes_without_conflicts<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Node>, D::Error> {
    let nodes = Vec::<Node>::deserialize(de)?;
    let mut node_names = HashSet::new();
    let mut workloads = HashMap::new();
    let mut owners: HashMap<IpAddr, String> = HashMap::new();
    for node in &nodes {
        if !node_names.insert(&node.name) {
            return Err(D::Error::custom(format!(
                "node {} is listed twice",
                node.name
            )));
        }
        for workload in &node.workloads {
            let id = workload.qualified_name();
            if let Some(other) = workloads.insert(id.clone(), &node.name) {
                return Err(D::Error::custom(format!(
                    "workload {id} is listed on node {other} and on node {}",
                    node.name
                )));
            }
            for ip in &workload.ips {
                if let Some(other) = owners.insert(ip.to_canonical(), id.clone()) {
                    return Err(D::Error::custom(format!(
                        "IP {ip} belongs to both workload {other} and workload {id}"
                    )));
                }
            }
        }
    }
    Ok(nodes)
}

/// serde_yaml_ng appends " at line L column C" to messages; the error carries the location
/// separately, so keep the message alone.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
trustDomain: example.org
identity: {caCert: ca/ca-cert.pem, caKey: /etc/mesh/ca-key.pem, certificateLifetime: 1h}
nodes:
  - name: node-a
    addresses: [10.255.0.1, "fd00:ff::1"]
    workloadCgroup: /sys/fs/cgroup/unified/mesh/node-a/pods
    excludedPorts: [22]
    workloads:
      - name: client
        namespace: demo
        serviceAccount: client-sa
        labels: {app: client}
        ips: [10.1.0.2, "fd00:1::2"]
        netns: /var/run/netns/client
        cgroup: /sys/fs/cgroup/unified/mesh/node-a/pods/client
  - name: node-b
    workloadCgroup: /sys/fs/cgroup/unified/mesh/node-b/pods
    workloads:
      - name: web
        ips: [10.2.0.2]
        netns: /var/run/netns/web
        cgroup: /sys/fs/cgroup/unified/mesh/node-b/pods/web
"#;

    fn parse(text: &str) -> Result<Cluster, ClusterFileError> {
        Cluster::parse(text, Path::new("cluster.yaml"))
    }

    #[test]
    fn relative_identity_paths_follow_the_cluster_file() {
        let cluster = Cluster::parse(GOOD, Path::new("/etc/mesh/cluster.yaml")).unwrap();
        assert_eq!(
            cluster.identity.ca_cert.as_deref(),
            Some(Path::new("/etc/mesh/ca/ca-cert.pem"))
        );
    }

    #[test]
    fn workload_identities_are_spiffe_ids() {
        let cluster = parse(GOOD).unwrap();
        let client = &cluster.nodes[0].workloads[0];
        assert_eq!(
            client.spiffe_id(&cluster.trust_domain).unwrap().to_string(),
            "spiffe://example.org/ns/demo/sa/client-sa"
        );
    }

    #[test]
    fn a_bad_lifetime_names_its_line() {
        let err = error_of(&GOOD.replace("certificateLifetime: 1h", "certificateLifetime: soon"));
        assert!(err.starts_with("cluster.yaml:3:"), "{err}");
        assert!(err.contains("identity"), "{err}");
    }

    fn error_of(text: &str) -> String {
        parse(text)
            .expect_err("the file should be rejected")
            .to_string()
    }

    fn with_identity(identity: &str) -> String {
        GOOD.replace(
            "identity: {caCert: ca/ca-cert.pem, caKey: /etc/mesh/ca-key.pem, certificateLifetime: 1h}",
            identity,
        )
    }

    #[test]
    fn the_ca_service_is_named_with_its_roots_relative_to_the_file() {
        let text = with_identity(
            "identity: {ca: {address: \"https://10.0.0.1:15012\", roots: ca/roots.pem}}",
        );
        let cluster = Cluster::parse(&text, Path::new("/etc/mesh/cluster.yaml")).unwrap();
        let Ok(Signer::Service(ca)) = cluster.identity.signer() else {
            panic!("not the CA service: {:?}", cluster.identity);
        };
        assert_eq!(ca.roots, Path::new("/etc/mesh/ca/roots.pem"));
        assert_eq!(ca.token, None);
    }

    #[test]
    fn exactly_one_signer_is_named() {
        for (identity, error) in [
            (
                "identity: {ca: {address: \"https://x:1\", roots: r.pem}, caCert: c, caKey: k}",
                "not both",
            ),
            ("identity: {caCert: c}", "caCert needs caKey"),
            ("identity: {caKey: k}", "caKey needs caCert"),
            ("identity: {}", "give ca (the CA service)"),
        ] {
            let err = parse(&with_identity(identity)).expect_err(identity);
            assert!(err.to_string().contains(error), "{identity}: {err}");
        }
    }

    #[test]
    fn reads_a_complete_file_with_defaults() {
        let cluster = parse(GOOD).unwrap();
        assert_eq!(cluster.trust_domain.as_str(), "example.org");
        assert_eq!(
            cluster.identity.ca_cert.as_deref(),
            Some(Path::new("ca/ca-cert.pem"))
        );
        assert_eq!(
            cluster.identity.ca_key.as_deref(),
            Some(Path::new("/etc/mesh/ca-key.pem"))
        );
        assert_eq!(
            cluster.identity.certificate_lifetime,
            Duration::from_secs(3600)
        );
        assert_eq!(cluster.hbone.idle_timeout, DEFAULT_HBONE_IDLE_TIMEOUT);
        let a = cluster.node("node-a", Path::new("c")).unwrap();
        assert_eq!(a.excluded_ports, vec![22]);
        assert_eq!(a.workloads[0].qualified_name(), "demo/client");
        assert_eq!(a.workloads[0].service_account.as_str(), "client-sa");
        let web = &cluster.nodes[1].workloads[0];
        assert_eq!(web.namespace.as_str(), "default");
        assert_eq!(web.service_account.as_str(), "default");
        let (node, owner) = cluster.workload_by_ip("10.2.0.2".parse().unwrap()).unwrap();
        assert_eq!((node.name.as_str(), owner.name.as_str()), ("node-b", "web"));
    }

    #[test]
    fn names_file_line_and_field_of_a_bad_ip() {
        let text = GOOD.replace("10.2.0.2", "10.2.0.300");
        let err = error_of(&text);
        assert!(err.starts_with("cluster.yaml:21:"), "{err}");
        assert!(err.contains("nodes[1].workloads[0].ips[0]"), "{err}");
        assert!(err.contains("invalid IP address"), "{err}");
    }

    #[test]
    fn rejects_unknown_fields_with_their_line() {
        let text = GOOD.replace("    excludedPorts: [22]", "    excludedPort: [22]");
        let err = error_of(&text);
        assert!(err.starts_with("cluster.yaml:8:"), "{err}");
        assert!(err.contains("unknown field `excludedPort`"), "{err}");
    }

    #[test]
    fn rejects_names_that_cannot_be_identities() {
        let err = error_of(&GOOD.replace("namespace: demo", "namespace: Demo_NS"));
        // Values rejected after parsing are located at the entry that holds them.
        assert!(err.starts_with("cluster.yaml:10:"), "{err}");
        assert!(err.contains("nodes[0].workloads[0]"), "{err}");
        assert!(err.contains("\"Demo_NS\" is not a valid name"), "{err}");
    }

    #[test]
    fn rejects_an_ip_owned_twice() {
        let err = error_of(&GOOD.replace("ips: [10.2.0.2]", "ips: [10.1.0.2]"));
        assert!(
            err.contains(
                "IP 10.1.0.2 belongs to both workload demo/client and workload default/web"
            ),
            "{err}"
        );
        assert!(err.starts_with("cluster.yaml:"), "{err}");
    }

    #[test]
    fn rejects_a_workload_without_ips() {
        let err = error_of(&GOOD.replace("ips: [10.2.0.2]", "ips: []"));
        assert!(err.starts_with("cluster.yaml:20:"), "{err}");
        assert!(err.contains("at least one IP"), "{err}");
    }

    #[test]
    fn rejects_broken_yaml() {
        let err = error_of("nodes:\n  - name: [unclosed\n");
        assert!(err.starts_with("cluster.yaml:"), "{err}");
    }

    #[test]
    fn an_unknown_node_lists_the_known_ones() {
        let cluster = parse(GOOD).unwrap();
        let err = cluster
            .node("node-z", Path::new("cluster.yaml"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster.yaml: node \"node-z\" is not in the cluster file (nodes: node-a, node-b)"
        );
    }
}
