//! The Node object: registered as kubelet registers it (so kube-scheduler binds pods to it)
//! and kept alive through its Lease in `kube-node-lease`, as kubelet's heartbeat is.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::watch;

use super::Ctx;

/// The field manager of everything the kubelet writes with server-side apply.
const FIELD_MANAGER: &str = "mesh-kubelet";
/// Kubelet's defaults: renew every 10 s, a lease lasts 40 s.
const LEASE_RENEW: Duration = Duration::from_secs(10);
const LEASE_DURATION_SECONDS: i32 = 40;
/// How long to wait before trying again after the API server refused or did not answer.
const RETRY: Duration = Duration::from_secs(2);

/// Registers the Node (retrying until the API server takes it), then renews its Lease every
/// 10 s until `stop`. Failures are logged and retried: an API server that restarts must not
/// end the kubelet.
pub(crate) async fn run(ctx: &Ctx, mut stop: watch::Receiver<bool>) {
    let uid = loop {
        match register(ctx).await {
            Ok(uid) => break uid,
            Err(e) => tracing::warn!("register node {}: {e:#}", ctx.config.node),
        }
        if stopped_within(&mut stop, RETRY).await {
            return;
        }
    };
    tracing::info!(node = %ctx.config.node, "mesh-kubelet ready");
    loop {
        if let Err(e) = renew_lease(ctx, &uid).await {
            tracing::warn!("renew the lease of node {}: {e:#}", ctx.config.node);
        }
        if stopped_within(&mut stop, LEASE_RENEW).await {
            return;
        }
    }
}

/// Waits `period`; true if `stop` turned true meanwhile (or its sender went).
async fn stopped_within(stop: &mut watch::Receiver<bool>, period: Duration) -> bool {
    tokio::time::timeout(period, stop.wait_for(|s| *s))
        .await
        .is_ok()
}

/// Creates or updates the Node (server-side apply of its labels and pod CIDRs), then its
/// status; returns its uid, which the Lease's owner reference needs. The status goes as a
/// JSON merge patch, which replaces its lists whole: server-side apply rejects the addresses
/// (two InternalIPs, in a list it keys by type).
async fn register(ctx: &Ctx) -> Result<String> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let name = &ctx.config.node;
    let node = nodes
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(node_object(ctx)?),
        )
        .await
        .with_context(|| format!("apply Node {name}"))?;
    let status = Patch::Merge(node_status_object(ctx));
    nodes
        .patch_status(name, &PatchParams::default(), &status)
        .await
        .with_context(|| format!("patch the status of Node {name}"))?;
    node.metadata
        .uid
        .with_context(|| format!("Node {name} has no uid"))
}

fn node_object(ctx: &Ctx) -> Result<Node> {
    let c = &ctx.config;
    let i = c.node_index()?;
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), c.node.clone()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/arch".to_owned(), go_arch().to_owned()),
    ]);
    let cidrs = vec![format!("10.{i}.0.0/24"), format!("fd00:{i}::/64")];
    Ok(Node {
        metadata: ObjectMeta {
            name: Some(c.node.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(cidrs[0].clone()),
            pod_cidrs: Some(cidrs),
            ..NodeSpec::default()
        }),
        status: None,
    })
}

/// Kubernetes' name of this machine's architecture (`kubernetes.io/arch`), as Go names it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Addresses, capacity (a fixed, roomy node: 8 CPUs, 16 GiB, 110 pods; the scheduler only
/// needs room) and the Ready condition.
fn node_status_object(ctx: &Ctx) -> Node {
    let c = &ctx.config;
    let mut addresses: Vec<NodeAddress> = c
        .node_ips()
        .iter()
        .map(|ip| NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        })
        .collect();
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: c.node.clone(),
    });
    let resources = BTreeMap::from([
        ("cpu".to_owned(), Quantity("8".into())),
        ("memory".to_owned(), Quantity("16Gi".into())),
        ("pods".to_owned(), Quantity("110".into())),
    ]);
    let now = Time(Timestamp::now());
    let ready = NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("KubeletReady".into()),
        message: Some("kubelet is posting ready status".into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now),
    };
    Node {
        metadata: ObjectMeta {
            name: Some(c.node.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(addresses),
            allocatable: Some(resources.clone()),
            capacity: Some(resources),
            conditions: Some(vec![ready]),
            ..NodeStatus::default()
        }),
    }
}

/// Server-side apply of the Lease with a new renew time (creates it the first time), owned by
/// the Node so it goes with it.
async fn renew_lease(ctx: &Ctx, node_uid: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    let name = &ctx.config.node;
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some("kube-node-lease".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.clone(),
                uid: node_uid.to_owned(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.clone()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        }),
    };
    leases
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(lease),
        )
        .await
        .with_context(|| format!("apply Lease kube-node-lease/{name}"))?;
    Ok(())
}
