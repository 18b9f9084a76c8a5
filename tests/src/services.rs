//! Services of the test cluster, as in Kubernetes: a name, virtual IPs, ports and a selector.
//! The agents route mesh pods' connections to them (the cluster file's `services`); pods
//! outside the mesh reach them through the nodes, where nftables rules play kube-proxy (DNAT
//! to the endpoints in turn), and every pod resolves the Service's name to its virtual IPs.
//! The rules ([`Frontend`], [`kube_proxy_script`]) and the hosts lines ([`hosts_entry`]) are
//! also mesh-kubelet's, which makes them from the Kubernetes API instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::pod::Pod;
use crate::sys;

/// A Service to create.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub(crate) name: String,
    pub(crate) namespace: String,
    /// The endpoints: pods of the namespace with this `app` label.
    pub(crate) app: String,
    /// (port, targetPort)
    pub(crate) ports: Vec<(u16, u16)>,
}

impl ServiceSpec {
    /// A Service in namespace `default` selecting the pods labelled `app=<app>`.
    pub fn new(name: &str, app: &str) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            app: app.into(),
            ports: Vec::new(),
        }
    }
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }
    /// Clients connect to `port` on a virtual IP; endpoints serve `target_port`.
    pub fn port(mut self, port: u16, target_port: u16) -> Self {
        self.ports.push((port, target_port));
        self
    }
}

/// A created Service: its spec and the virtual IPs it was given.
#[derive(Debug, Clone)]
pub struct Service {
    pub(crate) spec: ServiceSpec,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Service {
    /// The `k`-th Service of a cluster: 10.96.1.(k+1) and fd00:96::1:(k+1).
    pub(crate) fn allocate(spec: ServiceSpec, k: u8) -> Self {
        Self {
            spec,
            ipv4: Ipv4Addr::new(10, 96, 1, k + 1),
            ipv6: Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 1, u16::from(k) + 1),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.spec.namespace
            && pod
                .labels
                .get("app")
                .is_some_and(|app| *app == self.spec.app)
    }

    /// Its entry in the cluster file.
    pub(crate) fn file_entry(&self) -> FileService {
        FileService {
            name: self.spec.name.clone(),
            namespace: self.spec.namespace.clone(),
            addresses: vec![self.ipv4.to_string(), self.ipv6.to_string()],
            ports: self
                .spec
                .ports
                .iter()
                .map(|&(port, target_port)| FilePort { port, target_port })
                .collect(),
            selector: [("app".to_owned(), self.spec.app.clone())].into(),
        }
    }

    /// Its lines in the pods' hosts file (see [`hosts_entry`]).
    pub(crate) fn hosts_lines(&self, cluster_domain: &str) -> String {
        let (name, namespace) = (&self.spec.name, &self.spec.namespace);
        [IpAddr::from(self.ipv4), IpAddr::from(self.ipv6)]
            .into_iter()
            .map(|ip| hosts_entry(ip, name, namespace, cluster_domain))
            .collect()
    }

    /// kube-proxy's part for pods outside the mesh: each port on each virtual IP, with the
    /// endpoints' addresses of the same family (none without endpoints: the VIP then answers
    /// nothing, as a Service without endpoints in Kubernetes).
    fn frontends(&self, pods: &[&Pod]) -> Vec<Frontend> {
        let endpoints: Vec<&&Pod> = pods.iter().filter(|p| self.selects(p)).collect();
        let mut frontends = Vec::new();
        for &(port, target) in &self.spec.ports {
            let v4 = endpoints.iter().map(|p| SocketAddr::from((p.ipv4, target)));
            let v6 = endpoints.iter().map(|p| SocketAddr::from((p.ipv6, target)));
            frontends.push(Frontend::tcp(self.ipv4.into(), port, v4.collect()));
            frontends.push(Frontend::tcp(self.ipv6.into(), port, v6.collect()));
        }
        frontends
    }
}

/// A Service name's line in a hosts file: `ip name name.ns name.ns.svc name.ns.svc.domain`, the
/// names cluster DNS answers for it (the short ones are what a pod's search path finds).
pub(crate) fn hosts_entry(ip: IpAddr, name: &str, namespace: &str, domain: &str) -> String {
    format!(
        "{ip} {name} {name}.{namespace} {name}.{namespace}.svc {name}.{namespace}.svc.{domain}\n"
    )
}

/// The transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Its name in nftables (`tcp dport ...`).
    fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One virtual IP and port of a Service, and the endpoints (same address family) that
/// connections to it go to, in turn.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Frontend {
    pub(crate) vip: IpAddr,
    pub(crate) protocol: Protocol,
    pub(crate) port: u16,
    pub(crate) backends: Vec<SocketAddr>,
}

