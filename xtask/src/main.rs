//! Task runner for the workspace: `cargo xtask <setup|build|test|run|demo|bench|soak|fuzz>`.
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
/// The newest cargo-fuzz; it builds with the stable toolchain (and runs with the pinned nightly).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz targets of fuzz/ (docs/fuzzing.md), in the order `cargo xtask fuzz` runs them.
const FUZZ_TARGETS: &[&str] = &[
    "hbone_front",
    "connect_authority",
    "policy_yaml",
    "cluster_file",
    "ca_request",
];
/// How long `cargo xtask fuzz` (and so `cargo xtask test`, CI) runs each target.
const FUZZ_SECONDS: u64 = 30;
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
        /// Also measure Istio's ztunnel (a binary you built, see docs/performance.md) as a
        /// peer on the same pods: one per pod, dedicated mode, iptables capture, its fake CA
        #[arg(long, value_name = "PATH", conflicts_with_all = ["profile", "kubernetes", "ca"])]
        ztunnel: Option<PathBuf>,
    },
    /// setup + build, then the soak (`mesh-bench --soak`): 10,000 held connections and 2,000 new
    /// ones per second for 60 s through the mesh, cross-node, with certificate renewals and a
    /// policy reload every 10 s; writes bench/results/soak.md, fails if a connection the policy
    /// allows failed or the agents' descriptors did not come back
    Soak {
        /// Connections held open (default 10,000)
        #[arg(long, value_name = "N")]
        held: Option<usize>,
        /// New connections per second (default 2,000)
        #[arg(long, value_name = "R")]
        rate: Option<u32>,
        /// How long the new connections go on, seconds (default 60)
        #[arg(long, value_name = "S")]
        seconds: Option<u32>,
    },
    /// Build the fuzz targets (fuzz/, cargo-fuzz on the pinned nightly) and run each on its
    /// committed corpus; fails if one crashes (docs/fuzzing.md)
    Fuzz {
        /// Only this target (default: every one)
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// How long each target runs
        #[arg(long, value_name = "N", default_value_t = FUZZ_SECONDS)]
        seconds: u64,
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
            ztunnel,
        } => bench(quick, profile, kubernetes, ca, ztunnel.as_deref()),
        Task::Soak {
            held,
            rate,
            seconds,
        } => soak(held, rate, seconds),
        Task::Fuzz { target, seconds } => fuzz(target.as_deref(), seconds),
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
    setup_cargo_fuzz()?;
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
    // Then every fuzz target for FUZZ_SECONDS on its corpus: a crash fails the task as a failed
    // test does (and runs even when a test failed, as --no-fail-fast does).
    let fuzzed = fuzz(None, FUZZ_SECONDS);
    result.and(fuzzed)
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

fn bench(
    quick: bool,
    profile: bool,
    kubernetes: bool,
    ca: bool,
    ztunnel: Option<&Path>,
) -> Result<()> {
    let start = Instant::now();
    // Absolute, since the bench runs from the workspace root; checked before the long setup.
    let ztunnel = ztunnel
        .map(|p| {
            std::fs::canonicalize(p)
                .with_context(|| format!("--ztunnel {}: no such file", p.display()))
        })
        .transpose()?;
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
    if let Some(z) = &ztunnel {
        c.arg(format!("--ztunnel={}", z.display()));
    }
    let result = cmd(&mut c);
    let secs = start.elapsed().as_secs();
    eprintln!("bench wall-clock time: {}m{:02}s", secs / 60, secs % 60);
    result
}

/// The soak: mesh-bench --soak, with its load generator (mesh-load) built beside it, since
/// `cargo run` builds only the program it runs. The report is written even when it fails.
fn soak(held: Option<usize>, rate: Option<u32>, seconds: Option<u32>) -> Result<()> {
    let start = Instant::now();
    setup()?;
    build(true)?;
    cmd(&mut cargo("build --release -p mesh-tests --bin mesh-load"))?;
    let mut c = cargo("run --release -p mesh-tests --bin mesh-bench -- --soak");
    harness_env(&mut c)?;
    if let Some(n) = held {
        c.arg(format!("--held={n}"));
    }
    if let Some(r) = rate {
        c.arg(format!("--rate={r}"));
    }
    if let Some(s) = seconds {
        c.arg(format!("--seconds={s}"));
    }
    let result = cmd(&mut c);
    let secs = start.elapsed().as_secs();
    eprintln!(
        "soak wall-clock time: {}m{:02}s (report: bench/results/soak.md)",
        secs / 60,
        secs % 60
    );
    result
}

