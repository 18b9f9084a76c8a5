//! The seed story on Kubernetes, as `cargo xtask demo --kubernetes` plays it: Istio's tutorial
//! application and its policies applied with kubectl from deploy/examples/tutorial/, the curl
//! pod in a namespace outside the mesh. Every step must come out as the story tells
//! ([`seed::check`]), and what was refused must be exactly the curl pod's calls, refused by
//! preference's own agent.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use mesh_tests::kube::{KubeMesh, two_nodes};
use mesh_tests::seed::{
    self, Client, KubeSeed, NAMESPACE, OUTSIDE_NAMESPACE, Outcome, Step, StepReport,
};

#[test]
fn the_seed_story_on_kubernetes_permissive_strict_authorization_and_back() -> Result<()> {
    let seed = KubeSeed::start(Arc::new(KubeMesh::start(&two_nodes())?))?;
    let where_refused = Refusals::of(&seed)?;
    for step in Step::ALL {
        seed::apply(&seed, &step.changes())?;
        let report = seed::run_step(&seed, step, seed::ROUNDS, seed::PAUSE, |_| Ok(()))?;
        seed::check(&report)
            .and_then(|()| where_refused.check(&report))
            .with_context(|| format!("step {step:?}; the calls: {:#?}", report.calls))?;
    }
    Ok(())
}

/// Where a refusal must come from and be logged.
struct Refusals {
    /// The curl pod's addresses.
    curl_ips: Vec<IpAddr>,
    /// The node preference runs on.
    preference_node: String,
}

impl Refusals {
    fn of(seed: &KubeSeed) -> Result<Refusals> {
        let curl_ips = pod_field(seed, OUTSIDE_NAMESPACE, "curl", ".status.podIPs[*].ip")?
            .split_whitespace()
            .map(|ip| ip.parse().with_context(|| format!("pod IP {ip:?}")))
            .collect::<Result<_>>()?;
        let preference_node = pod_field(seed, NAMESPACE, "preference", ".spec.nodeName")?;
        Ok(Refusals {
            curl_ips,
            preference_node,
        })
    }

    /// Under STRICT every call of the curl pod is rejected as plaintext, under the
    /// AuthorizationPolicy denied; otherwise nothing is refused. Each refusal is logged by
    /// preference's agent, for no identity, from the curl pod's address.
    fn check(&self, r: &StepReport) -> Result<()> {
        let want = match r.step {
            Step::Strict => Some(Outcome::Rejected),
            Step::AllowOnlyCustomer => Some(Outcome::Denied),
            Step::Permissive | Step::CleanUp => None,
        };
        let refused: Vec<_> = r
            .events
            .iter()
            .filter(|e| e.outcome != Outcome::Delivered)
            .collect();
        let curl_calls = r.calls.iter().filter(|c| c.client == Client::CurlPod);
        let expected = if want.is_some() {
            curl_calls.count()
        } else {
            0
        };
        ensure!(
            refused.len() == expected,
            "{} refusals, want {expected}: {refused:#?}",
            refused.len()
        );
        for e in refused {
            let src: SocketAddr = e.src_addr.parse().context("src_addr")?;
            ensure!(
                Some(e.outcome) == want
                    && e.destination == "preference"
                    && e.node == self.preference_node
                    && e.peer_identity == "unknown"
                    && self.curl_ips.contains(&src.ip().to_canonical()),
                "want a {want:?} of the curl pod ({:?}) by {}'s agent: {:?}",
                self.curl_ips,
                self.preference_node,
                e.line
            );
        }
        Ok(())
    }
}

/// A field (a kubectl JSONPath) of the one pod of the Deployment `app` in `namespace`.
fn pod_field(seed: &KubeSeed, namespace: &str, app: &str, field: &str) -> Result<String> {
    let selector = format!("app={app}");
    let jsonpath = format!("jsonpath={{.items[0]{field}}}");
    let out = seed.mesh.kubectl([
        "get", "pods", "-n", namespace, "-l", &selector, "-o", &jsonpath,
    ])?;
    let value = out.stdout_str().trim().to_owned();
    ensure!(
        !value.is_empty(),
        "no {field} for the pod of {namespace}/{app}"
    );
    Ok(value)
}
