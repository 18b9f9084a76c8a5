//! Small wrappers around the system: `ip`, cgroups, network namespaces, bpffs.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Where cgroup v2 is mounted on this machine (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid hosts), read from /proc/self/mounts once: the harness's one place for it.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MOUNT.get_or_init(|| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        mounts
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (_device, dir, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
                (fs_type == "cgroup2").then(|| PathBuf::from(dir))
            })
            .min_by_key(|dir| dir.components().count())
            .unwrap_or_else(|| {
                panic!(
                    "cgroup v2 is not mounted: the test cluster needs it (cargo xtask setup checks)"
                )
            })
    })
}

/// Every cluster lives under this cgroup directory.
pub fn cgroup_root() -> PathBuf {
    cgroup2_mount().join("mesh-tests")
}
/// Where bpffs is mounted; pin directories live below it.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where `ip netns` keeps its namespace files.
pub const NETNS_DIR: &str = "/var/run/netns";

/// `ip netns add` makes /run/netns a shared mount on first use; concurrent first
/// uses can race, so this process creates namespaces one at a time.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Runs a command to completion; fails with the command line and its stderr
/// unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Result<Vec<u8>> {
    let shown = show(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `ip ARGS...` and checks its exit status.
pub fn ip(args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").args(args)).map(drop)
}

/// Runs `ip -n NETNS ARGS...` and checks its exit status.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").arg("-n").arg(netns).args(args)).map(drop)
}

/// Creates a network namespace and turns IPv6 duplicate address detection off in it, before
/// any link exists: otherwise link-local addresses stay tentative for a while and the first
/// IPv6 connection across nodes stalls ~2 s.
pub fn netns_add(name: &str) -> Result<()> {
    {
        let _serial = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
        ip(&["netns", "add", name])?;
    }
    let no_dad = ["all", "default"].map(|d| (format!("net/ipv6/conf/{d}/accept_dad"), "0"));
    sysctls_in(&netns_path(name), &no_dad).with_context(|| format!("sysctls in {name}"))
}

