//! The soak's tooling works end to end, at a small size: `mesh-bench --soak` with 200 held
//! connections and 100 new ones per second for 5 s, certificates of 4 s (renewed during the
//! run) and a policy reload every 2 s, passes and writes its report. The full soak
//! (`cargo xtask soak`) is a benchmark, not a test: no figures are checked here.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

/// About 25 s on the 2-CPU development machine.
const TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn small_soak_passes_and_writes_its_report() -> Result<()> {
    let out = std::env::temp_dir().join(format!("mesh-soak-test-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(out.clone());
    let load_bin = PathBuf::from(env!("CARGO_BIN_EXE_mesh-load"));
    let started = Instant::now();
    let run = mesh_tests::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_mesh-bench")).args([
            "--soak".to_string(),
            "--held=200".into(),
            "--rate=100".into(),
            "--seconds=5".into(),
            "--reload-every=2".into(),
            "--lifetime=4s".into(),
            format!("--load-bin={}", load_bin.display()),
            format!("--out={}", out.display()),
        ]),
        TIMEOUT,
    )?;
    eprintln!("mesh-bench --soak took {:.0?}", started.elapsed());
    let report = fs::read_to_string(out.join("soak.md"))
        .with_context(|| format!("no soak.md; {}", run.stderr_str()))?;
    ensure!(
        run.status.success(),
        "mesh-bench --soak failed ({}):\n{report}\n{}",
        run.status,
        run.stderr_str()
    );
    ensure!(
        report.contains("**Verdict: PASS**"),
        "not a pass:\n{report}"
    );
    for row in [
        "| held connections | 200 of 200 opened",
        "failed in total: **0** |",
        "**0 failed**",
        "| certificate renewals during the soak |",
        "| policy reloads during the churn |",
        "| descriptors back to the baseline",
        "| node-a |",
        "| node-b |",
    ] {
        ensure!(report.contains(row), "no `{row}` in:\n{report}");
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
