//! kube-proxy's part, for pods outside the mesh: the node's nftables DNAT rules for ClusterIP
//! Services (from Services and their EndpointSlices, watched cluster-wide), and cluster DNS's
//! part, the Service names in the node's hosts file that its pods have as /etc/hosts.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use futures::{FutureExt as _, Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt as _, reflector::reflector};
use tokio::sync::watch;

use super::{CLUSTER_DOMAIN, Config, Ctx, blocking};
use crate::services::{Frontend, Protocol, hosts_entry, kube_proxy_script, load_nft_script};
use crate::sys;

/// How long to gather more changes before rewriting: a Service and its EndpointSlice usually
/// change together.
const SETTLE: Duration = Duration::from_millis(50);

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Keeps the rules and the hosts file in line with the API until `stop`. Watch errors are
/// logged (the watchers retry with backoff); a rule set that fails to load is retried at the
/// next change.
pub(crate) async fn run(ctx: &Ctx, mut stop: watch::Receiver<bool>) -> Result<()> {
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let service_events = reflector(
        services_writer,
        watcher(Api::<Service>::all(ctx.client.clone())),
    );
    let slice_events = reflector(
        slices_writer,
        watcher(Api::<EndpointSlice>::all(ctx.client.clone())),
    );
    let mut events = futures::stream::select(
        service_events.map(|e| e.map(|e| ("services", is_init_done(&e)))),
        slice_events.map(|e| e.map(|e| ("endpointslices", is_init_done(&e)))),
    )
    .boxed();
    let mut listed = BTreeSet::new();
    let mut applied = Applied::default();
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            event = events.next() => event.ok_or_else(|| anyhow!("the Service watches ended"))?,
        };
        note(event, &mut listed);
        tokio::time::sleep(SETTLE).await;
        while let Some(Some(event)) = events.next().now_or_never() {
            note(event, &mut listed);
        }
        // Until both lists are in, the rules would miss Services or endpoints.
        if listed.len() == 2 {
            applied.update(&ctx.config, &services, &slices).await;
        }
    }
}

/// Notes which watches have listed everything once; logs watch errors (the watchers retry).
fn note(event: Result<(&'static str, bool), watcher::Error>, listed: &mut BTreeSet<&'static str>) {
    match event {
        Ok((kind, true)) => {
            listed.insert(kind);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("watch Services/EndpointSlices: {e}"),
    }
}

fn watcher<K>(api: Api<K>) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default()).default_backoff()
}

fn is_init_done<K>(event: &Event<K>) -> bool {
    matches!(event, Event::InitDone)
}

/// What was last written, so unchanged rules and names are not written again.
#[derive(Default)]
struct Applied {
    script: Option<String>,
    hosts: Option<String>,
}

impl Applied {
    async fn update(
        &mut self,
        config: &Config,
        services: &Store<Service>,
        slices: &Store<EndpointSlice>,
    ) {
        let services = services.state();
        let slices = slices.state();
        let script = kube_proxy_script(&frontends(&services, &slices));
        if self.script.as_ref() != Some(&script) {
            let file = config.state_dir.join("kube-proxy.nft");
            let text = script.clone();
            match blocking(move || load_nft_script(Command::new("nft"), &file, &text)).await {
                Ok(()) => self.script = Some(script),
                Err(e) => tracing::warn!("program kube-proxy rules: {e:#}"),
            }
        }
        let hosts = hosts_text(&services);
        if self.hosts.as_ref() != Some(&hosts) {
            match sys::rewrite_in_place(&config.hosts_file, hosts.as_bytes()) {
                Ok(()) => self.hosts = Some(hosts),
                Err(e) => tracing::warn!("write the hosts file: {e:#}"),
            }
        }
    }
}

/// Removes the rules (for `--cleanup-on-exit`): empty tables, nothing translated.
pub(crate) async fn remove_rules(config: &Config) -> Result<()> {
    let file = config.state_dir.join("kube-proxy.nft");
    blocking(move || load_nft_script(Command::new("nft"), &file, &kube_proxy_script(&[]))).await
}

/// The hosts file's first contents, before the Services are known, unless it exists (a
/// restarted kubelet keeps its names until the Services are listed again). It must exist
/// before a pod starts: pods bind-mount it.
pub(crate) fn ensure_hosts_file(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    sys::rewrite_in_place(path, hosts_text(&[]).as_bytes())
}

/// The machine's own /etc/hosts (programs look their host's name up at start, and a miss would
/// go to DNS, which is out of reach in a pod), then each ClusterIP Service's names.
fn hosts_text(services: &[Arc<Service>]) -> String {
    let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    text.push_str("\n# Services of the cluster (mesh-kubelet)\n");
    let mut lines: Vec<String> = services
        .iter()
        .flat_map(|svc| {
            let (name, namespace) = (
                svc.metadata.name.as_deref(),
                svc.metadata.namespace.as_deref(),
            );
            let (Some(name), Some(namespace)) = (name, namespace) else {
                return Vec::new();
            };
            cluster_ips(svc)
                .into_iter()
                .map(|ip| hosts_entry(ip, name, namespace, CLUSTER_DOMAIN))
                .collect()
        })
        .collect();
    lines.sort();
    text.extend(lines);
    text
}

