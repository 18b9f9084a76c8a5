//! Test infrastructure built from the Go module proxy: a real Kubernetes control plane, etcd,
//! the CNI reference plugins and istiod for the harness. Never part of the product.
//!
//! Each tool set is built once into `~/.cache/mesh/go-tools/<name>-<version>/bin` (outside the
//! work tree, so clean checkouts and later runs reuse it), and its binaries are linked into
//! `~/.cache/mesh/go-tools/bin`, where the harness looks (`MESH_GO_TOOLS_BIN`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cmd, command};

/// One Go module whose main packages are built, pinned by version.
struct GoToolSet {
    /// Directory name under the cache: `<name>-<version>`.
    name: &'static str,
    module: &'static str,
    version: &'static str,
    /// (main package, binary name)
    binaries: &'static [(&'static str, &'static str)],
    /// Replace the module's `./staging/...` replacements by these versions of the staging
    /// modules (k8s.io/kubernetes is not meant to be required; its staging modules are
    /// published as k8s.io/* v0.x).
    staging_version: Option<&'static str>,
    /// Linker flags that stamp the version into the binaries.
    ldflags: &'static str,
}

const KUBERNETES: GoToolSet = GoToolSet {
    name: "kubernetes",
    module: "k8s.io/kubernetes",
    version: "v1.36.3",
    binaries: &[
        ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
        (
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-controller-manager",
        ),
        ("k8s.io/kubernetes/cmd/kube-scheduler", "kube-scheduler"),
        ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
    ],
    staging_version: Some("v0.36.3"),
    ldflags: "-X k8s.io/component-base/version.gitVersion=v1.36.3 \
              -X k8s.io/component-base/version.gitMajor=1 \
              -X k8s.io/component-base/version.gitMinor=36 \
              -X k8s.io/component-base/version.gitTreeState=clean \
              -X k8s.io/client-go/pkg/version.gitVersion=v1.36.3 \
              -X k8s.io/client-go/pkg/version.gitMajor=1 \
              -X k8s.io/client-go/pkg/version.gitMinor=36",
};

/// The etcd Kubernetes v1.36.3 is built against.
const ETCD: GoToolSet = GoToolSet {
    name: "etcd",
    module: "go.etcd.io/etcd/server/v3",
    version: "v3.6.8",
    binaries: &[("go.etcd.io/etcd/server/v3", "etcd")],
    staging_version: None,
    ldflags: "",
};

const CNI_PLUGINS: GoToolSet = GoToolSet {
    name: "cni-plugins",
    module: "github.com/containernetworking/plugins",
    version: "v1.9.1",
    binaries: &[
        (
            "github.com/containernetworking/plugins/plugins/main/bridge",
            "bridge",
        ),
        (
            "github.com/containernetworking/plugins/plugins/main/ptp",
            "ptp",
        ),
        (
            "github.com/containernetworking/plugins/plugins/main/loopback",
            "loopback",
        ),
        (
            "github.com/containernetworking/plugins/plugins/ipam/host-local",
            "host-local",
        ),
        (
            "github.com/containernetworking/plugins/plugins/meta/portmap",
            "portmap",
        ),
    ],
    staging_version: None,
    ldflags: "",
};

/// istiod, whose CA the agents can use instead of the mesh's own (tests/tests/kube_ca.rs).
/// istio.io/istio has no releases as a Go module; this is the newest commit the proxy serves.
/// A cold build takes about 15 minutes on 2 cores.
const ISTIOD: GoToolSet = GoToolSet {
    name: "istiod",
    module: "istio.io/istio",
    version: "v0.0.0-20260827124520-eed52ebb66ad",
    binaries: &[(
        "istio.io/istio/pilot/cmd/pilot-discovery",
        "pilot-discovery",
    )],
    staging_version: None,
    ldflags: "",
};

const TOOL_SETS: &[GoToolSet] = &[KUBERNETES, ETCD, CNI_PLUGINS, ISTIOD];

/// `~/.cache/mesh/go-tools` (or under `$XDG_CACHE_HOME`).
fn cache_root() -> Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("mesh/go-tools"))
}

/// Where the harness finds every tool (exported as `MESH_GO_TOOLS_BIN`).
pub fn bin_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join("bin"))
}

