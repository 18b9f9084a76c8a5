//! The seed story, "Mutual TLS Authentication", as a test: Istio's tutorial application
//! (customer -> preference -> recommendation v1/v2) and a curl pod outside the mesh, under
//! PERMISSIVE, STRICT, an AuthorizationPolicy, and back. `mesh-demo` plays the same scenario.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_tests::addr;
use mesh_tests::seed::{
    self, AUTHORIZATION_POLICY, Client, EXIT_RESET, NAMESPACE, Outcome, Security, Seed, Step,
    StepReport, expect_backend_hops, expect_bodies, expect_edge, expect_exit, expect_mesh_edge,
    expect_refusal_reason, expect_refused,
};

/// Applies the step's policies and runs the story's load against it.
fn play(s: &Seed, step: Step) -> Result<StepReport> {
    seed::apply(s, &step.changes())?;
    seed::run_step(s, step, seed::ROUNDS, seed::PAUSE, |_| Ok(()))
        .with_context(|| format!("step {step:?}"))
}

/// Both clients get preference's answer; the curl pod in plaintext, customer (and preference,
/// calling recommendation) over mTLS.
fn assert_everyone_gets_through(r: &StepReport) -> Result<()> {
    expect_exit(&r.calls, Client::CurlPod, 0)?;
    expect_exit(&r.calls, Client::Customer, 0)?;
    expect_bodies(&r.calls)?;
    expect_edge(&r.edges, "unknown", "preference", Security::Plaintext)?;
    expect_mesh_edge(&r.edges, "customer", "preference")?;
    expect_backend_hops(&r.edges)?;
    Ok(())
}

/// The curl pod is reset (exit 56) and reaches nothing; customer keeps working over mTLS.
fn assert_only_customer_gets_through(r: &StepReport) -> Result<()> {
    expect_exit(&r.calls, Client::CurlPod, EXIT_RESET)?;
    expect_exit(&r.calls, Client::Customer, 0)?;
    expect_bodies(&r.calls)?;
    expect_refused(&r.edges, "unknown", "preference")?;
    expect_mesh_edge(&r.edges, "customer", "preference")?;
    expect_backend_hops(&r.edges)?;
    Ok(())
}

#[test]
fn the_seed_story_permissive_strict_authorization_and_back() -> Result<()> {
    let s = Seed::new()?;
    for step in Step::ALL {
        let report = play(&s, step)?;
        let check = match step {
            Step::Permissive => assert_default(&report),
            Step::Strict => assert_strict(&report),
            Step::AllowOnlyCustomer => assert_allow_only_customer(&report, &s),
            Step::CleanUp => assert_clean_up(&report),
        };
        check.with_context(|| format!("step {step:?}; the calls: {:#?}", report.calls))?;
    }
    Ok(())
}

fn assert_default(r: &StepReport) -> Result<()> {
    assert_everyone_gets_through(r)?;
    // Both recommendations answered over the step (preference alternates).
    for v in ["v1 from recommendation-v1", "v2 from recommendation-v2"] {
        ensure!(
            r.calls.iter().any(|c| c.body.ends_with(v)),
            "no answer from recommendation {v}"
        );
    }
    Ok(())
}

/// Preference's own agent rejects the plaintext connections, as plaintext under STRICT.
fn assert_strict(r: &StepReport) -> Result<()> {
    assert_only_customer_gets_through(r)?;
    let rejected = expect_refusal_reason(&r.events, "preference", "plaintext_strict")?;
    ensure!(rejected.outcome == Outcome::Rejected, "{:?}", rejected.line);
    ensure!(
        rejected.security == Security::Plaintext,
        "{:?}",
        rejected.line
    );
    ensure!(rejected.node == "node-b", "{:?}", rejected.line);
    Ok(())
}

