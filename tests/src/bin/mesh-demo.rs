//! The seed story, "Mutual TLS Authentication", played on a two-node cluster built on this
//! machine: Istio's tutorial application (customer, preference, recommendation v1 and v2) plus
//! a curl pod outside the mesh, under PERMISSIVE, STRICT and an AuthorizationPolicy.
//!
//! `cargo run --release -p mesh-tests --bin mesh-demo` (as root, with
//! `target/release/mesh-agent` built). Everything it creates is removed at the end, on error,
//! and on Ctrl-C / SIGTERM. It exits non-zero if the story does not come out as told.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Result, bail};
use mesh_tests::seed::{self, Call, Edge, Event, Outcome, PolicyChange, Seed, Step, StepReport};
use mesh_tests::{Cluster, interrupt};

fn main() -> ExitCode {
    interrupt::run_main("mesh-demo", run)
}

fn run() -> Result<()> {
    println!(
        "== Mutual TLS with the mesh: Istio's tutorial application, and a curl pod outside the mesh"
    );
    let cluster = Arc::new(seed::build_cluster()?);
    interrupt::watch(&cluster);
    interrupt::check()?;
    describe(&cluster);

    println!("\n== Starting one mesh-agent per node, then recommendation v1 and v2 and preference");
    let seed = Seed::start(cluster)?;
    interrupt::check()?;
    println!(
        "   preference answers `preference => <recommendation's answer>`, calling the recommendation Service (the agent spreads it over v1 and v2)"
    );
    println!(
        "   load: `curl -s {}` from the curl pod and the customer pod, in turn",
        seed::PREFERENCE_URL
    );

    let mut failed = Vec::new();
    for (n, step) in Step::ALL.into_iter().enumerate() {
        interrupt::check()?;
        if !play(&seed, n + 1, step)? {
            failed.push(format!("step {}: {}", n + 1, step.title()));
        }
    }

    println!("\n== Tearing down (agents get SIGTERM; namespaces, cgroups, pins removed)");
    if !failed.is_empty() {
        bail!(
            "the story did not come out as told in: {}",
            failed.join("; ")
        );
    }
    println!(
        "   the story came out as told in all {} steps",
        Step::ALL.len()
    );
    Ok(())
}

/// Plays one step: applies its policies, runs the load, shows the agents' view, checks it.
/// Returns whether it came out as the story says.
fn play(seed: &Seed, n: usize, step: Step) -> Result<bool> {
    let cluster = &seed.cluster;
    println!("\n== Step {n}/{}: {}", Step::ALL.len(), step.title());
    let changes = step.changes();
    print_changes(&changes);
    seed::apply(cluster, &changes)?;
    println!("   expected: {}\n", step.expectation());

    let report = seed::run_step(cluster, step, seed::ROUNDS, seed::PAUSE, |call| {
        print_call(call);
        interrupt::check()
    })?;

    println!("\n   What the agents saw (like Kiali's graph with the security badges):");
    print_edges(&report.edges);
    print_refusals(&report.events);
    Ok(print_verdict(&report))
}

fn describe(cluster: &Cluster) {
    println!(
        "   cluster id {} (cluster file {})",
        cluster.id(),
        cluster.cluster_file().display()
    );
    for node in cluster.nodes() {
        println!("   {}  {} {}", node.name(), node.ipv4(), node.ipv6());
        for pod in node.pods() {
            let labels: Vec<String> = pod
                .labels()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "     {:<26} {:<9} sa {:<15} {:<30} {}",
                pod.workload_id(),
                pod.ipv4().to_string(),
                pod.service_account(),
                labels.join(","),
                if pod.enrolled() {
                    "in the mesh"
                } else {
                    "NOT in the mesh"
                }
            );
        }
    }
    println!("   services (pods resolve these names to the virtual IPs)");
    for service in cluster.services() {
        println!(
            "     {:<26} {:<9} {}",
            service.name(),
            service.ipv4,
            service.ipv6
        );
    }
}

fn print_changes(changes: &[PolicyChange]) {
    if changes.is_empty() {
        println!("   no policy: without a PeerAuthentication, Istio's default mode is PERMISSIVE");
    }
    for change in changes {
        match change {
            PolicyChange::Apply { name, yaml } => {
                println!("   applying {name}.yaml:");
                for line in yaml.lines() {
                    println!("      {line}");
                }
            }
            PolicyChange::Delete { name } => println!("   deleting {name}.yaml"),
        }
    }
}

/// As the story's loop prints it, with what curl gave.
fn print_call(call: &Call) {
    let what = match call.exit_code {
        Some(0) => format!("exit 0: {}", call.body),
        Some(code) => format!(
            "command terminated with exit code {code}   ({})",
            call.error
        ),
        None => format!("curl was killed   ({})", call.error),
    };
    println!(
        "   Executing curl in {:<13} {what}",
        call.client.to_string()
    );
}

fn print_edges(edges: &[Edge]) {
    let header = [
        "SOURCE",
        "DESTINATION",
        "SECURITY",
        "CONNECTIONS",
        "REFUSED",
        "WHY",
    ];
    let rows: Vec<[String; 6]> = edges
        .iter()
        .map(|e| {
            [
                e.source.clone(),
                e.destination.clone(),
                e.security.to_string(),
                e.connections.to_string(),
                e.refused.to_string(),
                e.reasons.iter().cloned().collect::<Vec<_>>().join(", "),
            ]
        })
        .collect();
    let mut widths = header.map(display_width);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(display_width(cell));
        }
    }
    print_row(&header.map(str::to_owned), &widths);
    for row in &rows {
        print_row(row, &widths);
    }
    if rows.is_empty() {
        println!("   (no inbound connection logged)");
    }
}

fn print_row(row: &[String; 6], widths: &[usize; 6]) {
    let cells: Vec<String> = row
        .iter()
        .zip(widths)
        .map(|(cell, &w)| format!("{cell}{}", " ".repeat(w - display_width(cell))))
        .collect();
    println!("   {}", cells.join("  ").trim_end());
}

/// Columns a terminal gives the text: the lock is a wide character.
fn display_width(s: &str) -> usize {
    s.chars()
        .map(|c| if c >= '\u{1F300}' { 2 } else { 1 })
        .sum()
}

/// One log line per kind of refusal: what the far agent said and why.
fn print_refusals(events: &[Event]) {
    let mut shown = std::collections::BTreeSet::new();
    for e in events.iter().filter(|e| e.outcome != Outcome::Delivered) {
        if !shown.insert((e.outcome, e.reason.clone())) {
            continue;
        }
        let why = match e.outcome {
            Outcome::Denied => format!("policy={}", e.reason.as_deref().unwrap_or("?")),
            Outcome::Rejected => format!("rejection={}", e.reason.as_deref().unwrap_or("?")),
            _ => format!("error={}", e.reason.as_deref().unwrap_or("?")),
        };
        println!(
            "   {}'s agent: \"{}\" workload={} peer_identity={} src_addr={} {why}",
            e.node,
            e.line["message"].as_str().unwrap_or("?"),
            e.workload,
            e.peer_identity,
            e.src_addr,
        );
    }
}

fn print_verdict(report: &StepReport) -> bool {
    match seed::check(report) {
        Ok(()) => {
            println!("   ✔ as the story says: {}", report.step.expectation());
            true
        }
        Err(e) => {
            println!("   ✘ NOT as the story says:");
            for line in format!("{e:#}").lines() {
                println!("     {line}");
            }
            false
        }
    }
}