impl Frontend {
    fn tcp(vip: IpAddr, port: u16, backends: Vec<SocketAddr>) -> Self {
        Self {
            vip,
            protocol: Protocol::Tcp,
            port,
            backends,
        }
    }

    /// Its DNAT rule (round robin over the backends, `numgen inc mod N`); empty without
    /// backends. The backends must be of the VIP's family (nft rejects the script otherwise).
    fn nat_rule(&self) -> String {
        let family = match self.vip {
            IpAddr::V4(_) => "ip",
            IpAddr::V6(_) => "ip6",
        };
        if self.backends.is_empty() {
            return String::new();
        }
        let map = self
            .backends
            .iter()
            .enumerate()
            .map(|(k, b)| format!("{k} : {} . {}", b.ip(), b.port()))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "add rule {family} kubeproxy prerouting {family} daddr {} {} dport {} dnat to numgen inc mod {} map {{ {map} }}\n",
            self.vip,
            self.protocol.nft(),
            self.port,
            self.backends.len(),
        )
    }
}

/// The nftables script that replaces the `kubeproxy` tables (ip and ip6) with DNAT rules for
/// `frontends`, in one transaction: connections never see a half-made table.
pub(crate) fn kube_proxy_script(frontends: &[Frontend]) -> String {
    let mut script = String::new();
    for family in ["ip", "ip6"] {
        // `add` then `delete` makes the flush work whether or not the table exists yet.
        script.push_str(&format!(
            "add table {family} kubeproxy\ndelete table {family} kubeproxy\nadd table {family} kubeproxy\n\
             add chain {family} kubeproxy prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n"
        ));
    }
    for frontend in frontends {
        script.push_str(&frontend.nat_rule());
    }
    script
}

/// Loads an nftables script: writes it to `file` (kept, for a look after a failure) and runs
/// `nft -f file` through `nft` (`nft`, or `ip netns exec NS nft` for another netns).
pub(crate) fn load_nft_script(mut nft: Command, file: &Path, script: &str) -> Result<()> {
    std::fs::write(file, script).with_context(|| format!("write {}", file.display()))?;
    nft.arg("-f").arg(file);
    sys::run_checked(&mut nft).with_context(|| format!("nft -f {}", file.display()))?;
    Ok(())
}

/// Replaces the node's kube-proxy rules with those of `services` over `pods` (every pod of the
/// cluster, in the mesh or not, as endpoints are in Kubernetes).
pub(crate) fn program_node(
    node_netns: &str,
    scratch: &Path,
    services: &[Service],
    pods: &[&Pod],
) -> Result<()> {
    let frontends: Vec<Frontend> = services.iter().flat_map(|s| s.frontends(pods)).collect();
    let file = scratch.join(format!("{node_netns}-kubeproxy.nft"));
    let mut nft = Command::new("ip");
    nft.args(["netns", "exec", node_netns, "nft"]);
    load_nft_script(nft, &file, &kube_proxy_script(&frontends))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileService {
    name: String,
    namespace: String,
    addresses: Vec<String>,
    ports: Vec<FilePort>,
    selector: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FilePort {
    port: u16,
    target_port: u16,
}