/// Plaintext is accepted again, but the AuthorizationPolicy denies the curl pod, and the
/// denial names the policy and the curl pod's address.
fn assert_allow_only_customer(r: &StepReport, s: &Seed) -> Result<()> {
    assert_only_customer_gets_through(r)?;
    let policy = format!("{NAMESPACE}/{AUTHORIZATION_POLICY}");
    let denied = expect_refusal_reason(&r.events, "preference", &policy)?;
    ensure!(denied.outcome == Outcome::Denied, "{:?}", denied.line);
    ensure!(denied.peer_identity == "unknown", "{:?}", denied.line);
    let src: SocketAddr = denied.src_addr.parse().context("src_addr")?;
    let from_curl = seed::pod(&s.cluster, "curl")?
        .ips()
        .contains(&src.ip().to_canonical());
    ensure!(
        from_curl,
        "the denial should name the curl pod's address: {:?}",
        denied.line
    );
    ensure!(
        !r.events.iter().any(|e| e.outcome == Outcome::Rejected),
        "back in PERMISSIVE, nothing may be refused for being plaintext: {:#?}",
        r.events
    );
    Ok(())
}

fn assert_clean_up(r: &StepReport) -> Result<()> {
    assert_everyone_gets_through(r)?;
    ensure!(
        r.edges.iter().all(|e| e.refused == 0),
        "nothing may be refused once the policies are gone: {:#?}",
        r.edges
    );
    Ok(())
}

/// The caller's side agrees: customer's outbound connections to preference were mTLS with
/// preference's verified identity.
#[test]
fn customer_calls_preference_over_mtls_on_its_own_node_too() -> Result<()> {
    let s = Seed::new()?;
    let call = seed::curl_preference(&s, Client::Customer)?;
    ensure!(call.succeeded(), "{call:?}");
    let preference = seed::pod(&s.cluster, "preference")?;
    let dsts: Vec<String> = preference
        .ips()
        .iter()
        .map(|ip| addr(*ip, seed::PORT))
        .collect();
    // customer calls the preference Service: the line names the endpoint it went to.
    let endpoint = |c: &mesh_tests::ConnectionLog| {
        c.other
            .get("endpoint")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let out = s.cluster.wait_for_connection(
        "node-a",
        |c| c.src_workload == "tutorial/customer" && dsts.contains(&endpoint(c)),
        Duration::from_secs(10),
    )?;
    ensure!(out.other["security"] == "mutual_tls", "{out:?}");
    ensure!(
        out.other["dst_identity"] == "spiffe://cluster.local/ns/tutorial/sa/preference",
        "{out:?}"
    );
    Ok(())
}

/// `preference` and `recommendation` are Services: customer's calls go to preference's virtual
/// IP, and preference's calls to recommendation's are spread by its agent over v1 and v2.
#[test]
fn the_names_are_services_and_the_agent_spreads_recommendation() -> Result<()> {
    let s = Seed::new()?;
    for _ in 0..4 {
        let call = seed::curl_preference(&s, Client::Customer)?;
        ensure!(call.exit_code == Some(0), "customer's call: {call:?}");
    }
    // Either family: the pods resolve each name to both virtual IPs.
    let vips = |name: &str| -> Result<[String; 2]> {
        let service = s.cluster.service(name)?;
        Ok([addr(service.ipv4, 8080), addr(service.ipv6, 8080)])
    };
    let (preference_vips, recommendation_vips) = (vips("preference")?, vips("recommendation")?);
    let service_of = |c: &mesh_tests::ConnectionLog| {
        c.other
            .get("dst_service")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let customer_lines = s.cluster.connections("node-a")?;
    ensure!(
        customer_lines
            .iter()
            .any(|c| c.src_workload == "tutorial/customer"
                && preference_vips.contains(&c.dst)
                && service_of(c).as_deref() == Some("preference.tutorial.svc.cluster.local")),
        "no line of customer to preference's virtual IPs: {customer_lines:#?}"
    );
    let endpoints: std::collections::BTreeSet<String> = s
        .cluster
        .connections("node-b")?
        .into_iter()
        .filter(|c| c.src_workload == "tutorial/preference" && recommendation_vips.contains(&c.dst))
        .filter_map(|c| {
            c.other
                .get("endpoint")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect();
    let reached = |pod: &str| -> Result<bool> {
        let pod = seed::pod(&s.cluster, pod)?;
        Ok(pod
            .ips()
            .iter()
            .any(|ip| endpoints.contains(&addr(*ip, 8080))))
    };
    ensure!(
        reached("recommendation-v1")? && reached("recommendation-v2")?,
        "preference's calls to the recommendation Service reached only {endpoints:?}"
    );
    Ok(())
}