/// Builds what is missing or was built from another recipe, and links every binary into
/// [`bin_dir`].
pub fn setup() -> Result<()> {
    let root = cache_root()?;
    let links = root.join("bin");
    fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
    for set in TOOL_SETS {
        let dir = root.join(format!("{}-{}", set.name, set.version));
        let recipe = set.recipe();
        let stamp = dir.join("built-from");
        let built = fs::read_to_string(&stamp).is_ok_and(|s| s == recipe)
            && set
                .binaries
                .iter()
                .all(|(_, b)| dir.join("bin").join(b).exists());
        if built {
            eprintln!("go tools {} {}: built", set.name, set.version);
        } else {
            let start = Instant::now();
            set.build(&dir)?;
            fs::write(&stamp, &recipe).with_context(|| format!("writing {}", stamp.display()))?;
            eprintln!(
                "go tools {} {}: built now in {}s",
                set.name,
                set.version,
                start.elapsed().as_secs()
            );
        }
        for (_, binary) in set.binaries {
            link(&dir.join("bin").join(binary), &links.join(binary))?;
        }
    }
    Ok(())
}

impl GoToolSet {
    /// Everything the build depends on; a change rebuilds.
    fn recipe(&self) -> String {
        format!(
            "{}@{} staging={:?} ldflags={} binaries={:?}\n",
            self.module, self.version, self.staging_version, self.ldflags, self.binaries
        )
    }

    fn build(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir.join("bin"))
            .with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join("go.mod"), self.go_mod()?).context("writing go.mod")?;
        fs::write(dir.join("tools.go"), self.tools_go()).context("writing tools.go")?;
        cmd(go("mod tidy").current_dir(dir))?;
        let ldflags = format!(
            "-s -w {}",
            self.ldflags
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
        for (package, binary) in self.binaries {
            let mut build = go("build -trimpath");
            build
                .arg(format!("-ldflags={ldflags}"))
                .arg("-o")
                .arg(dir.join("bin").join(binary))
                .arg(package)
                .current_dir(dir);
            cmd(&mut build)?;
        }
        Ok(())
    }

    fn go_mod(&self) -> Result<String> {
        let mut text = format!(
            "module mesh-go-tools/{}\n\ngo 1.26.0\n\nrequire {} {}\n",
            self.name, self.module, self.version
        );
        if let Some(staging) = self.staging_version {
            text.push_str("\nreplace (\n");
            for module in self.staging_modules()? {
                text.push_str(&format!("\t{module} => {module} {staging}\n"));
            }
            text.push_str(")\n");
        }
        Ok(text)
    }

    /// The modules the required module's own go.mod replaces by `./staging/...` directories.
    fn staging_modules(&self) -> Result<Vec<String>> {
        let out = go(&format!(
            "mod download -json {}@{}",
            self.module, self.version
        ))
        .output()
        .context("running go mod download")?;
        if !out.status.success() {
            bail!(
                "go mod download {}@{} failed: {}",
                self.module,
                self.version,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let info: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing go mod download -json")?;
        let go_mod = info["GoMod"]
            .as_str()
            .context("go mod download -json printed no GoMod")?;
        let text = fs::read_to_string(go_mod).with_context(|| format!("reading {go_mod}"))?;
        let modules: Vec<String> = text
            .lines()
            .filter(|l| l.contains("=> ./staging/"))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        if modules.is_empty() {
            bail!("{go_mod} replaces no staging modules");
        }
        Ok(modules)
    }

    /// Imports of the main packages, so `go mod tidy` records their dependencies.
    fn tools_go(&self) -> String {
        let imports: String = self
            .binaries
            .iter()
            .map(|(package, _)| format!("\t_ \"{package}\"\n"))
            .collect();
        format!("//go:build tools\n\npackage tools\n\nimport (\n{imports})\n")
    }
}

/// `go ARGS` with the machine's own Go (no toolchain download) and module mode.
fn go(args: &str) -> Command {
    let mut c = command(&format!("go {args}"));
    c.env("GOTOOLCHAIN", "local").env("GOFLAGS", "-mod=mod");
    c
}

/// `link` -> `target`, replacing whatever `link` was.
fn link(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}
