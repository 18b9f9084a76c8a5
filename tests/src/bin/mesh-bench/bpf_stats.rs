//! What the mesh's eBPF programs cost, from the kernel's BPF run-time statistics.
//!
//! With `kernel.bpf_stats_enabled` on, the kernel counts, for every program, how often it ran
//! (`run_cnt`) and for how long in total (`run_time_ns`); `bpftool prog show --json` reports
//! both. The counters only move while the switch is on, so it is turned on only around the
//! measured runs (it adds two clock reads to every program run) and restored afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The programs the agent loads (functions of `mesh-ebpf/src/capture.rs`).
pub const MESH_PROGRAMS: [&str; 4] = [
    "mesh_connect4",
    "mesh_connect6",
    "mesh_sock_ops",
    "mesh_sk_lookup",
];
/// The program that sees every captured outbound IPv4 connection exactly once.
pub const CONNECT4: &str = "mesh_connect4";

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The kernel keeps program names of at most BPF_OBJ_NAME_LEN - 1 bytes.
const KERNEL_NAME_MAX: usize = 15;

/// Turns `kernel.bpf_stats_enabled` on; the previous value is put back on drop.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn new() -> Result<Self> {
        let previous = fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("read {STATS_SYSCTL}"))?
            .trim()
            .to_owned();
        fs::write(STATS_SYSCTL, "1").with_context(|| format!("write 1 to {STATS_SYSCTL}"))?;
        Ok(StatsEnabled { previous })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = fs::write(STATS_SYSCTL, &self.previous) {
            eprintln!(
                "mesh-bench: could not restore {STATS_SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
}

/// Run count and total run time of one program, or of several added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl ProgStats {
    pub fn mean_ns(&self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }

    fn add(&mut self, other: ProgStats) {
        self.run_cnt += other.run_cnt;
        self.run_time_ns += other.run_time_ns;
    }
}

/// How the programs were chosen: the cluster's own, or every loaded program with a mesh name
/// (when no link pinned under the cluster's pin dirs could be found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    PinnedUnder(Vec<PathBuf>),
    AllWithMeshNames,
}

impl Scope {
    pub fn describe(&self) -> String {
        match self {
            Scope::PinnedUnder(dirs) => format!(
                "the programs of the links pinned under {}",
                dirs.iter()
                    .map(|d| format!("`{}`", d.display()))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            Scope::AllWithMeshNames => {
                "every loaded program with a mesh name (the cluster's links were not found)".into()
            }
        }
    }
}

/// The counters of the mesh's programs at one moment, by program id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    progs: BTreeMap<u64, (String, ProgStats)>,
}

impl Snapshot {
    /// Reads the counters of the mesh programs attached through links pinned under
    /// `pin_dirs` (falling back to all programs with a mesh name).
    pub fn take(pin_dirs: &[PathBuf]) -> Result<(Self, Scope)> {
        let links = bpftool(&["link", "show", "--json", "-f"])?;
        let ids = prog_ids_pinned_under(&links, pin_dirs)?;
        let progs = bpftool(&["prog", "show", "--json"])?;
        let scope = if ids.is_empty() {
            Scope::AllWithMeshNames
        } else {
            Scope::PinnedUnder(pin_dirs.to_vec())
        };
        let wanted = |id: u64| ids.is_empty() || ids.contains(&id);
        Ok((Snapshot::from_prog_json(&progs, wanted)?, scope))
    }

    /// The mesh programs of `bpftool prog show --json` whose id passes `wanted`.
    fn from_prog_json(json: &Value, wanted: impl Fn(u64) -> bool) -> Result<Self> {
        let list = json
            .as_array()
            .context("bpftool prog show --json: not a JSON array")?;
        let mut progs = BTreeMap::new();
        for p in list {
            let (Some(id), Some(name)) = (
                p.get("id").and_then(Value::as_u64),
                p.get("name").and_then(Value::as_str),
            ) else {
                continue;
            };
            let Some(mesh_name) = mesh_program_named(name) else {
                continue;
            };
            if !wanted(id) {
                continue;
            }
            // bpftool leaves both fields out while a program has not run with stats on.
            let field = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
            let stats = ProgStats {
                run_cnt: field("run_cnt"),
                run_time_ns: field("run_time_ns"),
            };
            progs.insert(id, (mesh_name.to_owned(), stats));
        }
        Ok(Snapshot { progs })
    }