// ---- fuzzing (docs/fuzzing.md) ----

/// Builds the fuzz targets of fuzz/ with cargo-fuzz on the pinned nightly, then runs each for
/// `seconds` on its committed corpus, which stays as it is: what a run finds goes to a scratch
/// corpus (the first directory, the one libFuzzer writes to). Prints each target's runs, speed
/// and coverage; fails if one crashed, keeping the input that did it in fuzz/artifacts/.
fn fuzz(only: Option<&str>, seconds: u64) -> Result<()> {
    let targets: Vec<&str> = match only {
        None => FUZZ_TARGETS.to_vec(),
        Some(name) if FUZZ_TARGETS.contains(&name) => vec![name],
        Some(name) => bail!(
            "no fuzz target {name} (the targets: {})",
            FUZZ_TARGETS.join(", ")
        ),
    };
    setup_nightly()?;
    setup_cargo_fuzz()?;
    let start = Instant::now();
    let mut build = cargo_fuzz("build")?;
    if let [one] = targets[..] {
        build.arg(one);
    }
    cmd(&mut build)?;
    eprintln!("fuzz targets built in {}s", start.elapsed().as_secs());
    let scratch = std::env::temp_dir().join(format!("mesh-fuzz-{}", std::process::id()));
    let mut crashed = Vec::new();
    let mut summaries = Vec::new();
    for target in targets {
        let run = fuzz_run(target, seconds, &scratch.join(target))?;
        summaries.push(run.summary(target));
        eprintln!("{}", run.summary(target));
        if let Some(crash) = run.crash {
            crashed.push(format!("{target}: {crash}"));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!("fuzzing ({seconds}s per target):");
    for summary in &summaries {
        eprintln!("  {summary}");
    }
    if !crashed.is_empty() {
        bail!("fuzz targets crashed:\n  {}", crashed.join("\n  "));
    }
    Ok(())
}

/// `cargo +NIGHTLY fuzz SUBCOMMAND` on fuzz/, built outside the work tree in a directory that
/// outlives checkouts (CI's clean clones re-use it): ~/.cache/mesh/fuzz-target.
fn cargo_fuzz(subcommand: &str) -> Result<Command> {
    let mut c = Command::new("cargo");
    c.arg(format!("+{}", ebpf_toolchain()?))
        .args(["fuzz", subcommand, "--fuzz-dir"])
        .arg(root().join("fuzz"))
        .arg("--target-dir")
        .arg(fuzz_target_dir()?)
        .current_dir(root());
    // `cargo run` gave xtask the CARGO_PKG_NAME, CARGO_MANIFEST_DIR... of its own package. Build
    // scripts that watch them (ring's does) would take them for a change and build again what a
    // shell's `cargo fuzz build` built: the fuzz build gets a shell's environment.
    const SET_BY_CARGO_RUN: &[&str] = &[
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_",
        "CARGO_CFG_",
        "CARGO_FEATURE_",
    ];
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name == "CARGO"
            || name == "OUT_DIR"
            || SET_BY_CARGO_RUN.iter().any(|p| name.starts_with(p))
        {
            c.env_remove(&key);
        }
    }
    Ok(c)
}

fn fuzz_target_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/mesh/fuzz-target"))
}

/// One target's run, from libFuzzer's output.
#[derive(Default)]
struct FuzzRun {
    runs: Option<u64>,
    execs_per_sec: Option<u64>,
    cov: Option<u64>,
    ft: Option<u64>,
    /// `corp: UNITS/SIZE`: the corpus at the end, committed and new units.
    corpus: Option<String>,
    /// Where the crashing input was kept, or why none was.
    crash: Option<String>,
}

