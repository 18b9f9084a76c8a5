//! A guided tour of the mesh on a two-node cluster built on this machine.
//!
//! `cargo run --release -p mesh-tests --bin mesh-demo` (as root, with
//! `target/release/mesh-agent` built). Everything it creates is removed at the
//! end, on error, and on Ctrl-C.

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::Duration;

use anyhow::{Result, bail};
use mesh_tests::{Cluster, ConnectionLog, NodeSpec, Pod, PodSpec, RunOutput, http_url};
use nix::sys::signal::{SigSet, Signal};

/// The cluster, for the signal thread (weak: main owns it, and tears it down
/// by dropping it).
static CLUSTER: Mutex<Option<Weak<Cluster>>> = Mutex::new(None);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Held by whoever is about to end the process: the signal thread while it
/// tears down (then it exits), main before it returns. So main cannot end the
/// process in the middle of the signal thread's teardown.
static EXIT: Mutex<()> = Mutex::new(());

const PAGE: &str = "<h1>hello from web</h1>\n";

fn main() -> ExitCode {
    // Ctrl-C / SIGTERM go to one thread that tears the cluster down, instead
    // of killing the process with namespaces and cgroups left behind.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("mesh-demo: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    thread::spawn(move || {
        while let Ok(sig) = signals.wait() {
            let _exiting = EXIT.lock().unwrap();
            INTERRUPTED.store(true, Ordering::SeqCst);
            // None before the cluster exists or once main is dropping it:
            // then main sees INTERRUPTED, or is tearing down already.
            let cluster = CLUSTER.lock().unwrap().as_ref().and_then(Weak::upgrade);
            if let Some(cluster) = cluster {
                eprintln!("\nmesh-demo: {sig}: tearing the cluster down");
                cluster.teardown();
                std::process::exit(130);
            }
        }
    });

    let result = run();
    let _exiting = EXIT.lock().unwrap();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn run() -> Result<()> {
    println!("== Building a two-node cluster from network namespaces, veths and cgroups");
    let cluster = Arc::new(
        Cluster::builder()
            .node(
                NodeSpec::new("node-a")
                    .pod(
                        PodSpec::new("client")
                            .namespace("demo")
                            .service_account("client"),
                    )
                    .pod(PodSpec::new("outsider").namespace("demo").enrolled(false)),
            )
            .node(
                NodeSpec::new("node-b")
                    .pod(PodSpec::new("web").namespace("demo").label("app", "web"))
                    .pod(PodSpec::new("echo").namespace("demo").label("app", "echo")),
            )
            .build()?,
    );
    *CLUSTER.lock().unwrap() = Some(Arc::downgrade(&cluster));
    check_interrupted()?;
    describe(&cluster);

    println!("\n== Starting one mesh-agent per node");
    for node in cluster.nodes() {
        cluster.start_agent(node.name())?;
        println!("   {}: agent ready", node.name());
        check_interrupted()?;
    }

    let client = cluster.pod("node-a", "client")?;
    let outsider = cluster.pod("node-a", "outsider")?;
    let web = cluster.pod("node-b", "web")?;
    let echo = cluster.pod("node-b", "echo")?;
    let _sleeper = client.spawn("sleep", ["infinity"])?;
    let www = cluster.workdir().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), PAGE)?;
    let _web = web.http_server(8080, &www)?;
    let _echo = echo.tcp_echo(7000)?;
    println!(
        "   web serves a {}-byte page on :8080; echo echoes on :7000",
        PAGE.len()
    );

    println!("\n== What the pods see");
    let mut step = 0;
    for (from, ip) in [
        (client, IpAddr::from(web.ipv4())),
        (client, web.ipv6().into()),
        (outsider, web.ipv4().into()),
    ] {
        check_interrupted()?;
        step += 1;
        let url = http_url(ip, 8080);
        let out = from.curl(&url)?;
        print_step(step, from, &format!("curl {url}"), &out);
    }
    check_interrupted()?;
    step += 1;
    let line = "hello mesh";
    let script = format!("printf '{line}\\n' | socat -t 2 - TCP:{}:7000", echo.ipv4());
    let out = client.run("sh", ["-c", &script], Duration::from_secs(10))?;
    print_step(
        step,
        client,
        &format!("send {line:?} to {}:7000 (echo)", echo.ipv4()),
        &out,
    );
    println!("        echoed back: {:?}", out.stdout_str().trim_end());

    // The agents log a line when a connection closes: wait for client's three.
    let client_id = client.workload_id();
    let logged = || {
        let conns = cluster.connections("node-a").unwrap_or_default();
        conns.iter().filter(|c| c.src_workload == client_id).count() >= 3
    };
    if !mesh_tests::sys::poll(Duration::from_secs(10), Duration::from_millis(50), logged) {
        println!("   (node-a's agent logged fewer than 3 connections of {client_id} within 10 s)");
    }
    thread::sleep(Duration::from_millis(300));

    println!("\n== What the agents logged (message \"connection closed\")");
    let mut rows = Vec::new();
    for node in cluster.nodes() {
        for c in cluster.connections(node.name())? {
            rows.push((node.name().to_owned(), c));
        }
    }
    print_table(&rows);
    let outsider_id = outsider.workload_id();
    let seen = rows.iter().any(|(_, c)| c.src_workload == outsider_id);
    println!(
        "\n   {outsider_id} is not enrolled: its call to web {}.",
        if seen {
            "WAS captured (unexpected!)"
        } else {
            "went straight to web, not through the mesh, so no agent logged it"
        }
    );

    println!("\n== Tearing down (agents get SIGTERM; namespaces, cgroups, pins removed)");
    Ok(())
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
            println!(
                "     pod {:<9} {:<14} {:<9} {:<10} {}",
                pod.name(),
                pod.workload_id(),
                pod.ipv4().to_string(),
                pod.ipv6().to_string(),
                if pod.enrolled() {
                    "enrolled"
                } else {
                    "NOT enrolled"
                }
            );
        }
    }
}

