//! `sweep_stale` removes what a dead test process left behind. In a test binary
//! of its own: clusters built in parallel sweep too, and would race with the
//! setup below.

use std::fs;
use std::path::Path;

use anyhow::{Result, ensure};

#[test]
fn sweep_removes_leftovers_of_dead_processes() -> Result<()> {
    // A pid that surely is dead: a child we started and reaped.
    let mut child = std::process::Command::new("true").spawn()?;
    child.wait()?;
    let id = format!("mt{}x0", child.id());
    let ns = format!("{id}-fab");
    mesh_tests::sys::ip(&["netns", "add", &ns])?;
    let cg = Path::new("/sys/fs/cgroup/unified/mesh-tests")
        .join(&id)
        .join("n/pods/p");
    fs::create_dir_all(&cg)?;
    let mut sleeper = std::process::Command::new("sleep").arg("600").spawn()?;
    fs::write(cg.join("cgroup.procs"), sleeper.id().to_string())?;
    let pin = Path::new("/sys/fs/bpf").join(&id).join("n");
    fs::create_dir_all(&pin)?;

    mesh_tests::sweep_stale()?;

    ensure!(
        !Path::new("/var/run/netns").join(&ns).exists(),
        "netns left"
    );
    ensure!(
        !Path::new("/sys/fs/cgroup/unified/mesh-tests")
            .join(&id)
            .exists(),
        "cgroup left"
    );
    ensure!(!Path::new("/sys/fs/bpf").join(&id).exists(), "pin dir left");
    ensure!(
        sleeper.wait()?.code().is_none(),
        "process in a stale cgroup was not killed"
    );
    Ok(())
}