fn fuzz_run(target: &str, seconds: u64, scratch: &Path) -> Result<FuzzRun> {
    let corpus = root().join("fuzz/corpus").join(target);
    if !corpus.is_dir() {
        bail!("{} is missing: every target has a corpus", corpus.display());
    }
    let _ = std::fs::remove_dir_all(scratch);
    let (found, artifacts) = (scratch.join("corpus"), scratch.join("artifacts"));
    for dir in [&found, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = scratch.join("libfuzzer.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let bin = fuzz_target_dir()?
        .join(format!(
            "{}-unknown-linux-gnu/release",
            std::env::consts::ARCH
        ))
        .join(target);
    let mut c = Command::new(&bin);
    c.arg(&found)
        .arg(&corpus)
        .arg(format!("-max_total_time={seconds}"))
        // An input takes milliseconds; one still running after this has hung.
        .arg("-timeout=30")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!("$ {}", show(&c));
    let status = c
        .status()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let output = String::from_utf8_lossy(&std::fs::read(&log_path)?).into_owned();
    let mut run = FuzzRun::parse(&output);
    if !status.success() {
        let lines: Vec<&str> = output.lines().collect();
        for line in &lines[lines.len().saturating_sub(80)..] {
            eprintln!("  | {line}");
        }
        let written = output
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()));
        run.crash = Some(match written {
            Some(path) => keep_fuzz_artifact(target, Path::new(path))?,
            None => format!("{status}, no input saved (log above)"),
        });
    }
    Ok(run)
}

/// Copies a crashing input to fuzz/artifacts/TARGET/ (ignored by git), where cargo-fuzz keeps
/// them; says how to run it again.
fn keep_fuzz_artifact(target: &str, path: &Path) -> Result<String> {
    let dir = root().join("fuzz/artifacts").join(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kept = dir.join(path.file_name().context("an artifact without a name")?);
    std::fs::copy(path, &kept).with_context(|| format!("copying {}", path.display()))?;
    Ok(format!(
        "crashed on {}; again: cargo +{} fuzz run --fuzz-dir fuzz --target-dir {} {target} {}",
        kept.display(),
        ebpf_toolchain()?,
        fuzz_target_dir()?.display(),
        kept.display()
    ))
}

impl FuzzRun {
    /// From `stat::...` (-print_final_stats) and the last status line
    /// (`#N DONE cov: C ft: F corp: U/S ...`).
    fn parse(output: &str) -> Self {
        let stat = |name: &str| {
            output.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .trim_start_matches(':')
                    .trim()
                    .parse()
                    .ok()
            })
        };
        let status = output
            .lines()
            .rev()
            .find(|l| l.starts_with('#') && l.contains(" cov: "))
            .unwrap_or_default();
        let field = |name: &str| {
            let mut words = status.split_whitespace();
            words.find(|w| *w == name)?;
            words.next().map(str::to_owned)
        };
        Self {
            runs: stat("stat::number_of_executed_units"),
            execs_per_sec: stat("stat::average_exec_per_sec"),
            cov: field("cov:").and_then(|v| v.parse().ok()),
            ft: field("ft:").and_then(|v| v.parse().ok()),
            corpus: field("corp:"),
            crash: None,
        }
    }

    fn summary(&self, target: &str) -> String {
        let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        format!(
            "{target}: {} runs, {} exec/s, cov {}, ft {}, corpus {}{}",
            show(self.runs),
            show(self.execs_per_sec),
            show(self.cov),
            show(self.ft),
            self.corpus.as_deref().unwrap_or("?"),
            match &self.crash {
                Some(crash) => format!(": CRASHED, {crash}"),
                None => ", no crash".to_owned(),
            }
        )
    }
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

/// cargo-fuzz builds and runs the fuzz targets (`cargo xtask fuzz`); built with the stable
/// toolchain, it runs with the pinned nightly (`cargo +NIGHTLY fuzz`).
fn setup_cargo_fuzz() -> Result<()> {
    // prints "cargo-fuzz 0.13.2"
    let found = probe(&mut command("cargo-fuzz --version"));
    let version = found.as_deref().and_then(|v| v.split_whitespace().nth(1));
    if version == Some(CARGO_FUZZ_VERSION) {
        eprintln!("cargo-fuzz {CARGO_FUZZ_VERSION}: installed");
        return Ok(());
    }
    eprintln!(
        "cargo-fuzz: found {}, need {CARGO_FUZZ_VERSION}",
        version.unwrap_or("none")
    );
    cmd(&mut command(&format!(
        "cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked --force"
    )))?;
    eprintln!("cargo-fuzz {CARGO_FUZZ_VERSION}: installed now");
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
