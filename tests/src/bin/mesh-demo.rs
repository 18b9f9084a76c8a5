//! The seed story, "Mutual TLS Authentication": Istio's tutorial application (customer,
//! preference, recommendation v1 and v2) plus a curl pod outside the mesh, under PERMISSIVE,
//! STRICT and an AuthorizationPolicy. By default on a two-node cluster built on this machine,
//! whose agents read a cluster file; with `--kubernetes` on a real control plane with the mesh
//! installed from deploy/ and the tutorial applied from deploy/examples/tutorial/ by kubectl.
//!
//! `cargo xtask demo [--kubernetes]` (as root; it builds mesh-agent, mesh-cni and, for
//! Kubernetes, mesh-kubelet). Everything it creates is removed at the end, on error, and on
//! Ctrl-C / SIGTERM. It exits non-zero if the story does not come out as told.
//!
//! A real Prometheus scrapes the agents throughout; after each step `mesh-agent graph` draws
//! that step's traffic graph (locks for mTLS, red for denied) into `target/demo/step-N.png`
//! (`.dot` without Graphviz).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Parser;
use mesh_tests::kube::{KubeMesh, two_nodes};
use mesh_tests::seed::{
    self, Call, Client, Edge, Event, KubeSeed, Outcome, PolicyChange, Seed, Stage, Step, StepReport,
};
use mesh_tests::{Cluster, Prometheus, interrupt};

#[derive(Parser)]
#[command(about = "Istio's \"Mutual TLS Authentication\" story, played with the mesh")]
struct Opts {
    /// Play it on Kubernetes: a real control plane, the mesh installed from deploy/, the
    /// tutorial's Deployments, Services and policies applied with kubectl from
    /// deploy/examples/tutorial/
    #[arg(long)]
    kubernetes: bool,
}

/// How the story's policy changes are made, for printing them as the user makes them.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Files in the agents' policy directory.
    Files,
    /// kubectl.
    Kubernetes,
}

/// Where the tutorial's manifests are, as a user in the repository types it.
const TUTORIAL_DIR: &str = "deploy/examples/tutorial";

fn main() -> ExitCode {
    let opts = Opts::parse();
    interrupt::run_main("mesh-demo", || run(&opts))
}

fn run(opts: &Opts) -> Result<()> {
    println!(
        "== Mutual TLS with the mesh: Istio's tutorial application, and a curl pod outside the mesh"
    );
    if opts.kubernetes {
        on_kubernetes()
    } else {
        on_files()
    }
}

fn on_files() -> Result<()> {
    let cluster = Arc::new(seed::build_cluster()?);
    interrupt::watch(&cluster);
    interrupt::check()?;
    describe(&cluster);

    println!("\n== Starting one mesh-agent per node, then recommendation v1 and v2 and preference");
    let seed = Seed::start(cluster)?;
    interrupt::check()?;
    print_application(&seed);
    play_story(
        &seed,
        Mode::Files,
        "agents get SIGTERM; namespaces, cgroups, pins removed",
    )
}

fn on_kubernetes() -> Result<()> {
    println!(
        "\n== Starting Kubernetes: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and two nodes with a kubelet each"
    );
    let mesh = Arc::new(KubeMesh::start(&two_nodes())?);
    interrupt::watch(&mesh);
    interrupt::check()?;
    println!(
        "   the mesh installed from deploy/ (kubectl apply --server-side -k deploy/), mesh-cni chained into each node's CNI config, one mesh-agent per node run as its DaemonSet runs it"
    );
    println!(
        "   cluster id {}, API server {}",
        mesh.cluster().id(),
        mesh.kube().control_plane().server_url()
    );
    show(
        &mesh,
        &[
            "get",
            "nodes",
            "-o",
            "custom-columns=NODE:.metadata.name,ADDRESSES:.status.addresses[*].address,POD-CIDRS:.spec.podCIDRs[*]",
        ],
    )?;

    println!(
        "\n== Deploying the tutorial (the harness's kubelet runs each container's command from this machine; it ignores the image)"
    );
    println!("   $ kubectl apply -k {TUTORIAL_DIR}");
    let seed = KubeSeed::start(mesh)?;
    interrupt::check()?;
    show(
        &seed.mesh,
        &[
            "get",
            "namespaces",
            seed::NAMESPACE,
            seed::OUTSIDE_NAMESPACE,
            "-L",
            "istio.io/dataplane-mode",
        ],
    )?;
    show(
        &seed.mesh,
        &[
            "get",
            "pods",
            "-A",
            "-l",
            seed::APP_SELECTOR,
            "-o",
            "custom-columns=NAMESPACE:.metadata.namespace,POD:.metadata.name,NODE:.spec.nodeName,IP:.status.podIP,SERVICE-ACCOUNT:.spec.serviceAccountName",
        ],
    )?;
    show(&seed.mesh, &["get", "services", "-n", seed::NAMESPACE])?;
    print_application(&seed);
    play_story(
        &seed,
        Mode::Kubernetes,
        "kubelets stop the pods, agents get SIGTERM, the control plane is stopped; namespaces, cgroups, pins removed",
    )
}

/// Prints `$ kubectl ARGS` and what it printed.
fn show(mesh: &KubeMesh, args: &[&str]) -> Result<()> {
    let out = mesh.kubectl(args)?;
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                (*a).to_owned()
            }
        })
        .collect();
    println!("   $ kubectl {}", shown.join(" "));
    for line in out.stdout_str().lines() {
        println!("     {line}");
    }
    Ok(())
}

