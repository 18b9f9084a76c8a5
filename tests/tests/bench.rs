//! `mesh-bench --quick` works end to end: every figure of every path is measured and the report
//! and the chart are written. Speed is the benchmark's business, not CI's: no thresholds here.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

/// `--quick` takes about 100 s on the 2-CPU development machine.
const TIMEOUT: Duration = Duration::from_secs(600);
const PATH_COLUMNS: usize = 3;

#[test]
fn quick_benchmark_measures_every_path_and_writes_its_report_and_chart() -> Result<()> {
    let out = OutDir::new()?;
    let started = Instant::now();
    let run = mesh_tests::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
            .arg("--quick")
            .arg(format!("--out={}", out.0.display())),
        TIMEOUT,
    )?;
    eprintln!("mesh-bench --quick took {:.0?}", started.elapsed());
    ensure!(
        run.status.success(),
        "mesh-bench --quick failed ({}): {}",
        run.status,
        run.stderr_str()
    );
    let report = fs::read_to_string(out.0.join("latest.md")).context("latest.md")?;
    ensure!(
        !report.contains("\nErrors:"),
        "the report lists errors:\n{report}"
    );
    for figure in [
        "throughput 1 stream",
        "throughput 8 streams",
        "RR 1 KiB latency p50",
        "RR 1 KiB latency p99",
        "new connections/s",
    ] {
        let row = report
            .lines()
            .find(|l| l.starts_with(&format!("| {figure}")))
            .with_context(|| format!("no row for {figure} in:\n{report}"))?;
        let measured = row
            .split('|')
            .skip(2)
            .take(PATH_COLUMNS)
            .filter(|cell| cell.trim().parse::<f64>().is_ok_and(|v| v > 0.0))
            .count();
        ensure!(
            measured == PATH_COLUMNS,
            "direct, mesh and stunnel are not all measured: {row}"
        );
    }
    // The same-node table: direct and the short-circuited mesh path, both measured.
    let same_node = report
        .split("| figure | direct same-node")
        .nth(1)
        .with_context(|| format!("no same-node table in:\n{report}"))?;
    for figure in [
        "throughput 1 stream",
        "RR 1 KiB latency p50",
        "new connections/s",
    ] {
        let row = same_node
            .lines()
            .find(|l| l.starts_with(&format!("| {figure}")))
            .with_context(|| format!("no same-node row for {figure}"))?;
        let measured = row
            .split('|')
            .skip(2)
            .take(2)
            .filter(|cell| cell.trim().parse::<f64>().is_ok_and(|v| v > 0.0))
            .count();
        ensure!(measured == 2, "same-node paths not both measured: {row}");
    }
    ensure!(
        report.contains("eBPF ns per captured connection:"),
        "no eBPF cost in:\n{report}"
    );
    ensure!(
        report.contains("With 10000 idle connections:"),
        "no idle-connection memory in:\n{report}"
    );
    check_state_size(&report)?;
    let chart = fs::read(out.0.join("latest.png")).context("latest.png")?;
    ensure!(
        chart.starts_with(b"\x89PNG\r\n\x1a\n"),
        "latest.png is not a PNG"
    );
    Ok(())
}

/// The "State size" section: the mesh figures with the small and the large state, and each
/// agent's reload of one change at the large state, all measured.
fn check_state_size(report: &str) -> Result<()> {
    let section = report
        .split_once("\n## State size\n")
        .map(|(_, rest)| rest)
        .with_context(|| format!("no State size section in:\n{report}"))?;
    let row = |prefix: &str| -> Result<Vec<&str>> {
        let line = section
            .lines()
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("no row `{prefix}` in the State size section:\n{section}"))?;
        Ok(line.split('|').map(str::trim).collect())
    };
    let positive = |cell: &str| cell.parse::<f64>().is_ok_and(|v| v > 0.0);
    for figure in [
        "new connections/s",
        "RR 1 KiB latency p50",
        "RR 1 KiB latency p99",
    ] {
        // "", label, small, large, ratio, ""
        let cells = row(&format!("| state size: {figure}"))?;
        ensure!(
            cells.len() >= 5 && positive(cells[2]) && positive(cells[3]) && cells[4].ends_with('×'),
            "small and large state are not both measured: {cells:?}"
        );
    }
    for node in ["node-a", "node-b"] {
        // "", agent, change, n, write → loaded, write → opened, opened → loaded, CPU, peak RSS, RSS
        let cells = row(&format!("| {node} | one more workload"))?;
        ensure!(
            cells.len() >= 10
                && positive(cells[3])
                && positive(cells[4])
                && positive(cells[7])
                && positive(cells[8])
                && cells[9].contains('→'),
            "{node}'s reload of one change is not measured: {cells:?}"
        );
    }
    ensure!(
        section.contains("**Agent RSS, small → large state:**")
            && section.contains("**One change at the large state:**"),
        "no state-size summary in:\n{section}"
    );
    Ok(())
}

/// A results directory of this test's own, removed afterwards.
struct OutDir(PathBuf);

impl OutDir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("mesh-bench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