/// A Service's virtual IPs (`spec.clusterIPs`, else `spec.clusterIP`); none for a headless or
/// ExternalName Service. Addresses that do not parse are skipped: API objects are input.
fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let ips = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    };
    ips.iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// Every (virtual IP, port) of every Service, with the ready endpoints of the same family
/// behind it, in a stable order (so an unchanged API gives an unchanged script).
fn frontends(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) -> Vec<Frontend> {
    let mut out = Vec::new();
    for svc in services {
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default();
        let own: Vec<&EndpointSlice> = slices
            .iter()
            .map(|s| &**s)
            .filter(|s| belongs_to(s, svc))
            .collect();
        for vip in cluster_ips(svc) {
            for port in ports {
                let (Some(protocol), Ok(number)) =
                    (protocol(port.protocol.as_deref()), u16::try_from(port.port))
                else {
                    continue;
                };
                let mut backends: Vec<SocketAddr> = own
                    .iter()
                    .flat_map(|slice| backends(slice, vip, port, protocol))
                    .collect();
                backends.sort();
                backends.dedup();
                out.push(Frontend {
                    vip,
                    protocol,
                    port: number,
                    backends,
                });
            }
        }
    }
    out.sort();
    out
}

fn belongs_to(slice: &EndpointSlice, svc: &Service) -> bool {
    let label = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    slice.metadata.namespace == svc.metadata.namespace
        && label.is_some_and(|name| Some(name) == svc.metadata.name.as_ref())
}

/// TCP (the default) and UDP; SCTP is not programmed.
fn protocol(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// The slice's ready endpoints for a Service port on `vip`'s family, at the port the slice
/// gives for the Service port (by name, as kube-proxy matches them: that resolves named
/// target ports).
fn backends(
    slice: &EndpointSlice,
    vip: IpAddr,
    port: &ServicePort,
    protocol: Protocol,
) -> Vec<SocketAddr> {
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    if slice.address_type != family {
        return Vec::new();
    }
    let target = slice.ports.as_deref().unwrap_or_default().iter().find(|p| {
        p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
            && self::protocol(p.protocol.as_deref()) == Some(protocol)
    });
    let Some(target) = target
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| &e.addresses)
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|a| a.is_ipv4() == vip.is_ipv4())
        .map(|a| SocketAddr::new(a, target))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "demo"},
                "spec": {
                    "clusterIP": "10.96.0.20",
                    "clusterIPs": ["10.96.0.20", "fd00:96::20"],
                    "ports": [{"name": "http", "port": 80, "targetPort": "web"}],
                },
            }))
            .unwrap(),
        )
    }

    fn slice(family: &str, addresses: &[(&str, Option<bool>)]) -> Arc<EndpointSlice> {
        let endpoints: Vec<_> = addresses
            .iter()
            .map(|(a, ready)| json!({"addresses": [a], "conditions": {"ready": ready}}))
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {
                    "name": format!("web-{family}"),
                    "namespace": "demo",
                    "labels": {SERVICE_NAME_LABEL: "web"},
                },
                "addressType": family,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn ready_endpoints_of_the_same_family_at_the_resolved_port() {
        let slices = [
            slice(
                "IPv4",
                &[
                    ("10.1.0.3", Some(true)),
                    ("10.2.0.4", None),
                    ("10.1.0.9", Some(false)),
                ],
            ),
            slice("IPv6", &[("fd00:1::3", Some(true))]),
        ];
        let f = frontends(&[service()], &slices);
        assert_eq!(f.len(), 2);
        let v4 = f.iter().find(|f| f.vip.is_ipv4()).unwrap();
        assert_eq!(v4.port, 80);
        assert_eq!(
            v4.backends,
            [
                "10.1.0.3:8080".parse::<SocketAddr>().unwrap(),
                "10.2.0.4:8080".parse().unwrap()
            ]
        );
        let v6 = f.iter().find(|f| f.vip.is_ipv6()).unwrap();
        assert_eq!(
            v6.backends,
            ["[fd00:1::3]:8080".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn hosts_lines_name_each_cluster_ip() {
        let text = hosts_text(&[service()]);
        assert!(text.contains("10.96.0.20 web web.demo web.demo.svc web.demo.svc.cluster.local\n"));
        assert!(
            text.contains("fd00:96::20 web web.demo web.demo.svc web.demo.svc.cluster.local\n")
        );
    }
}
