//! Task runner for the workspace: `cargo xtask <setup|build|test|run|demo|bench>`.
//!
//! Everything xtask says goes to stderr (like cargo), each command it runs is echoed as `$ ...`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod go_tools;

/// Debian packages used by the tests, the demo and the benchmarks (prometheus: the server the
/// graph is drawn from, and promtool; graphviz: `dot`, which renders the graph as SVG/PNG;
/// fonts-symbola: the graph's lock and link marks in PNG; fonts-dejavu-core: the font of
/// mesh-bench's PNG chart and the graph; linux-perf:
/// `bench --profile`; nftables: the test cluster's stand-in for kube-proxy, for pods outside
/// the mesh).
const DEB_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "socat",
    "python3",
    "iperf3",
    "tcpdump",
    "tshark",
    "stunnel4",
    "openssl",
    "bpftool",
    "procps",
    "prometheus",
    "graphviz",
    "fonts-symbola",
    "fonts-dejavu-core",
    "linux-perf",
    "nftables",
];
/// Later versions need a system LLVM that Debian 12 lacks (see shared/ebpf-notes.md).
const BPF_LINKER_VERSION: &str = "0.10.4";
const MIN_KERNEL: (u32, u32) = (5, 14); // SO_NETNS_COOKIE, see docs/agent.md
/// The go.mod files of the test tools say `go 1.26.0`.
const GO_MIN: &str = "1.26";
const BPFFS: &str = "/sys/fs/bpf";
const CGROUP2_CANDIDATES: &[&str] = &["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

#[derive(Parser)]
#[command(about = "Task runner for the mesh workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check the machine and install what is missing (idempotent; needs root)
    Setup,
    /// Build mesh-agent (with its eBPF programs) and mesh-cni (release unless --debug)
    Build {
        #[arg(long)]
        debug: bool,
    },
    /// setup + build + the whole test suite as CI runs it; args after `--` go to the test binaries
    Test {
        /// Passed to the test binaries, e.g. `--nocapture` or a test name filter
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// build, then exec `mesh-agent run ARGS...` (e.g. `-- --cluster FILE --node NAME`)
    Run {
        /// Arguments of `mesh-agent run`
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// setup + build, then run the mesh-demo binary: the seed story on a test cluster
    Demo {
        /// On Kubernetes: a real control plane, the mesh installed from deploy/, the tutorial
        /// applied with kubectl from deploy/examples/tutorial/
        #[arg(long)]
        kubernetes: bool,
    },
    /// setup + build, then run the mesh-bench binary: direct vs mesh vs stunnel on a two-node
    /// test cluster; writes bench/results/latest.md
    Bench {
        /// Fewer repetitions and shorter runs (under 3 minutes)
        #[arg(long)]
        quick: bool,
        /// Instead of measuring, profile each test once on the mesh path with perf;
        /// writes bench/results/profile.md
        #[arg(long)]
        profile: bool,
        /// Only the Kubernetes scale benchmark: one agent with 10,000 pods and 1,000
        /// Services in a real control plane; writes bench/results/kubernetes.md
        #[arg(long, conflicts_with_all = ["quick", "profile"])]
        kubernetes: bool,
        /// Only the CA service's benchmark: CSR latency and signatures per second;
        /// writes bench/results/ca.md
        #[arg(long, conflicts_with_all = ["profile", "kubernetes"])]
        ca: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ensure_cargo_bin_on_path();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Build { debug } => build(!debug),
        Task::Test { args } => test(&args),
        Task::Run { args } => run(&args),
        Task::Demo { kubernetes } => demo(kubernetes),
        Task::Bench {
            quick,
            profile,
            kubernetes,
            ca,
        } => bench(quick, profile, kubernetes, ca),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn setup() -> Result<()> {
    check_root()?;
    check_kernel()?;
    check_cgroup2()?;
    check_btf();
    setup_deb_packages()?;
    setup_nightly()?;
    setup_bpf_linker()?;
    setup_bpffs()?;
    check_go()?;
    go_tools::setup()
}

fn build(release: bool) -> Result<()> {
    let profile = if release { "--release " } else { "" };
    cmd(&mut cargo(&format!(
        "build {profile}-p mesh-agent -p mesh-cni"
    )))
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    build(true)?;
    let mut c = cargo("test --release --no-fail-fast --workspace --exclude mesh-ebpf");
    harness_env(&mut c)?;
    if !args.is_empty() {
        c.arg("--").args(args);
    }
    let start = Instant::now();
    let result = cmd(&mut c);
    let secs = start.elapsed().as_secs();
    eprintln!(
        "test suite wall-clock time: {}m{:02}s",
        secs / 60,
        secs % 60
    );
    result
}

fn run(args: &[String]) -> Result<()> {
    build(true)?;
    let mut c = Command::new(agent_bin());
    c.arg("run").args(args);
    eprintln!("$ {}", show(&c));
    let err = c.exec(); // returns only on failure
    Err(err).with_context(|| format!("cannot exec `{}`", show(&c)))
}

fn demo(kubernetes: bool) -> Result<()> {
    setup()?;
    build(true)?;
    if kubernetes {
        build_kubelet()?;
    }
    let mut c = cargo("run --release -p mesh-tests --bin mesh-demo --");
    harness_env(&mut c)?;
    if kubernetes {
        c.arg("--kubernetes");
    }
    cmd(&mut c)
}

fn bench(quick: bool, profile: bool, kubernetes: bool, ca: bool) -> Result<()> {
    let start = Instant::now();
    setup()?;
    build(true)?;
    if kubernetes {
        build_kubelet()?;
    }
    let mut c = cargo("run --release -p mesh-tests --bin mesh-bench --");
    harness_env(&mut c)?;
    if quick {
        c.arg("--quick");
    }
    if profile {
        c.arg("--profile");
    }
    if kubernetes {
        c.arg("--kubernetes");
    }
    if ca {
        c.arg("--ca");
    }
    let result = cmd(&mut c);
    let secs = start.elapsed().as_secs();
    eprintln!("bench wall-clock time: {}m{:02}s", secs / 60, secs % 60);
    result
}

/// The harness's kubelet, for the programs that run Kubernetes: the harness starts it from
/// next to the running program, and `cargo run` builds only the program it runs.
fn build_kubelet() -> Result<()> {
    cmd(&mut cargo(
        "build --release -p mesh-tests --bin mesh-kubelet",
    ))
}

// ---- setup items: each prints one line saying what it found or did ----

fn check_root() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    // "Uid:\treal\teffective\tsaved\tfs"
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    if euid != "0" {
        bail!(
            "setup must run as root (effective uid is {euid}): BPF and the test namespaces need it"
        );
    }
    eprintln!("root: ok");
    Ok(())
}

fn check_kernel() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let mut nums = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    if version < MIN_KERNEL {
        bail!(
            "kernel {release} is too old: need Linux >= {}.{}",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    eprintln!(
        "kernel {release}: ok (>= {}.{})",
        MIN_KERNEL.0, MIN_KERNEL.1
    );
    Ok(())
}

fn check_cgroup2() -> Result<()> {
    match CGROUP2_CANDIDATES
        .iter()
        .find(|p| fs_type(p).as_deref() == Some("cgroup2"))
    {
        Some(path) => {
            eprintln!("cgroup v2: mounted at {path}");
            Ok(())
        }
        None => bail!(
            "cgroup v2 is not mounted at {}: mount it (mount -t cgroup2 none /sys/fs/cgroup/unified)",
            CGROUP2_CANDIDATES.join(" or ")
        ),
    }
}

/// A warning, not an error: only some features need kernel BTF.
fn check_btf() {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("kernel BTF: /sys/kernel/btf/vmlinux present");
    } else {
        eprintln!(
            "kernel BTF: WARNING /sys/kernel/btf/vmlinux missing (kernel without CONFIG_DEBUG_INFO_BTF)"
        );
    }
}

fn setup_deb_packages() -> Result<()> {
    let mut missing = Vec::new();
    for pkg in DEB_PACKAGES {
        let status = probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]));
        if status.as_deref() == Some("install ok installed") {
            eprintln!("debian package {pkg}: installed");
        } else {
            eprintln!("debian package {pkg}: missing");
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // noninteractive takes debconf defaults, e.g. tshark's install-setuid = false.
    cmd(command("apt-get update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    cmd(command("apt-get install -y --no-install-recommends")
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    eprintln!("debian packages: installed {}", missing.join(" "));
    Ok(())
}

/// The nightly that builds the eBPF programs, pinned by date in `ebpf-toolchain` (read by
/// mesh-agent's build.rs too), so every machine builds them with the same compiler.
fn ebpf_toolchain() -> Result<String> {
    let path = root().join("ebpf-toolchain");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().to_owned())
}

fn setup_nightly() -> Result<()> {
    let toolchain = ebpf_toolchain()?;
    let components = probe(&mut command(&format!(
        "rustup component list --toolchain {toolchain} --installed"
    )));
    match components {
        Some(out) if out.lines().any(|l| l.trim() == "rust-src") => {
            eprintln!("{toolchain} toolchain with rust-src: installed");
            return Ok(());
        }
        Some(_) => cmd(&mut command(&format!(
            "rustup component add rust-src --toolchain {toolchain}"
        )))?,
        None => cmd(&mut command(&format!(
            "rustup toolchain install {toolchain} --profile minimal --component rust-src"
        )))?,
    }
    eprintln!("{toolchain} toolchain with rust-src: installed now");
    Ok(())
}

fn setup_bpf_linker() -> Result<()> {
    let found = probe(&mut command("bpf-linker --version"));
    // prints "bpf-linker 0.10.4"
    let version = found.as_deref().and_then(|v| v.split_whitespace().nth(1));
    if version == Some(BPF_LINKER_VERSION) {
        eprintln!("bpf-linker {BPF_LINKER_VERSION}: installed");
        return Ok(());
    }
    eprintln!(
        "bpf-linker: found {}, need {BPF_LINKER_VERSION}",
        version.unwrap_or("none")
    );
    // --force: also when cargo thinks it is installed but the binary is gone.
    cmd(&mut command(&format!(
        "cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked --force"
    )))?;
    eprintln!("bpf-linker {BPF_LINKER_VERSION}: installed now");
    Ok(())
}

/// Go builds the test infrastructure (a real Kubernetes control plane, etcd, CNI plugins).
fn check_go() -> Result<()> {
    match probe(&mut command("go version")) {
        Some(version) => {
            eprintln!("{version}: ok (test infrastructure only)");
            Ok(())
        }
        None => bail!(
            "Go is missing: the tests build kube-apiserver, etcd and the CNI plugins with it (install Go >= {GO_MIN})"
        ),
    }
}

fn setup_bpffs() -> Result<()> {
    match fs_type(BPFFS).as_deref() {
        Some("bpf") => eprintln!("bpffs: mounted at {BPFFS}"),
        Some(other) => bail!("{BPFFS} is mounted but as {other}, not bpf"),
        None => {
            cmd(&mut command(&format!("mount -t bpf bpf {BPFFS}")))?;
            eprintln!("bpffs: mounted at {BPFFS} now");
        }
    }
    Ok(())
}

// ---- helpers ----

/// Echo `$ command line`, run it, and fail with the command line and exit status.
fn cmd(c: &mut Command) -> Result<()> {
    let line = show(c);
    eprintln!("$ {line}");
    let status = c
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Run a check quietly; its trimmed stdout if it ran and succeeded.
fn probe(c: &mut Command) -> Option<String> {
    let out = c.stderr(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A command from a line of words separated by spaces (no quoting).
fn command(line: &str) -> Command {
    let mut words = line.split_whitespace();
    let mut c = Command::new(words.next().expect("empty command line"));
    c.args(words);
    c
}

/// `cargo ARGS` run from the workspace root.
fn cargo(args: &str) -> Command {
    let mut c = command(&format!("cargo {args}"));
    c.current_dir(root());
    c
}

fn show(c: &Command) -> String {
    let envs = c
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.display(), v?.display())));
    let argv = std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.display().to_string());
    envs.chain(argv).collect::<Vec<_>>().join(" ")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// What the test harness, the demo and the benchmark need to find: the agent and the
/// Go-built test tools.
fn harness_env(c: &mut Command) -> Result<()> {
    c.env("MESH_AGENT_BIN", agent_bin())
        .env("MESH_GO_TOOLS_BIN", go_tools::bin_dir()?);
    Ok(())
}

fn agent_bin() -> PathBuf {
    root().join("target/release/mesh-agent")
}

/// Type of the filesystem mounted at `path` (the topmost mount), per /proc/mounts.
fn fs_type(path: &str) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (dir == path).then(|| ty.to_string())
    })
}

/// `cargo install` puts bpf-linker in ~/.cargo/bin; rustc must find it on PATH.
fn ensure_cargo_bin_on_path() {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let (Some(home), Some(path)) = (cargo_home, std::env::var_os("PATH")) else {
        return;
    };
    let bin = home.join("bin");
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let mut new = OsString::from(bin);
    new.push(":");
    new.push(path);
    // SAFETY: called at the start of main, before any other thread exists.
    unsafe { std::env::set_var("PATH", new) };
}