fn print_application(stage: &dyn Stage) {
    println!(
        "   preference answers `preference => <recommendation's answer>`, calling the recommendation Service (the agent spreads it over v1 and v2)"
    );
    let [curl, customer] = Client::ALL.map(|client| stage.url(client));
    if curl == customer {
        println!("   load: `curl -s {curl}` from the curl pod and the customer pod, in turn");
    } else {
        println!(
            "   load: `curl -s {curl}` from the curl pod and `curl -s {customer}` from the customer pod, in turn"
        );
    }
}

/// Plays every step; fails, once all were played, if one did not come out as told.
fn play_story(stage: &dyn Stage, mode: Mode, teardown: &str) -> Result<()> {
    let prometheus = Prometheus::start(stage.cluster())?;
    prometheus.wait_for_agents(stage.cluster().nodes().len())?;
    println!(
        "\n== Prometheus scrapes every agent each second ({}); each step's graph goes to {}",
        prometheus.url(),
        graphs_dir().display()
    );
    let mut failed = Vec::new();
    for (n, step) in Step::ALL.into_iter().enumerate() {
        interrupt::check()?;
        let started = Instant::now();
        if !play(stage, mode, n + 1, step)? {
            failed.push(format!("step {}: {}", n + 1, step.title()));
        }
        match draw_graph(&prometheus, n + 1, started) {
            Ok(path) => println!("\n   the step's traffic graph: {}", path.display()),
            Err(err) => println!("\n   no graph for this step: {err:#}"),
        }
    }

    println!("\n== Tearing down ({teardown})");
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

/// `target/demo` in the workspace.
fn graphs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("target")
        .join("demo")
}

/// `mesh-agent graph` over the step's time, as PNG when Graphviz is there, else DOT.
fn draw_graph(prometheus: &Prometheus, n: usize, started: Instant) -> Result<PathBuf> {
    let dir = graphs_dir();
    std::fs::create_dir_all(&dir)?;
    let has_dot = std::process::Command::new("dot").arg("-V").output().is_ok();
    let out = dir.join(format!("step-{n}.{}", if has_dot { "png" } else { "dot" }));
    // The rate window covers the step, and a scrape or two on either side.
    let window = format!("{}s", started.elapsed().as_secs() + 3);
    let agent = mesh_tests::agent_bin();
    let drawn = prometheus.run(
        &agent.to_string_lossy(),
        [
            "graph",
            "--prometheus",
            &prometheus.url(),
            "--window",
            &window,
            "--out",
            &out.to_string_lossy(),
        ],
    )?;
    if !drawn.success() {
        bail!("mesh-agent graph: {}", drawn.stderr_str().trim());
    }
    Ok(out)
}

/// Plays one step: applies its policies, runs the load, shows the agents' view, checks it.
/// Returns whether it came out as the story says.
fn play(stage: &dyn Stage, mode: Mode, n: usize, step: Step) -> Result<bool> {
    println!("\n== Step {n}/{}: {}", Step::ALL.len(), step.title());
    let changes = step.changes();
    print_changes(mode, &changes);
    seed::apply(stage, &changes)?;
    println!("   expected: {}\n", step.expectation());

    let report = seed::run_step(stage, step, seed::ROUNDS, seed::PAUSE, |call| {
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

fn print_changes(mode: Mode, changes: &[PolicyChange]) {
    if changes.is_empty() {
        println!("   no policy: without a PeerAuthentication, Istio's default mode is PERMISSIVE");
    }
    for change in changes {
        match mode {
            Mode::Files => match change {
                PolicyChange::Apply(manifest) => println!("   applying {}.yaml:", manifest.name),
                PolicyChange::Delete { name, .. } => println!("   deleting {name}.yaml"),
            },
            Mode::Kubernetes => {
                let args = change.kubectl_args(Path::new(TUTORIAL_DIR));
                let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
                println!("   $ kubectl {}", args.join(" "));
            }
        }
        if let PolicyChange::Apply(manifest) = change {
            for line in manifest.yaml.lines() {
                println!("      {line}");
            }
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
            Outcome::Denied => format!(
                "rejection=policy_denied denied_by={}",
                e.reason.as_deref().unwrap_or("?")
            ),
            Outcome::Rejected => format!("rejection={}", e.reason.as_deref().unwrap_or("?")),
            _ => format!("error={}", e.reason.as_deref().unwrap_or("?")),
        };
        // The unified `connection closed` line says `direction`, `dst_workload` and
        // `src_identity` (absent for a plaintext caller); the TLS-level rejection lines say
        // `workload` and `peer_identity`.
        let message = e.line["message"].as_str().unwrap_or("?");
        let (direction, workload_key, identity_key) = match e.line["direction"].as_str() {
            Some(d) => (format!(" direction={d}"), "dst_workload", "src_identity"),
            None => (String::new(), "workload", "peer_identity"),
        };
        let identity = match e.line[identity_key].as_str() {
            Some(id) => format!(" {identity_key}={id}"),
            None => format!(" (no {identity_key})"),
        };
        println!(
            "   {}'s agent: \"{message}\"{direction} {workload_key}={}{identity} src_addr={} {why}",
            e.node, e.workload, e.src_addr,
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