    /// What ran between `self` (earlier) and `later`, per program name. Programs present in
    /// only one of the two (loaded or unloaded in between) are left out: their counters did not
    /// start from the earlier snapshot's.
    pub fn delta(&self, later: &Snapshot) -> Delta {
        let mut by_name: BTreeMap<String, ProgStats> = MESH_PROGRAMS
            .iter()
            .map(|n| ((*n).to_owned(), ProgStats::default()))
            .collect();
        for (id, (name, before)) in &self.progs {
            let Some((_, after)) = later.progs.get(id) else {
                continue;
            };
            by_name.entry(name.clone()).or_default().add(ProgStats {
                run_cnt: after.run_cnt.saturating_sub(before.run_cnt),
                run_time_ns: after.run_time_ns.saturating_sub(before.run_time_ns),
            });
        }
        Delta { by_name }
    }

    pub fn program_count(&self) -> usize {
        self.progs.len()
    }
}

/// Runs and run time per program name over some interval(s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub by_name: BTreeMap<String, ProgStats>,
}

impl Delta {
    pub fn add(&mut self, other: &Delta) {
        for (name, stats) in &other.by_name {
            self.by_name.entry(name.clone()).or_default().add(*stats);
        }
    }

    pub fn get(&self, name: &str) -> ProgStats {
        self.by_name.get(name).copied().unwrap_or_default()
    }

    /// Total of `names`.
    pub fn sum(&self, names: &[&str]) -> ProgStats {
        let mut total = ProgStats::default();
        for n in names {
            total.add(self.get(n));
        }
        total
    }
}

/// The mesh programs' cost over the measured runs.
#[derive(Debug, Clone)]
pub struct BpfCost {
    pub delta: Delta,
    /// Connections the measured runs made.
    pub connections: u64,
    pub scope: Scope,
    /// Mesh programs found (both nodes' copies).
    pub programs: usize,
}

impl BpfCost {
    /// Time of all the mesh programs divided by the connections made. connect6 is included so
    /// that the figure stays right for IPv6 clients; with IPv4 clients it does not run.
    pub fn ns_per_connection(&self) -> Option<f64> {
        (self.connections > 0)
            .then(|| self.delta.sum(&MESH_PROGRAMS).run_time_ns as f64 / self.connections as f64)
    }

    /// Fails unless connect4 ran at least once per connection made: otherwise some connections
    /// were not captured, or the wrong programs were counted.
    pub fn check_capture(&self) -> Result<()> {
        let calls = self.delta.get(CONNECT4).run_cnt;
        if calls < self.connections {
            bail!(
                "{CONNECT4} ran {calls} times for {} connections made on the mesh path",
                self.connections
            );
        }
        Ok(())
    }
}

/// Measures the mesh programs around chosen runs and adds the intervals up.
pub struct Recorder {
    pin_dirs: Vec<PathBuf>,
    total: Delta,
    connections: u64,
    scope: Option<Scope>,
    programs: usize,
    error: Option<String>,
}

impl Recorder {
    pub fn new(pin_dirs: Vec<PathBuf>) -> Self {
        Recorder {
            pin_dirs,
            total: Delta::default(),
            connections: 0,
            scope: None,
            programs: 0,
            error: None,
        }
    }

    /// Runs `run`, which makes `connections` connections, with the statistics on, and adds what
    /// the programs did meanwhile. `run`'s result is returned as it is; a failure to read the
    /// statistics is kept for [`Recorder::finish`]. A failed run is not counted.
    pub fn measure<T>(&mut self, connections: u64, run: impl FnOnce() -> Result<T>) -> Result<T> {
        let window = StatsEnabled::new().and_then(|on| Ok((on, Snapshot::take(&self.pin_dirs)?)));
        let out = run();
        match window {
            Ok((_on, (before, scope))) if out.is_ok() => match Snapshot::take(&self.pin_dirs) {
                Ok((after, _)) => {
                    self.total.add(&before.delta(&after));
                    self.connections += connections;
                    self.programs = self.programs.max(after.program_count());
                    self.scope = Some(scope);
                }
                Err(e) => self.note_error(e),
            },
            Ok(_) => {}
            Err(e) => self.note_error(e),
        }
        out
    }

