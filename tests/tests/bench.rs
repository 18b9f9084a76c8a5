//! `mesh-bench --quick` works end to end: every figure of every path is measured and the report
//! and the chart are written. Speed is the benchmark's business, not CI's: no thresholds here.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

/// `--quick` takes about 75 s on the 2-CPU development machine.
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
    ensure!(
        report.contains("eBPF ns per captured connection:"),
        "no eBPF cost in:\n{report}"
    );
    ensure!(
        report.contains("With 10000 idle connections:"),
        "no idle-connection memory in:\n{report}"
    );
    let chart = fs::read(out.0.join("latest.png")).context("latest.png")?;
    ensure!(
        chart.starts_with(b"\x89PNG\r\n\x1a\n"),
        "latest.png is not a PNG"
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
