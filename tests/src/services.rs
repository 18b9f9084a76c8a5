//! Services of the test cluster, as in Kubernetes: a name, virtual IPs, ports and a selector.
//! The agents route mesh pods' connections to them (the cluster file's `services`); pods
//! outside the mesh reach them through the nodes, where nftables rules play kube-proxy (DNAT
//! to the endpoints in turn), and every pod resolves the Service's name to its virtual IPs.

use std::net::{Ipv4Addr, Ipv6Addr};
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

    /// Its lines in the pods' hosts file: the short name and the cluster-local one.
    pub(crate) fn hosts_lines(&self, trust_domain: &str) -> String {
        let long = format!(
            "{}.{}.svc.{trust_domain}",
            self.spec.name, self.spec.namespace
        );
        format!(
            "{} {} {long}\n{} {} {long}\n",
            self.ipv4, self.spec.name, self.ipv6, self.spec.name
        )
    }

    /// kube-proxy's part for pods outside the mesh: DNAT from each virtual IP and port to the
    /// endpoints in turn, as nftables rules (empty without endpoints: the VIP then answers
    /// nothing, as a Service without endpoints in Kubernetes).
    fn nat_rules(&self, pods: &[&Pod]) -> String {
        let endpoints: Vec<&&Pod> = pods.iter().filter(|p| self.selects(p)).collect();
        if endpoints.is_empty() {
            return String::new();
        }
        let map = |ip: &dyn Fn(&Pod) -> String| {
            endpoints
                .iter()
                .enumerate()
                .map(|(k, p)| format!("{k} : {}", ip(p)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (map4, map6) = (map(&|p| p.ipv4.to_string()), map(&|p| p.ipv6.to_string()));
        let n = endpoints.len();
        let mut rules = String::new();
        for &(port, target) in &self.spec.ports {
            rules.push_str(&format!(
                "add rule ip kubeproxy prerouting ip daddr {} tcp dport {port} dnat to numgen inc mod {n} map {{ {map4} }} : {target}\n",
                self.ipv4
            ));
            rules.push_str(&format!(
                "add rule ip6 kubeproxy prerouting ip6 daddr {} tcp dport {port} dnat to numgen inc mod {n} map {{ {map6} }} : {target}\n",
                self.ipv6
            ));
        }
        rules
    }
}

/// Replaces the node's kube-proxy rules with those of `services` over `pods` (every pod of the
/// cluster, in the mesh or not, as endpoints are in Kubernetes).
pub(crate) fn program_node(
    node_netns: &str,
    scratch: &Path,
    services: &[Service],
    pods: &[&Pod],
) -> Result<()> {
    let mut script = String::new();
    for family in ["ip", "ip6"] {
        // `add` then `delete` makes the flush work whether or not the table exists yet.
        script.push_str(&format!(
            "add table {family} kubeproxy\ndelete table {family} kubeproxy\nadd table {family} kubeproxy\n\
             add chain {family} kubeproxy prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n"
        ));
    }
    for service in services {
        script.push_str(&service.nat_rules(pods));
    }
    let file = scratch.join(format!("{node_netns}-kubeproxy.nft"));
    std::fs::write(&file, &script).with_context(|| format!("write {}", file.display()))?;
    let mut nft = Command::new("ip");
    nft.args(["netns", "exec", node_netns, "nft", "-f"])
        .arg(&file);
    sys::run_checked(&mut nft).with_context(|| format!("nft -f {}", file.display()))?;
    Ok(())
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