    fn note_error(&mut self, e: anyhow::Error) {
        if self.error.is_none() {
            self.error = Some(format!("{e:#}"));
        }
    }

    pub fn finish(self) -> Result<BpfCost> {
        if let Some(e) = self.error {
            bail!("eBPF run-time statistics: {e}");
        }
        let Some(scope) = self.scope else {
            bail!("eBPF run-time statistics: no measured run succeeded");
        };
        Ok(BpfCost {
            delta: self.total,
            connections: self.connections,
            scope,
            programs: self.programs,
        })
    }
}

/// The mesh program name `kernel_name` stands for (the kernel may have cut it short).
fn mesh_program_named(kernel_name: &str) -> Option<&'static str> {
    MESH_PROGRAMS.into_iter().find(|full| {
        let cut = &full[..full.len().min(KERNEL_NAME_MAX)];
        kernel_name == *full || kernel_name == cut
    })
}

/// Program ids of `bpftool link show --json -f` links pinned under one of `dirs`.
fn prog_ids_pinned_under(links: &Value, dirs: &[PathBuf]) -> Result<BTreeSet<u64>> {
    let list = links
        .as_array()
        .context("bpftool link show --json: not a JSON array")?;
    Ok(list
        .iter()
        .filter(|l| {
            l.get("pinned")
                .and_then(Value::as_array)
                .is_some_and(|pins| {
                    pins.iter()
                        .filter_map(Value::as_str)
                        .any(|p| dirs.iter().any(|d| Path::new(p).starts_with(d)))
                })
        })
        .filter_map(|l| l.get("prog_id").and_then(Value::as_u64))
        .collect())
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .with_context(|| format!("run bpftool {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "bpftool {} exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // With nothing loaded, some bpftool versions print nothing at all.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool {}: output not JSON", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prog(id: u64, name: &str, cnt: Option<u64>, ns: Option<u64>) -> Value {
        let mut v = json!({"id": id, "type": "cgroup_sock_addr", "name": name, "tag": "00"});
        if let (Some(c), Some(n)) = (cnt, ns) {
            v["run_cnt"] = json!(c);
            v["run_time_ns"] = json!(n);
        }
        v
    }

    #[test]
    fn parses_mesh_programs_and_skips_others() {
        let json = json!([
            prog(10, "mesh_connect4", Some(5), Some(500)),
            prog(11, "mesh_sock_ops", None, None),
            prog(12, "other_prog", Some(9), Some(900)),
            prog(13, "mesh_sk_lookup", Some(2), Some(60)),
        ]);
        let s = Snapshot::from_prog_json(&json, |_| true).unwrap();
        assert_eq!(s.program_count(), 3);
        assert_eq!(
            s.progs[&10],
            (
                "mesh_connect4".into(),
                ProgStats {
                    run_cnt: 5,
                    run_time_ns: 500
                }
            )
        );
        // Not run yet with stats on: bpftool prints no counters.
        assert_eq!(s.progs[&11].1, ProgStats::default());
        assert!(!s.progs.contains_key(&12));
    }

    #[test]
    fn keeps_only_wanted_ids() {
        let json = json!([
            prog(10, "mesh_connect4", Some(5), Some(500)),
            prog(20, "mesh_connect4", Some(7), Some(700)),
        ]);
        let s = Snapshot::from_prog_json(&json, |id| id == 20).unwrap();
        assert_eq!(s.progs.keys().copied().collect::<Vec<_>>(), vec![20]);
    }

    #[test]
    fn recognises_mesh_program_names_only() {
        assert_eq!(mesh_program_named("mesh_sk_lookup"), Some("mesh_sk_lookup"));
        assert_eq!(mesh_program_named("mesh_connect"), None);
        assert_eq!(mesh_program_named("sk_lookup"), None);
    }

    #[test]
    fn finds_programs_of_links_pinned_under_the_cluster() {
        let links = json!([
            {"id": 1, "prog_id": 10, "pinned": ["/sys/fs/bpf/mt1x0/node-a/v1/links/mesh_connect4"]},
            {"id": 2, "prog_id": 11, "pinned": ["/sys/fs/bpf/mt1x0/node-b/v1/links/mesh_sock_ops"]},
            {"id": 3, "prog_id": 12, "pinned": ["/sys/fs/bpf/mt9x0/node-a/v1/links/mesh_connect4"]},
            {"id": 4, "prog_id": 13},
        ]);
        let dirs = [
            PathBuf::from("/sys/fs/bpf/mt1x0/node-a"),
            PathBuf::from("/sys/fs/bpf/mt1x0/node-b"),
        ];
        let ids = prog_ids_pinned_under(&links, &dirs).unwrap();
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), vec![10, 11]);
    }

    #[test]
    fn rejects_non_array_output() {
        assert!(Snapshot::from_prog_json(&json!({"error": "x"}), |_| true).is_err());
        assert!(prog_ids_pinned_under(&json!("x"), &[]).is_err());
    }

    #[test]
    fn delta_sums_both_nodes_per_name_and_skips_reloaded_programs() {
        let before = Snapshot::from_prog_json(
            &json!([
                prog(10, "mesh_connect4", Some(100), Some(10_000)),
                prog(20, "mesh_connect4", Some(50), Some(4_000)),
                prog(11, "mesh_sock_ops", None, None),
                prog(30, "mesh_sk_lookup", Some(1), Some(10)),
            ]),
            |_| true,
        )
        .unwrap();
        let after = Snapshot::from_prog_json(
            &json!([
                prog(10, "mesh_connect4", Some(300), Some(30_000)),
                prog(20, "mesh_connect4", Some(50), Some(4_000)),
                prog(11, "mesh_sock_ops", Some(800), Some(40_000)),
                // Reloaded: a new id whose counters started elsewhere.
                prog(31, "mesh_sk_lookup", Some(99), Some(9_999)),
            ]),
            |_| true,
        )
        .unwrap();
        let d = before.delta(&after);
        assert_eq!(
            d.get("mesh_connect4"),
            ProgStats {
                run_cnt: 200,
                run_time_ns: 20_000
            }
        );
        assert_eq!(
            d.get("mesh_sock_ops"),
            ProgStats {
                run_cnt: 800,
                run_time_ns: 40_000
            }
        );
        assert_eq!(d.get("mesh_sk_lookup"), ProgStats::default());
        assert_eq!(d.get("mesh_connect6"), ProgStats::default());
        assert_eq!(d.get("mesh_connect4").mean_ns(), Some(100.0));
        assert_eq!(d.get("mesh_connect6").mean_ns(), None);
    }

    #[test]
    fn cost_per_connection_and_capture_check() {
        let mut total = Delta::default();
        for _ in 0..2 {
            let mut d = Delta::default();
            d.by_name.insert(
                "mesh_connect4".into(),
                ProgStats {
                    run_cnt: 100,
                    run_time_ns: 20_000,
                },
            );
            d.by_name.insert(
                "mesh_sock_ops".into(),
                ProgStats {
                    run_cnt: 400,
                    run_time_ns: 8_000,
                },
            );
            d.by_name.insert(
                "mesh_sk_lookup".into(),
                ProgStats {
                    run_cnt: 200,
                    run_time_ns: 12_000,
                },
            );
            total.add(&d);
        }
        let cost = BpfCost {
            delta: total,
            connections: 200,
            scope: Scope::AllWithMeshNames,
            programs: 8,
        };
        assert_eq!(cost.ns_per_connection(), Some(400.0));
        assert!(cost.check_capture().is_ok());
        let short = BpfCost {
            connections: 201,
            ..cost
        };
        assert!(short.check_capture().is_err());
    }
}
