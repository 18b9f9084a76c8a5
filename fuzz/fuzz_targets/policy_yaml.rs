//! The policy compiler: `PolicySet::from_yaml`, what the agent runs on every policy file it
//! loads (a user's YAML, or in Kubernetes an object any namespace admin may write), then the
//! two questions the proxy asks a set that loaded.
//!
//! Invariants: nothing panics; a rejected file gets an error that names the file; a loaded set
//! answers `mtls_mode` and `authorize` for any workload and connection.
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::{Corpus, fuzz_target};
use mesh_agent::identity::SpiffeId;
use mesh_agent::policy::{
    ConnectionAttrs, DEFAULT_ROOT_NAMESPACE, PolicyError, PolicySet, WorkloadRef,
};

const FILE: &str = "policies/fuzz.yaml";

/// Workloads as policies select them: by namespace (one of them the root) and labels.
static WORKLOADS: LazyLock<Vec<(&'static str, BTreeMap<String, String>)>> = LazyLock::new(|| {
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>()
    };
    vec![
        ("default", labels(&[("app", "httpbin")])),
        ("foo", labels(&[("app", "web"), ("version", "v1")])),
        (DEFAULT_ROOT_NAMESPACE, labels(&[])),
    ]
});

static SOURCES: LazyLock<Vec<SpiffeId>> = LazyLock::new(|| {
    [
        "spiffe://cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/foo/sa/web",
        "spiffe://example.org/ns/istio-system/sa/ingress",
    ]
    .iter()
    .map(|id| id.parse().expect("a valid SPIFFE ID"))
    .collect()
});

const SOURCE_IPS: [IpAddr; 3] = [
    IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 2)),
    IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 7, 1)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2)),
];

const PORTS: [u16; 4] = [0, 80, 8080, 65535];

fuzz_target!(|data: &[u8]| -> Corpus {
    // The agent reads policy files as UTF-8 (an invalid file is refused before parsing).
    let Ok(text) = std::str::from_utf8(data) else {
        return Corpus::Reject;
    };
    match PolicySet::from_yaml(text, Path::new(FILE), DEFAULT_ROOT_NAMESPACE) {
        Err(err) => check_error(&err),
        Ok(set) => exercise(&set),
    }
    Corpus::Keep
});

/// A rejected file gets at least one problem, each about this file and saying something.
fn check_error(err: &PolicyError) {
    let PolicyError::Invalid { problems } = err else {
        panic!("parsing text never reads a file, yet: {err}");
    };
    assert!(!problems.is_empty(), "a rejection without a problem");
    for problem in problems {
        assert_eq!(problem.file, Path::new(FILE), "{problem}");
        assert!(
            !problem.message.trim().is_empty(),
            "an empty problem: {problem}"
        );
    }
    let _ = err.to_string();
}

fn exercise(set: &PolicySet) {
    let _ = set.warnings();
    for (namespace, labels) in WORKLOADS.iter() {
        let workload = WorkloadRef { namespace, labels };
        for port in PORTS {
            let resolution = set.resolve_mtls(&workload, port);
            assert_eq!(resolution.mode, set.mtls_mode(&workload, port));
            let _ = (resolution.scope.to_string(), &resolution.conflicts);
            for source_ip in SOURCE_IPS {
                let plaintext = ConnectionAttrs {
                    source: None,
                    source_ip,
                    destination_port: port,
                };
                let _ = set.authorize(&workload, &plaintext).to_string();
                for source in SOURCES.iter() {
                    let attrs = ConnectionAttrs {
                        source: Some(source),
                        source_ip,
                        destination_port: port,
                    };
                    let _ = set.authorize(&workload, &attrs).to_string();
                }
            }
        }
    }
}