fn print_step(n: u32, from: &Pod, what: &str, out: &RunOutput) {
    let result = match out.code() {
        Some(0) => format!("exit 0, {} bytes received", out.stdout.len()),
        Some(code) => format!("FAILED: exit {code}: {}", out.stderr_str().trim()),
        None => format!("FAILED: {}", out.status),
    };
    println!("   {n}. {:<9} {what}\n        -> {result}", from.name());
}

/// Kiali draws a lock for mutual TLS; so does the demo.
fn security_of(c: &ConnectionLog) -> String {
    match c.other.get("security").and_then(|v| v.as_str()) {
        Some("mutual_tls") => "mTLS (locked)".to_owned(),
        Some("none") => "plaintext".to_owned(),
        _ => "unknown".to_owned(),
    }
}

fn text_field(c: &ConnectionLog, name: &str) -> String {
    c.other
        .get(name)
        .and_then(|v| v.as_str())
        .unwrap_or("unknown")
        .to_owned()
}

fn print_table(rows: &[(String, ConnectionLog)]) {
    let header = [
        "NODE",
        "SOURCE",
        "DESTINATION",
        "SECURITY",
        "PEER IDENTITY",
        "SENT",
        "RECEIVED",
        "DURATION",
        "ERROR",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|(node, c)| {
            [
                node.clone(),
                c.src_workload.clone(),
                c.dst.clone(),
                security_of(c),
                text_field(c, "peer_identity"),
                c.bytes_sent.to_string(),
                c.bytes_received.to_string(),
                format!("{} ms", c.duration_ms),
                c.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |row: [&str; 9]| {
        let cols: Vec<String> = row
            .iter()
            .zip(width)
            .enumerate()
            .map(|(i, (s, w))| {
                if (5..8).contains(&i) {
                    format!("{s:>w$}")
                } else {
                    format!("{s:<w$}")
                }
            })
            .collect();
        println!("   {}", cols.join("  ").trim_end());
    };
    line(header);
    for row in &cells {
        line(row.each_ref().map(String::as_str));
    }
    if cells.is_empty() {
        println!("   (none)");
    }
}
