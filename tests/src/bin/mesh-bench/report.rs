//! The markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::thread;
use std::time::Duration;

use crate::bpf_stats::{BpfCost, MESH_PROGRAMS};
use crate::idle::{IdleConnections, SETTLE};
use crate::usage::Usage;
use crate::{FIGURES, Figure, Opts, PathKind, Results, TESTS, Test};

/// Targets of the benchmark issue, MiB.
const IDLE_RSS_TARGET_MIB: f64 = 20.0;
const HELD_RSS_TARGET_MIB: f64 = 150.0;

impl Results {
    /// The median of a figure over the repetitions, if any succeeded.
    pub fn median(&self, f: Figure, p: PathKind) -> Option<f64> {
        median(self.figures.get(&(f, p)).map_or(&[][..], |v| v))
    }
}

/// Nearest-rank percentile `p` (0–100) of `v`.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn fmt_val(v: Option<f64>) -> String {
    match v {
        None => "error".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_owned()
}

/// (CPUs, kernel release, CPU model) of this machine.
pub fn machine() -> (String, String, String) {
    let nproc = thread::available_parallelism().map_or("?".into(), |n| n.to_string());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| first_line(&s))
        .unwrap_or_else(|_| "?".into());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "?".into());
    (nproc, kernel, cpu)
}

/// Now, as `2026-12-01 20:05 UTC`.
pub fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

