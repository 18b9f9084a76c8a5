//! The cluster file: `Cluster::parse`, what every agent (and the CA) runs at start and on each
//! reload, then `State::build`, the node's view the data path routes with.
//!
//! Invariants: nothing panics; a rejected file gets an error that starts with its path; a file
//! that parses builds a state for each of its nodes, in which every workload IP leads to its
//! workload and every Service address to its Service.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;

use libfuzzer_sys::{Corpus, fuzz_target};
use mesh_agent::state::{Destination, State};
use mesh_agent::workload::Cluster;

const PATH: &str = "/etc/mesh/cluster.yaml";

fuzz_target!(|data: &[u8]| -> Corpus {
    // The agent reads the file as UTF-8 (an invalid file is refused before parsing).
    let Ok(text) = std::str::from_utf8(data) else {
        return Corpus::Reject;
    };
    match Cluster::parse(text, Path::new(PATH)) {
        Err(err) => {
            let message = err.to_string();
            assert!(message.starts_with(PATH), "{message:?}");
            assert!(
                message.len() > PATH.len() + 2,
                "an empty reason: {message:?}"
            );
        }
        Ok(cluster) => check_states(&cluster),
    }
    Corpus::Keep
});

fn check_states(cluster: &Cluster) {
    for node in &cluster.nodes {
        let state = State::build(cluster.clone(), node.name.as_str()).unwrap_or_else(|err| {
            panic!(
                "a cluster file that parses must build node {}'s state: {err}",
                node.name
            )
        });
        let local: Vec<_> = state
            .local_workloads()
            .iter()
            .map(|w| w.uid.clone())
            .collect();
        let listed: Vec<_> = node.workloads.iter().map(|w| w.qualified_name()).collect();
        assert_eq!(local, listed, "node {}'s local workloads", node.name);
        for workload in cluster.nodes.iter().flat_map(|n| &n.workloads) {
            for ip in &workload.ips {
                let found = state.workload_by_ip(*ip).unwrap_or_else(|| {
                    panic!("{ip} of {} leads nowhere", workload.qualified_name())
                });
                assert_eq!(found.uid, workload.qualified_name(), "{ip}");
                assert!(found.owns(*ip));
                assert!(matches!(
                    state.destination(SocketAddr::new(*ip, 80)),
                    Destination::Workload(w) if w.uid == found.uid
                ));
            }
        }
        for service in &cluster.services {
            for ip in &service.addresses {
                for port in service.ports.iter().map(|p| p.port).chain([1]) {
                    match state.destination(SocketAddr::new(*ip, port)) {
                        Destination::Service { service: found, .. } => {
                            assert_eq!(found.uid, service.qualified_name(), "{ip}")
                        }
                        other => panic!(
                            "service address {ip}:{port} of {} leads to {}",
                            service.qualified_name(),
                            match other {
                                Destination::Workload(w) => w.uid.clone(),
                                _ => "outside the mesh".to_owned(),
                            }
                        ),
                    }
                }
            }
            let _ = service.hostname(&cluster.trust_domain);
        }
        if let Some(service) = state.services().first() {
            let _ = service.endpoints_in_turn();
        }
    }
}
