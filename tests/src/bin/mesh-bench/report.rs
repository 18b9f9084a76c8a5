//! The markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::thread;
use std::time::Duration;

use crate::usage::Usage;
use crate::{FIGURES, Figure, Opts, PATHS, PathKind, Results, TESTS, Test};

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

fn machine() -> (String, String, String) {
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

pub fn report(opts: &Opts, res: &Results, check: &str, elapsed: Duration) -> String {
    let (nproc, kernel, cpu) = machine();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| first_line(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
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

    let m = |f: Figure, p: PathKind| median(res.figures.get(&(f, p)).map_or(&[][..], |v| v));
    let _ = writeln!(
        s,
        "| figure | direct | mesh (cross-node) | stunnel peer | mesh same-node | mesh / direct | \
         stunnel / direct | mesh / stunnel |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---|---:|---:|---:|");
    for f in FIGURES {
        let (d, me, pe) = (
            m(f, PathKind::Direct),
            m(f, PathKind::Mesh),
            m(f, PathKind::Peer),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | not yet available | {} | {} | {} |",
            f.label(),
            fmt_val(d),
            fmt_val(me),
            fmt_val(pe),
            ratio(me, d),
            ratio(pe, d),
            ratio(me, pe)
        );
    }

    let _ = writeln!(
        s,
        "\nRatios are the first path's figure divided by the second's: below 1× is less \
         throughput or fewer connections/s, above 1× is more latency. For new connections, the \
         mesh reuses the pooled HBONE connection between the agents (one HTTP/2 connection over \
         mutual TLS per source identity and destination workload: no TLS handshake per \
         connection) while stunnel makes one TLS handshake per connection; for the same reason \
         the mesh's 8 iperf3 streams share one TLS connection, stunnel's use 8. On a small \
         shared machine figures can vary between runs (see the raw values).\n"
    );
    let _ = writeln!(
        s,
        "Resources during each run (median over repetitions). Agents: CPU seconds of both \
         nodes' `mesh-agent` processes (utime+stime from `/proc/<pid>/stat`, pids from the \
         nodes' agent cgroup `cgroup.procs`), and the larger of the two agents' peak RSS \
         (`VmHWM` of `/proc/<pid>/status`, reset through `clear_refs` before each run). \
         Same for the two stunnel4 processes.\n"
    );
    let _ = writeln!(
        s,
        "| test | mesh: agents CPU s | mesh: agent peak RSS MiB | stunnel: CPU s | \
         stunnel: peak RSS MiB | mesh agents CPU / stunnel CPU | direct: agents CPU s |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
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
        let (dc, _) = um(&res.agents, t, PathKind::Direct);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            t.label(),
            fmt_val(mc),
            fmt_val(mr),
            fmt_val(sc),
            fmt_val(sr),
            ratio(mc, sc),
            fmt_val(dc)
        );
    }

    let _ = writeln!(s, "\nRaw values per repetition:\n");
    for f in FIGURES {
        for p in PATHS {
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
    if !res.errors.is_empty() {
        let _ = writeln!(s, "\nErrors:\n");
        for e in &res.errors {
            let _ = writeln!(s, "- {}", first_line(e));
        }
    }
    let _ = writeln!(
        s,
        "\nNot measured yet: same-node mesh path (kernel short-circuit not available), PNG chart, \
         eBPF program run-time statistics, 10k idle connections, profiles."
    );
    s
}