pub fn report(opts: &Opts, res: &Results, check: &str, elapsed: Duration) -> String {
    let (nproc, kernel, cpu) = machine();
    let date = date_utc();
    let mut s = String::new();
    let _ = writeln!(s, "# mesh-bench results\n");
    let _ = writeln!(
        s,
        "{date}; `mesh-bench{}`; {} repetitions, paths interleaved, median of the repetitions; \
         run took {:.0} s.\n",
        if opts.quick { " --quick" } else { "" },
        opts.reps,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "Machine: {nproc} CPUs (nproc), kernel {kernel}, CPU model: {cpu}. All nodes and pods \
         are network namespaces of this one machine (veth + bridges), so the figures compare \
         paths, not networks.\n"
    );
    let _ = writeln!(
        s,
        "Paths: **direct** = plain-client (node-a) → plain-server (node-b), both outside the \
         mesh; **mesh** = client (node-a) → server (node-b), both enrolled, through both agents \
         (mutual TLS, HBONE); **stunnel peer** = plain-client → stunnel4 client (same pod) → \
         mutual TLS (TLS 1.3, P-256 self-signed certificates, `verify = 2`) → stunnel4 server in \
         plain-server → the same servers. Tests: iperf3 {} s per run (`-P 1`, `-P 8`, \
         `end.sum_received`); 1 KiB each way request/response, {} exchanges on one connection \
         (TCP_NODELAY, Python client); {} sequential new connections with 1 byte each way \
         (Python client).\n",
        opts.iperf_secs, opts.rr_n, opts.cr_n
    );
    let zt = res.paths.contains(&PathKind::Ztunnel);
    write_ztunnel_path(&mut s, opts, res);

    let m = |f: Figure, p: PathKind| res.median(f, p);
    let _ = writeln!(
        s,
        "| figure | direct | mesh (cross-node) | stunnel peer |{} mesh / direct | \
         stunnel / direct |{} mesh / stunnel |{}",
        if zt { " ztunnel |" } else { "" },
        if zt { " ztunnel / direct |" } else { "" },
        if zt { " mesh / ztunnel |" } else { "" }
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|{}",
        if zt { "---:|---:|---:|" } else { "" }
    );
    for f in FIGURES {
        let (d, me, pe, z) = (
            m(f, PathKind::Direct),
            m(f, PathKind::Mesh),
            m(f, PathKind::Peer),
            m(f, PathKind::Ztunnel),
        );
        let cell = |v: String| if zt { format!(" {v} |") } else { String::new() };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |{} {} | {} |{} {} |{}",
            f.label(),
            fmt_val(d),
            fmt_val(me),
            fmt_val(pe),
            cell(fmt_val(z)),
            ratio(me, d),
            ratio(pe, d),
            cell(ratio(z, d)),
            ratio(me, pe),
            cell(ratio(me, z))
        );
    }

    let _ = writeln!(
        s,
        "\nSame node: **direct same-node** = plain-client → plain-local-server, both on node-a \
         and outside the mesh (the node's bridge); **mesh same-node** = client → local-server, \
         both enrolled on node-a: short-circuited by node-a's agent (identity and policy \
         checked, no TLS), the bytes relayed in user space. Kernel splicing (sockmap) is off on \
         this kernel (docs/agent.md, \"Same-node connections\"), so there is no spliced row.\n"
    );
    let _ = writeln!(
        s,
        "| figure | direct same-node | mesh same-node (relay) | mesh same-node / direct same-node |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for f in FIGURES {
        let (d, me) = (m(f, PathKind::SameNodeDirect), m(f, PathKind::SameNode));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            f.label(),
            fmt_val(d),
            fmt_val(me),
            ratio(me, d)
        );
    }

    let _ = writeln!(
        s,
        "\nRatios are the first path's figure divided by the second's: below 1× is less \
         throughput or fewer connections/s, above 1× is more latency. For new connections, the \
         mesh reuses the pooled HBONE connection between the agents (one HTTP/2 connection over \
         mutual TLS per source identity and destination workload: no TLS handshake per \
         connection) while stunnel makes one TLS handshake per connection; for the same reason \
         the mesh's 8 iperf3 streams share one TLS connection, stunnel's use 8{}. On a small \
         shared machine figures can vary between runs (see the raw values).\n",
        if zt {
            " (ztunnel pools its HBONE connections too, up to 100 streams on one)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Resources during each run (median over repetitions). Agents: CPU seconds of both \
         nodes' `mesh-agent` processes (utime+stime from `/proc/<pid>/stat`, pids from the \
         nodes' agent cgroup `cgroup.procs`), and the larger of the two agents' peak RSS \
         (`VmHWM` of `/proc/<pid>/status`, reset through `clear_refs` before each run). \
         Same for the two stunnel4 processes{}.\n",
        if zt {
            " and the two ztunnel processes (pids of the processes the benchmark started)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "| test | mesh: agents CPU s | mesh: agent peak RSS MiB | stunnel: CPU s | \
         stunnel: peak RSS MiB | mesh agents CPU / stunnel CPU |{} direct: agents CPU s |",
        if zt {
            " ztunnel: CPU s | ztunnel: peak RSS MiB | mesh agents CPU / ztunnel CPU |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|{}",
        if zt { "---:|---:|---:|" } else { "" }
    );
    let um = |map: &BTreeMap<(Test, PathKind), Vec<Usage>>, t: Test, p: PathKind| {
        let v = map.get(&(t, p)).map_or(&[][..], |v| v);
        (
            median(&v.iter().map(|u| u.cpu_s).collect::<Vec<_>>()),
            median(&v.iter().map(|u| u.peak_rss_mib).collect::<Vec<_>>()),
        )
    };
    for t in TESTS {
        let (mc, mr) = um(&res.agents, t, PathKind::Mesh);
        let (sc, sr) = um(&res.stunnel, t, PathKind::Peer);
        let (zc, zr) = um(&res.ztunnel, t, PathKind::Ztunnel);
        let (dc, _) = um(&res.agents, t, PathKind::Direct);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |{} {} |",
            t.label(),
            fmt_val(mc),
            fmt_val(mr),
            fmt_val(sc),
            fmt_val(sr),
            ratio(mc, sc),
            if zt {
                format!(" {} | {} | {} |", fmt_val(zc), fmt_val(zr), ratio(mc, zc))
            } else {
                String::new()
            },
            fmt_val(dc)
        );
    }

    write_cpu_cost(&mut s, res);
    write_bpf_cost(&mut s, res.bpf.as_ref());
    write_idle_connections(&mut s, res.idle.as_ref());

    let _ = writeln!(s, "\nRaw values per repetition:\n");
    for f in FIGURES {
        for &p in &res.paths {
            let v = res.figures.get(&(f, p)).cloned().unwrap_or_default();
            let _ = writeln!(
                s,
                "- {} / {}: {}",
                f.label(),
                p.label(),
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let _ = writeln!(s, "\nMesh path check: {check}.");
    if let Some(z) = &res.ztunnel_check {
        let _ = writeln!(
            s,
            "\nztunnel path check (ztunnel's own counters, `:15020/metrics`; every run was \
             checked the same way, before and after): {z}."
        );
    }
    crate::state_scale::write_report(&mut s, res.state_scale.as_ref());
    if !res.errors.is_empty() {
        let _ = writeln!(s, "\nErrors:\n");
        for e in &res.errors {
            let _ = writeln!(s, "- {}", first_line(e));
        }
    }
    let _ = writeln!(
        s,
        "\nThe chart of these figures is `latest.png` beside this file; where the agents' time goes is \
         in `profile.md` (`mesh-bench --profile`)."
    );
    s
}

/// How the ztunnel path was set up, or the one line saying it was not measured.
fn write_ztunnel_path(s: &mut String, opts: &Opts, res: &Results) {
    let Some(bin) = &opts.ztunnel else {
        let _ = writeln!(
            s,
            "Istio's ztunnel was not measured in this run: add it with `cargo xtask bench \
             --ztunnel PATH` (a ztunnel you built; docs/performance.md, \"ztunnel side by \
             side\").\n"
        );
        return;
    };
    let threads = std::env::var("ZTUNNEL_WORKER_THREADS")
        .map_or_else(|_| "its default".to_owned(), |v| format!("`{v}`"));
    let _ = writeln!(
        s,
        "**ztunnel** = zt-client (node-a) → its own ztunnel → HBONE (mutual TLS, HTTP/2 \
         CONNECT to :15008) → zt-server's ztunnel (node-b) → the same servers. Two more pods \
         outside our mesh, one ztunnel each in the pod's netns: dedicated mode \
         (`PROXY_MODE=dedicated`, `PROXY_WORKLOAD_INFO`), a local xDS file naming both \
         workloads with protocol HBONE, its fake CA (`FAKE_CA=true`: both identities signed by \
         ztunnel's test root, trust domain `cluster.local`), iptables REDIRECT of the pod's \
         outbound TCP to 15001 and inbound to 15006 (all but 15008); worker threads: {threads}. \
         Binary `{}` (`ztunnel version`: {}); every ztunnel run checked against both \
         ztunnels' counters (mutual-TLS connections and bytes, expected peer identity).\n",
        bin.display(),
        res.ztunnel_version.as_deref().unwrap_or("?")
    );
}

/// Each proxy pair's CPU per GB moved and per new connection.
fn write_cpu_cost(s: &mut String, res: &Results) {
    let zt = res.paths.contains(&PathKind::Ztunnel);
    let _ = writeln!(s, "\n## CPU per byte and per connection\n");
    let _ = writeln!(
        s,
        "Both proxies of a path together (both agents; both stunnel4; both ztunnels), per run: \
         CPU seconds during a throughput run / (bytes iperf3's server received / 10^9), and CPU \
         µs during a new-connections run / the connections it made; median over the \
         repetitions. Lower is better.\n"
    );
    let cost = |t: Test, p: PathKind| median(res.cpu_cost.get(&(t, p)).map_or(&[][..], |v| v));
    let mut rows = vec![
        ("mesh (both agents)", PathKind::Mesh),
        ("stunnel peer (both stunnel4)", PathKind::Peer),
    ];
    if zt {
        rows.push(("ztunnel (both ztunnels)", PathKind::Ztunnel));
    }
    let _ = writeln!(
        s,
        "| proxies | CPU-s per GB, 1 stream | CPU-s per GB, 8 streams | CPU µs per new connection |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    let tests = [Test::Tput1, Test::Tput8, Test::ConnRate];
    for (label, p) in &rows {
        let cells: Vec<String> = tests.iter().map(|&t| fmt_val(cost(t, *p))).collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    let mut ratio_row = |label: &str, other: PathKind| {
        let cells: Vec<String> = tests
            .iter()
            .map(|&t| ratio(cost(t, PathKind::Mesh), cost(t, other)))
            .collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    };
    ratio_row("mesh / stunnel", PathKind::Peer);
    if zt {
        ratio_row("mesh / ztunnel", PathKind::Ztunnel);
        let _ = writeln!(
            s,
            "\n**CPU per GB, 1 stream: mesh {} s, ztunnel {} s ({}); per new connection: mesh {} \
             µs, ztunnel {} µs ({}).**",
            fmt_val(cost(Test::Tput1, PathKind::Mesh)),
            fmt_val(cost(Test::Tput1, PathKind::Ztunnel)),
            ratio(
                cost(Test::Tput1, PathKind::Mesh),
                cost(Test::Tput1, PathKind::Ztunnel)
            ),
            fmt_val(cost(Test::ConnRate, PathKind::Mesh)),
            fmt_val(cost(Test::ConnRate, PathKind::Ztunnel)),
            ratio(
                cost(Test::ConnRate, PathKind::Mesh),
                cost(Test::ConnRate, PathKind::Ztunnel)
            )
        );
    }
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn write_bpf_cost(s: &mut String, cost: Option<&BpfCost>) {
    let _ = writeln!(s, "\n## eBPF cost per captured connection\n");
    let Some(c) = cost else {
        let _ = writeln!(s, "Not measured in this run (see Errors).");
        return;
    };
    let _ = writeln!(
        s,
        "Kernel BPF run-time statistics (`kernel.bpf_stats_enabled` = 1 only during the mesh \
         path's new-connections runs, restored afterwards): `run_cnt` and `run_time_ns` of {} \
         ({} programs, both nodes' copies added up per name) from `bpftool prog show --json`, \
         read before and after each of those runs; {} connections made in them (all \
         repetitions). The time includes the kernel's own clock reads for the statistics.\n",
        c.scope.describe(),
        c.programs,
        c.connections
    );
    let _ = writeln!(
        s,
        "| program | calls | calls per connection | mean ns per call |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    let per_conn = |calls: u64| calls as f64 / c.connections.max(1) as f64;
    for name in MESH_PROGRAMS {
        let p = c.delta.get(name);
        let _ = writeln!(
            s,
            "| {name} | {} | {:.2} | {} |",
            p.run_cnt,
            per_conn(p.run_cnt),
            p.mean_ns().map_or("–".into(), |v| format!("{v:.0}"))
        );
    }
    let _ = writeln!(
        s,
        "\n**eBPF ns per captured connection: {}** (time of all four programs / {} \
         connections; connect4 ran {} times for them{}).",
        c.ns_per_connection()
            .map_or("–".into(), |v| format!("{v:.0} ns")),
        c.connections,
        c.delta.get(crate::bpf_stats::CONNECT4).run_cnt,
        if c.check_capture().is_ok() {
            ", at least once per connection as expected"
        } else {
            ", FEWER than the connections: see Errors"
        }
    );
}

fn write_idle_connections(s: &mut String, idle: Option<&IdleConnections>) {
    let _ = writeln!(s, "\n## Agent memory with idle connections\n");
    let Some(m) = idle else {
        let _ = writeln!(s, "Not measured in this run (see Errors).");
        return;
    };
    let _ = writeln!(
        s,
        "`client` (node-a) opened {} connections one after the other to a single-thread \
         (selectors) echo server in `server` (node-b), each through both agents (HBONE), echoed \
         1 byte on each (open-files limit {}), and held them; opening took {:.1} s. Agents' \
         current RSS (`VmRSS` of `/proc/<pid>/status`, pids from the agent cgroup) at start \
         (before any traffic), idle just before opening (after the tests above), with all held \
         (read {} s after the last one opened), and {} s after closing them; open file \
         descriptors from `/proc/<pid>/fd`.\n",
        m.n,
        m.client_nofile,
        m.open_s,
        SETTLE.as_secs(),
        SETTLE.as_secs()
    );
    let _ = writeln!(
        s,
        "| agent | RSS at start MiB | RSS idle MiB | RSS with {} held MiB | KiB per connection | \
         fds idle → held | RSS after closing MiB |",
        m.n
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for a in &m.agents {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} → {} | {:.1} |",
            a.node,
            a.at_start
                .map_or("–".into(), |f| format!("{:.1}", mib(f.rss_kib))),
            mib(a.idle.rss_kib),
            mib(a.held.rss_kib),
            a.per_connection_kib(m.n),
            a.idle.fds,
            a.held.fds,
            mib(a.closed.rss_kib)
        );
    }
    let Some(top) = m.largest() else {
        return;
    };
    let idle_max = m.agents.iter().map(|a| a.idle.rss_kib).max().unwrap_or(0);
    let start_max = m
        .agents
        .iter()
        .filter_map(|a| a.at_start)
        .map(|f| f.rss_kib)
        .max();
    let _ = writeln!(
        s,
        "\n**Agent RSS idle: {:.1} MiB{}** (larger agent; target ≤ {IDLE_RSS_TARGET_MIB:.0} MiB). \
         **With {} idle connections: {:.1} MiB** ({}, {:.1} KiB per connection; target ≤ \
         {HELD_RSS_TARGET_MIB:.0} MiB).",
        mib(idle_max),
        start_max.map_or(String::new(), |k| format!(" ({:.1} MiB at start)", mib(k))),
        m.n,
        mib(top.held.rss_kib),
        top.node,
        top.per_connection_kib(m.n)
    );
}
