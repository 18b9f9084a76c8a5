//! CPU seconds and peak RSS of processes over one run, from /proc.

use std::fs;
use std::path::Path;

/// CPU and peak RSS of a set of processes over one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_s: f64,
    /// Largest per-process peak RSS (VmHWM, reset before the run), MiB.
    pub peak_rss_mib: f64,
}

pub fn read_pids(path: &Path) -> Vec<u32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// utime + stime of a process (all threads), clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU seconds (user + system, all threads) the process has used since it started.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(cpu_ticks(pid)? as f64 / ticks_per_second())
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The process's peak resident memory (`VmHWM`: since it started, or since [`Snapshot::take`]
/// reset it), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU ticks of some processes at the start of a run; their peak RSS is reset then.
pub struct Snapshot {
    ticks: Vec<(u32, u64)>,
}

impl Snapshot {
    pub fn take(pids: &[u32]) -> Self {
        let ticks = pids
            .iter()
            .filter_map(|&pid| {
                // "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
                let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
                Some((pid, cpu_ticks(pid)?))
            })
            .collect();
        Snapshot { ticks }
    }

    pub fn usage(&self) -> Usage {
        let hz = ticks_per_second();
        let mut u = Usage::default();
        for &(pid, t0) in &self.ticks {
            if let Some(t1) = cpu_ticks(pid) {
                u.cpu_s += t1.saturating_sub(t0) as f64 / hz;
            }
            if let Some(kib) = peak_rss_kib(pid) {
                u.peak_rss_mib = u.peak_rss_mib.max(kib as f64 / 1024.0);
            }
        }
        u
    }
}
