//! `mesh-bench --profile`: where the agents' time goes on the cross-node path.
//!
//! Each test runs once on the mesh path under a system-wide `perf record`; the agents' samples
//! (selected by pid) are grouped by symbol into the categories docs/performance.md talks about:
//! crypto, copies, the kernel's network stack, syscalls and scheduling, HTTP/2, TLS records,
//! the async runtime and the allocator.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Samples per second and CPU: enough for a stable split over a few seconds of load.
const FREQUENCY: &str = "999";

/// What one test's profile says.
pub struct Profile {
    pub test: String,
    /// Share of the machine's samples per command (process name), percent.
    pub by_command: Vec<(f64, String)>,
    /// Share of the agents' own samples per category, percent, largest first.
    pub by_category: Vec<(f64, &'static str)>,
    /// The agents' hottest symbols, percent of the agents' samples.
    pub top_symbols: Vec<(f64, String)>,
}

/// Runs `during` under `perf record -a`, then summarises the samples of `agent_pids`.
pub fn record<T>(
    test: &str,
    data: &Path,
    agent_pids: &[u32],
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, Profile)> {
    let mut perf = Command::new("perf");
    perf.args(["record", "-a", "-F", FREQUENCY, "-o"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    mesh_tests::sys::with_empty_signal_mask(&mut perf);
    let mut perf = perf
        .spawn()
        .context("perf record (is linux-perf installed?)")?;
    let outcome = wait_for_file(data, Duration::from_secs(10)).and_then(|()| during());
    // SIGINT makes perf record flush and finish its file.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let finished =
        mesh_tests::sys::poll(Duration::from_secs(60), Duration::from_millis(100), || {
            matches!(perf.try_wait(), Ok(Some(_)))
        });
    if !finished {
        let _ = perf.kill();
        let _ = perf.wait();
        bail!("perf record did not finish within 60 s of SIGINT");
    }
    let value = outcome?;
    let by_command = parse_report(&perf_report(
        data,
        &["--sort", "comm", "--percent-limit", "1"],
    )?);
    let pids = agent_pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let symbols = parse_report(&perf_report(
        data,
        &["--pid", &pids, "--percentage", "relative", "--sort", "sym"],
    )?);
    let mut by_category: Vec<(f64, &'static str)> = Vec::new();
    for (share, symbol) in &symbols {
        let cat = category(symbol);
        match by_category.iter_mut().find(|(_, c)| *c == cat) {
            Some(entry) => entry.0 += share,
            None => by_category.push((*share, cat)),
        }
    }
    by_category.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top_symbols = symbols.into_iter().take(25).collect();
    Ok((
        value,
        Profile {
            test: test.to_owned(),
            by_command,
            by_category,
            top_symbols,
        },
    ))
}

fn wait_for_file(path: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > timeout {
            bail!("perf record did not start writing {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // perf writes its header before it has opened every CPU's buffer.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

fn perf_report(data: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "-g", "none", "-i"])
        .arg(data)
        .args(args)
        .output()
        .context("perf report")?;
    if !out.status.success() {
        bail!("perf report: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lines of `perf report --stdio` such as `  12.34%  iperf3` or `   3.10%  [k] copy_user_generic`.
fn parse_report(text: &str) -> Vec<(f64, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let (share, rest) = l.trim().split_once('%')?;
            let share: f64 = share.trim().parse().ok()?;
            let name = rest.trim();
            let name = name
                .strip_prefix("[k] ")
                .or_else(|| name.strip_prefix("[.] "))
                .unwrap_or(name);
            Some((share, name.to_owned()))
        })
        .collect()
}

/// The categories of docs/performance.md, by symbol name; the first match wins.
fn category(symbol: &str) -> &'static str {
    const RULES: &[(&str, &[&str])] = &[
        (
            "crypto (AES-GCM, ECDSA, hashing)",
            &[
                "aes",
                "gcm",
                "ghash",
                "ring_core",
                "chacha",
                "poly1305",
                "sha",
                "p256",
                "ecp_nistz",
                "x25519",
                "bn_",
            ],
        ),
        (
            "copies (user <-> kernel, memcpy)",
            &[
                "copy_user",
                "memcpy",
                "memmove",
                "copy_to_",
                "copy_from_",
                "_copy_",
                "rep_movs",
                "skb_copy",
            ],
        ),
        (
            "HTTP/2 framing (h2, hyper)",
            &["h2::", "hyper::", "hyper_util::", "http::", "bytes::"],
        ),
        ("TLS record layer (rustls)", &["rustls::", "tokio_rustls::"]),
        (
            "syscalls, wake-ups and scheduling",
            &[
                "entry_SYSCALL",
                "syscall",
                "schedule",
                "futex",
                "epoll",
                "ep_",
                "switch_",
                "wake",
                "__x64_sys",
                "do_sys",
                "pick_next",
                "update_curr",
                "enqueue",
                "dequeue",
                "__fget",
                "fdget",
                "mio::",
                "native_sched",
                "finish_task",
                "__rseq",
                "rseq",
                "restore_fpregs",
                "fpregs",
                "switch_fpu",
                "__calc_delta",
                "raw_spin",
                "_raw_spin",
            ],
        ),
        (
            "async runtime (tokio)",
            &["tokio::", "tokio_util::", "futures"],
        ),
        (
            "allocator",
            &[
                "malloc",
                "free",
                "alloc::",
                "_int_",
                "realloc",
                "kmem_cache",
                "kmalloc",
                "kfree",
                "page_frag",
                "__alloc",
                "slab",
            ],
        ),
        (
            "kernel TCP/IP stack",
            &[
                "tcp_",
                "ip_",
                "ip6",
                "ipv6",
                "skb",
                "sk_",
                "sock_",
                "inet",
                "__dev",
                "dev_",
                "netif",
                "veth",
                "nf_",
                "net_rx",
                "napi",
                "br_",
                "__netif",
                "raw6",
                "release_sock",
                "lock_sock",
                "__release_sock",
                "__sys_",
                "sockfd",
                "__tcp",
                "csum",
                "do_softirq",
                "__do_softirq",
                "handle_softirqs",
                "fib",
                "neigh",
                "__sk",
                "security_sock",
                "bpf_",
                "__cgroup_bpf",
                "lookup",
                "memcg",
                "mem_cgroup",
                "__mod_",
            ],
        ),
    ];
    RULES
        .iter()
        .find(|(_, needles)| needles.iter().any(|n| symbol.contains(n)))
        .map_or("other", |(name, _)| name)
}

/// The markdown written to bench/results/profile.md.
pub fn report(profiles: &[Profile], intro: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# mesh-bench --profile\n\n{intro}\n");
    for p in profiles {
        let _ = writeln!(s, "## {}\n", p.test);
        let _ = writeln!(s, "Whole machine, by process name (≥ 1 %):\n");
        let _ = writeln!(s, "| share | command |\n|---:|---|");
        for (share, name) in &p.by_command {
            let _ = writeln!(s, "| {share:.1} % | `{name}` |");
        }
        let _ = writeln!(s, "\nThe two agents' samples, by category:\n");
        let _ = writeln!(s, "| share of agent time | category |\n|---:|---|");
        for (share, cat) in &p.by_category {
            let _ = writeln!(s, "| {share:.1} % | {cat} |");
        }
        let _ = writeln!(s, "\nThe agents' hottest symbols:\n");
        let _ = writeln!(s, "| share | symbol | category |\n|---:|---|---|");
        for (share, sym) in &p.top_symbols {
            let _ = writeln!(
                s,
                "| {share:.2} % | `{}` | {} |",
                shorten(sym),
                category(sym)
            );
        }
        let _ = writeln!(s);
    }
    s
}

fn shorten(symbol: &str) -> String {
    const MAX: usize = 110;
    if symbol.chars().count() <= MAX {
        symbol.to_owned()
    } else {
        symbol.chars().take(MAX).chain("…".chars()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_parsed() {
        let text = "# comment\n    12.50%  [k] copy_user_generic\n     3.00%  [.] ring_core_0_17_aes_gcm_enc\n\n";
        assert_eq!(
            parse_report(text),
            vec![
                (12.5, "copy_user_generic".to_owned()),
                (3.0, "ring_core_0_17_aes_gcm_enc".to_owned())
            ]
        );
    }

    #[test]
    fn symbols_fall_into_categories() {
        assert_eq!(
            category("aes_gcm_enc_update_vaes_avx2"),
            "crypto (AES-GCM, ECDSA, hashing)"
        );
        assert_eq!(
            category("copy_user_generic"),
            "copies (user <-> kernel, memcpy)"
        );
        assert_eq!(category("tcp_sendmsg_locked"), "kernel TCP/IP stack");
        assert_eq!(
            category("h2::proto::streams::prioritize::Prioritize::pop_frame"),
            "HTTP/2 framing (h2, hyper)"
        );
        assert_eq!(category("something_else"), "other");
    }
}
