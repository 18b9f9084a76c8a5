//! Removal of what earlier, crashed test processes left behind.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::cluster::scratch_root;
use crate::sys::{self, BPFFS, NETNS_DIR};

/// The pid in a name made by this harness: `mt{pid}x{n}`, optionally followed
/// by `-...` (netns names). None for any other name.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("mt")?;
    let (pid, rest) = rest.split_once('x')?;
    let counter_end = rest.find('-').unwrap_or(rest.len());
    let counter = &rest[..counter_end];
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) {
        return None;
    }
    pid.parse().ok()
}

fn stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// Stale entries of `dir` (names owned by a pid that no longer exists).
fn stale_entries(dir: impl AsRef<Path>) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir.as_ref()) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| stale(n))
        .collect()
}

/// Removes leftovers of test processes that are gone: their cgroups (after
/// killing what runs in them), network namespaces, pin dirs and scratch dirs.
/// Everything of a live process (including this one) is left alone.
pub fn sweep_stale() -> Result<()> {
    let mut errors = Vec::new();
    let cgroups = sys::cgroup_root();
    for name in stale_entries(&cgroups) {
        if let Err(e) = sys::kill_and_remove_cgroup(&cgroups.join(&name)) {
            errors.push(format!("{e:#}"));
        }
    }
    for name in stale_entries(NETNS_DIR) {
        if let Err(e) = sys::ip(&["netns", "del", &name]) {
            errors.push(format!("{e:#}"));
        }
    }
    let scratch = scratch_root();
    for (dir, name) in stale_entries(BPFFS)
        .into_iter()
        .map(|n| (Path::new(BPFFS).join(n.clone()), n))
        .chain(
            stale_entries(&scratch)
                .into_iter()
                .map(|n| (scratch.join(&n), n)),
        )
    {
        if let Err(e) =
            fs::remove_dir_all(&dir).with_context(|| format!("rm -rf {}", dir.display()))
        {
            errors.push(format!("{name}: {e:#}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn parses_run_ids() {
        assert_eq!(owner_pid("mt123x4"), Some(123));
        assert_eq!(owner_pid("mt123x4-fab"), Some(123));
        assert_eq!(owner_pid("mt123x4-node-a-client"), Some(123));
        assert_eq!(owner_pid("mt123x"), None);
        assert_eq!(owner_pid("mtx4"), None);
        assert_eq!(owner_pid("mt12a3x4"), None);
        assert_eq!(owner_pid("mt123x4b"), None);
        assert_eq!(owner_pid("other"), None);
    }
}
