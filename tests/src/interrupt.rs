//! Ctrl-C and SIGTERM for the harness's long-running programs (the demo, the benchmark): one
//! thread tears the cluster down and exits 130, instead of the process dying with network
//! namespaces, cgroups and pins (and on Kubernetes the pods' sandboxes) left behind.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;

use anyhow::{Result, bail};
use nix::sys::signal::{SigSet, Signal};

use crate::Cluster;
use crate::kube::KubeMesh;

/// What a signal tears down: a [`Cluster`], or a [`KubeMesh`] with its kubelets and control
/// plane.
pub trait Teardown: Send + Sync {
    /// Removes everything, as dropping it would; the process ends right after.
    fn teardown(&self);
}

impl Teardown for Cluster {
    fn teardown(&self) {
        Cluster::teardown(self);
    }
}

impl Teardown for KubeMesh {
    fn teardown(&self) {
        KubeMesh::teardown(self);
    }
}

/// The cluster, for the signal thread (weak: the program owns it, and tears it down by dropping
/// it).
static CLUSTER: Mutex<Option<Weak<dyn Teardown>>> = Mutex::new(None);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Held by whoever is about to end the process: the signal thread while it tears down (then it
/// exits), main before it returns. So main cannot end the process in the middle of the signal
/// thread's teardown.
static EXIT: Mutex<()> = Mutex::new(());

/// Runs `body` with SIGINT and SIGTERM turned into a teardown of the cluster given to
/// [`watch`]; returns the process's exit code, reporting an error as `program: error`.
pub fn run_main(program: &'static str, body: impl FnOnce() -> Result<()>) -> ExitCode {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("{program}: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    thread::spawn(move || {
        while let Ok(sig) = signals.wait() {
            let _exiting = lock(&EXIT);
            INTERRUPTED.store(true, Ordering::SeqCst);
            // None before the cluster exists or once main is dropping it: then main sees
            // INTERRUPTED, or is tearing down already.
            let cluster = lock(&CLUSTER).as_ref().and_then(Weak::upgrade);
            if let Some(cluster) = cluster {
                eprintln!("\n{program}: {sig}: tearing the cluster down");
                cluster.teardown();
                std::process::exit(130);
            }
        }
    });
    let result = body();
    let _exiting = lock(&EXIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes a signal tear `cluster` down from now on.
pub fn watch<T: Teardown + 'static>(cluster: &Arc<T>) {
    let cluster: Weak<T> = Arc::downgrade(cluster);
    *lock(&CLUSTER) = Some(cluster);
}

/// Stops watching: the program is about to drop (tear down) the cluster itself.
pub fn forget() {
    *lock(&CLUSTER) = None;
}

/// Fails once a signal has arrived, so that a long run stops between steps.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