/// `ip netns del NAME`, unless there is no such namespace. The namespace itself lives on while
/// anything still holds it (a process in it, an open file, a copy of its mount in another
/// mount namespace); only the name is gone at once.
pub fn netns_del(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Whether the network namespace `netns` (a name) has a link called `dev`.
pub fn link_exists(netns: &str, dev: &str) -> Result<bool> {
    let status = Command::new("ip")
        .args(["-n", netns, "link", "show", "dev", dev])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("run ip link show")?;
    Ok(status.success())
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns`
/// (only that thread moves; the rest of the process stays where it is).
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns(CLONE_NEWNET)")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread inside {} panicked", netns.display()))?
    })
}

/// Writes sysctls (`("net/ipv4/ip_forward", "1")`, paths below /proc/sys) inside
/// a network namespace. /proc/sys/net follows the netns of the calling thread.
pub fn sysctls_in(netns: &Path, settings: &[(String, &str)]) -> Result<()> {
    in_netns(netns, || -> Result<()> {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            fs::write(&path, value)
                .with_context(|| format!("write {value} to {}", path.display()))?;
        }
        Ok(())
    })?
}

/// Makes `cmd` start inside the cgroup `cgroup` (a cgroup v2 directory) and
/// the network namespace `netns`, in a process group of its own (so a Ctrl-C
/// on the terminal reaches the harness, which then stops things in order).
///
/// Both files are opened now; in the child, between fork and exec, it writes
/// "0" (= itself) to `cgroup.procs` and calls `setns`. Unlike `ip netns exec`
/// this keeps the host's /sys (and so the cgroup fs) visible to the program.
/// The child also gets an empty signal mask (see [`with_empty_signal_mask`]).
pub fn place(cmd: &mut Command, cgroup: &Path, netns: &Path) -> Result<()> {
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("open {}", procs_path.display()))?;
    let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    with_empty_signal_mask(cmd);
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.process_group(0);
    Ok(())
}

/// Starts the program with no signal blocked: std passes the spawning thread's mask on, and a
/// program started from a thread that blocks SIGTERM and SIGINT (like the demo's and the
/// benchmark's, see [`crate::interrupt`]) would otherwise never see the signal that stops it.
pub fn with_empty_signal_mask(cmd: &mut Command) {
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Gives the program its own mount namespace in which `hosts` is bind-mounted over /etc/hosts,
/// as a pod has its own: names in it (the cluster's pods) resolve inside the pod only.
pub fn with_hosts_file(cmd: &mut Command, hosts: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt as _;
    let source = CString::new(hosts.as_os_str().as_bytes())?;
    let target = CString::new("/etc/hosts")?;
    let root = CString::new("/")?;
    // SAFETY: the closure only makes async-signal-safe system calls on strings made before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            let private = libc::MS_REC | libc::MS_PRIVATE;
            let none = std::ptr::null();
            if libc::mount(none, root.as_ptr(), none, private, std::ptr::null()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let bind = libc::MS_BIND;
            if libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                none,
                bind,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Mounts bpffs on /sys/fs/bpf unless something is mounted there already.
pub fn ensure_bpffs() -> Result<()> {
    let mounted = Command::new("mountpoint")
        .args(["-q", BPFFS])
        .status()
        .context("run mountpoint")?
        .success();
    if !mounted {
        run_checked(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    }
    Ok(())
}

/// Creates a directory and its parents, tolerating a concurrent removal of an
/// (empty) parent by another cluster's teardown.
pub fn mkdir_all(path: &Path) -> Result<()> {
    let mut last = None;
    for _ in 0..5 {
        match fs::create_dir_all(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("mkdir -p {}", path.display())),
        }
    }
    Err(last.unwrap()).with_context(|| format!("mkdir -p {}", path.display()))
}

/// Kills every process in the cgroup subtree at `dir` (`cgroup.kill`) and waits (up to 5 s)
/// until none is left (`populated 0` in `cgroup.events`, which counts the whole subtree).
pub fn kill_cgroup(dir: &Path) -> Result<()> {
    let kill = dir.join("cgroup.kill");
    fs::write(&kill, "1").with_context(|| format!("write 1 to {}", kill.display()))?;
    let empty = || matches!(cgroup_populated(dir), Ok(false));
    if !poll(Duration::from_secs(5), Duration::from_millis(10), empty) {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        bail!(
            "processes still in {} 5 s after cgroup.kill: {}",
            dir.display(),
            procs.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}

/// Whether any process is in the cgroup subtree at `dir` (`populated` in `cgroup.events`).
pub fn cgroup_populated(dir: &Path) -> Result<bool> {
    let events = dir.join("cgroup.events");
    let text = fs::read_to_string(&events).with_context(|| format!("read {}", events.display()))?;
    Ok(!text.lines().any(|l| l == "populated 0"))
}

/// The processes in the cgroup at `dir` itself (`cgroup.procs`, not its descendants').
pub fn cgroup_procs(dir: &Path) -> Result<Vec<i32>> {
    let procs = dir.join("cgroup.procs");
    let text = fs::read_to_string(&procs).with_context(|| format!("read {}", procs.display()))?;
    text.split_whitespace()
        .map(|pid| {
            pid.parse()
                .with_context(|| format!("pid {pid:?} in {}", procs.display()))
        })
        .collect()
}

/// Writes `contents` to `path` atomically: to a temporary file in the same directory, then
/// renamed over `path`, so a reader sees the old file or the new one, never a part. (Processes
/// that bind-mounted the old file, like pods' /etc/hosts, keep seeing the old one.)
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    ));
    fs::write(&tmp, contents).with_context(|| format!("write {}", tmp.display()))?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("rename {} to {}", tmp.display(), path.display()));
    }
    Ok(())
}

/// Replaces the contents of `path` in place (created if missing), for a file that processes
/// have bind-mounted (pods' /etc/hosts, see [`with_hosts_file`]): a rename would leave them on
/// the old inode, so the new contents go into the same one. As close to atomic as that allows:
/// one write of the new contents, padded with newlines to the old length, then a truncate, so
/// a reader between the two sees the new contents plus blank lines, never an old tail.
pub fn rewrite_in_place(path: &Path, contents: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt as _;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let old_len = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    let mut padded = contents.to_vec();
    let new_len = padded.len() as u64;
    padded.resize(padded.len().max(old_len as usize), b'\n');
    file.write_all_at(&padded, 0)
        .and_then(|()| file.set_len(new_len))
        .with_context(|| format!("rewrite {}", path.display()))
}

/// Kills every process in the cgroup subtree at `dir` and removes the subtree,
/// bottom-up. rmdir fails with EBUSY while processes are still exiting, so each
/// directory is retried for a few seconds.
pub fn kill_and_remove_cgroup(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill acts on the whole subtree; ignore failure (e.g. already empty).
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    remove_cgroup_tree(dir)
}

fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                let _ = fs::write(dir.join("cgroup.kill"), "1");
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

/// Waits until `cond` is true, polling every `every`; false if `timeout` passed.
pub fn poll(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn rewrite_in_place_keeps_the_inode() {
        let dir = std::env::temp_dir().join(format!("mesh-tests-sys-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        rewrite_in_place(&path, b"a long first version\n").unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        rewrite_in_place(&path, b"short\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"short\n");
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
        fs::remove_dir_all(&dir).unwrap();
    }
}
