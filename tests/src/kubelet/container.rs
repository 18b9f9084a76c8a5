//! Containers as this runtime runs them: a container's `command` + `args` from the host's
//! filesystem (the image is not used), with only its spec's environment, working dir `/`,
//! in a cgroup of its own below the pod's, in the pod's network namespace, with a private
//! mount namespace whose /etc/hosts is the node's hosts file; stdout and stderr to a log file.

use std::fs::File;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::Container;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::blocking;
use crate::sys;

/// The PATH a container gets unless its spec sets one (what images commonly set).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The message of a container without a `command`.
pub(crate) const NO_COMMAND: &str = "mesh-kubelet runs a container's command; set command";

/// How often the end of an adopted container (not a child of this process) is looked for.
const ADOPTED_POLL: Duration = Duration::from_millis(500);

/// What a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Process {
    /// `command[0]`, looked up in the container's PATH when it starts.
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// The process of a container spec, or why it cannot run (shown as a
/// `CreateContainerConfigError`): it needs a `command`, and only literal env values. `$(VAR)`
/// references are expanded as Kubernetes does.
pub(crate) fn process(spec: &Container) -> Result<Process, String> {
    let mut env: Vec<(String, String)> = vec![("PATH".into(), DEFAULT_PATH.into())];
    for var in spec.env.as_deref().unwrap_or_default() {
        if var.value_from.is_some() {
            return Err(format!(
                "env {}: mesh-kubelet supports literal values (value) only, not valueFrom",
                var.name
            ));
        }
        let value = expand(var.value.as_deref().unwrap_or(""), &env);
        env.retain(|(k, _)| *k != var.name);
        env.push((var.name.clone(), value));
    }
    let command = spec.command.as_deref().unwrap_or_default();
    let Some((program, command_args)) = command.split_first() else {
        return Err(NO_COMMAND.into());
    };
    let args = command_args
        .iter()
        .chain(spec.args.as_deref().unwrap_or_default())
        .map(|a| expand(a, &env))
        .collect();
    Ok(Process {
        program: expand(program, &env),
        args,
        env,
    })
}

/// Kubernetes' expansion of `$(NAME)` in commands, args and env values: replaced by NAME's
/// value when it is defined, kept as written otherwise; `$$` is a literal `$`.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')'))
            && let Some((_, value)) = env.iter().rev().find(|(k, _)| k == name)
        {
            out.push_str(value);
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Where a run of a container logs: `<state-dir>/logs/<ns>_<pod>_<uid>/<container>/<n>.log`,
/// kubelet's /var/log/pods layout.
pub(crate) fn log_path(state_dir: &Path, pod: [&str; 3], container: &str, restart: i32) -> PathBuf {
    let [namespace, name, uid] = pod;
    state_dir
        .join("logs")
        .join(format!("{namespace}_{name}_{uid}"))
        .join(container)
        .join(format!("{restart}.log"))
}

/// Where a container runs.
pub(crate) struct Placement<'a> {
    pub cgroup: &'a Path,
    pub netns: &'a Path,
    pub hosts_file: &'a Path,
    pub log: &'a Path,
}

/// Starts the process (its cgroup must exist); returns it and the program's path, looked up
/// in the container's PATH. Fails as a runtime fails to start a container (`StartError`):
/// no such program, no cgroup, ...
pub(crate) fn spawn(
    process: &Process,
    at: &Placement<'_>,
) -> Result<(tokio::process::Child, PathBuf)> {
    let path = process
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("", |(_, v)| v.as_str());
    let program = resolve(&process.program, path)?;
    if let Some(dir) = at.log.parent() {
        sys::mkdir_all(dir)?;
    }
    let log = File::create(at.log).with_context(|| format!("create {}", at.log.display()))?;
    let mut cmd = std::process::Command::new(&program);
    cmd.args(&process.args)
        .env_clear()
        .envs(process.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicate the log file")?)
        .stderr(log);
    sys::place(&mut cmd, at.cgroup, at.netns)?;
    sys::with_hosts_file(&mut cmd, at.hosts_file)?;
    let child = tokio::process::Command::from(cmd)
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    Ok((child, program))
}

/// `program` itself if it has a `/`, else the first executable file of that name in `path`.
fn resolve(program: &str, path: &str) -> Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| anyhow!("exec: {program:?}: executable file not found in $PATH"))
}

/// How a container's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
    /// It ended while no one could see how: a container adopted from an earlier kubelet.
    Unknown,
}

/// Waits until the container's main process (a child of this kubelet) exits.
pub(crate) async fn wait_child(mut child: tokio::process::Child) -> Exit {
    match child.wait().await {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Unknown,
        },
        Err(e) => {
            tracing::warn!("wait for a container process: {e}");
            Exit::Unknown
        }
    }
}

/// Waits until no process is left in an adopted container's cgroup (its processes are not
/// this kubelet's children, so there is no exit status to wait for).
pub(crate) async fn wait_cgroup_empty(cgroup: PathBuf) -> Exit {
    while matches!(sys::cgroup_populated(&cgroup), Ok(true)) {
        tokio::time::sleep(ADOPTED_POLL).await;
    }
    Exit::Unknown
}

/// Stops containers as a runtime does: SIGTERM to every process in their cgroups, up to
/// `grace` for them to exit, then SIGKILL (`cgroup.kill`) for what is left.
pub(crate) async fn stop(cgroups: Vec<PathBuf>, grace: Duration) -> Result<()> {
    for cgroup in &cgroups {
        for pid in sys::cgroup_procs(cgroup).unwrap_or_default() {
            // It may have exited since the list was read.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    let running = |cgroups: &[PathBuf]| {
        cgroups
            .iter()
            .any(|c| matches!(sys::cgroup_populated(c), Ok(true)))
    };
    while running(&cgroups) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    blocking(move || {
        for cgroup in cgroups.iter().filter(|c| c.exists()) {
            sys::kill_cgroup(cgroup)?;
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn expands_like_kubernetes() {
        let e = env(&[("A", "x"), ("B", "y")]);
        assert_eq!(expand("$(A)-$(B)", &e), "x-y");
        assert_eq!(expand("$(C) $$(A) $ $x $(A", &e), "$(C) $(A) $ $x $(A");
    }

    #[test]
    fn a_container_needs_a_command_and_literal_env() {
        let spec: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "image": "i", "args": ["--port=$(PORT)"]
        }))
        .unwrap();
        assert_eq!(process(&spec).unwrap_err(), NO_COMMAND);
        let spec: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "image": "i", "command": ["python3", "-m"], "args": ["--port=$(PORT)"],
            "env": [{"name": "PORT", "value": "80"}]
        }))
        .unwrap();
        let p = process(&spec).unwrap();
        assert_eq!(p.program, "python3");
        assert_eq!(p.args, ["-m", "--port=80"]);
        assert_eq!(p.env.last().unwrap(), &("PORT".to_owned(), "80".to_owned()));
        let spec: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "image": "i", "command": ["x"],
            "env": [{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
        }))
        .unwrap();
        assert!(process(&spec).unwrap_err().contains("valueFrom"));
    }

    #[test]
    fn resolves_programs_in_path() {
        assert_eq!(
            resolve("sh", "/nonexistent:/bin").unwrap(),
            Path::new("/bin/sh")
        );
        assert!(resolve("no-such-program-here", DEFAULT_PATH).is_err());
    }
}
