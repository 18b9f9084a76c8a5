//! `mesh-cni install` and `mesh-cni uninstall`: parse the flags and run [`mesh_cni::installer`].

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, anyhow, bail};
use mesh_cni::{
    DEFAULT_TIMEOUT_SECONDS,
    installer::{self, InstallOptions, InstallReport, UninstallReport},
};

const USAGE: &str = "\
usage: mesh-cni install --cni-conf-dir DIR --cni-bin-dir DIR --agent-socket PATH
                        [--plugin-binary PATH] [--timeout-seconds N]
       mesh-cni uninstall --cni-conf-dir DIR --cni-bin-dir DIR
       mesh-cni            (no arguments: the CNI plugin, run by the container runtime)";

/// The binary that runs, whatever its path, even if it was replaced since it started.
const SELF_EXE: &str = "/proc/self/exe";

const INSTALL_FLAGS: [&str; 5] = [
    "cni-conf-dir",
    "cni-bin-dir",
    "agent-socket",
    "plugin-binary",
    "timeout-seconds",
];
const UNINSTALL_FLAGS: [&str; 2] = ["cni-conf-dir", "cni-bin-dir"];

pub fn install(args: impl Iterator<Item = OsString>) -> ExitCode {
    match Flags::parse(args, &INSTALL_FLAGS).and_then(|flags| install_options(&flags)) {
        Ok(options) => finish("install", installer::install(&options).map(install_summary)),
        Err(error) => usage_error(&error),
    }
}

pub fn uninstall(args: impl Iterator<Item = OsString>) -> ExitCode {
    let dirs = Flags::parse(args, &UNINSTALL_FLAGS)
        .and_then(|flags| Ok((flags.path("cni-conf-dir")?, flags.path("cni-bin-dir")?)));
    match dirs {
        Ok((conf_dir, bin_dir)) => finish(
            "uninstall",
            installer::uninstall(&conf_dir, &bin_dir).map(uninstall_summary),
        ),
        Err(error) => usage_error(&error),
    }
}

fn install_summary(report: InstallReport) -> String {
    let converted = report
        .converted_from
        .map(|conf| format!(", converted from {}", conf.display()))
        .unwrap_or_default();
    format!(
        "mesh-cni: binary {} ({}), chained into {} ({}{converted})",
        report.binary.display(),
        changed(report.binary_changed),
        report.config.display(),
        changed(report.config_changed),
    )
}

fn uninstall_summary(report: UninstallReport) -> String {
    let configs: Vec<_> = report
        .configs_changed
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let binary = if report.binary_removed {
        "removed"
    } else {
        "absent"
    };
    format!(
        "mesh-cni: removed from [{}], binary {binary}",
        configs.join(", ")
    )
}

fn install_options(flags: &Flags) -> anyhow::Result<InstallOptions> {
    let timeout_seconds = match flags.get("timeout-seconds") {
        None => DEFAULT_TIMEOUT_SECONDS,
        Some(value) => value
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow!("--timeout-seconds {value:?} is not a positive integer"))?,
    };
    Ok(InstallOptions {
        cni_conf_dir: flags.path("cni-conf-dir")?,
        cni_bin_dir: flags.path("cni-bin-dir")?,
        agent_socket: flags.path("agent-socket")?,
        plugin_binary: flags.get("plugin-binary").unwrap_or(SELF_EXE).into(),
        timeout_seconds,
    })
}

fn finish(action: &str, result: Result<String, installer::InstallError>) -> ExitCode {
    match result.with_context(|| format!("mesh-cni {action}")) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(error: &anyhow::Error) -> ExitCode {
    eprintln!("mesh-cni: {error:#}\n{USAGE}");
    ExitCode::from(2)
}

fn changed(changed: bool) -> &'static str {
    if changed { "updated" } else { "unchanged" }
}

/// `--name VALUE` or `--name=VALUE`, each at most once, names from an allowed set.
struct Flags(Vec<(&'static str, String)>);

impl Flags {
    fn parse(
        args: impl Iterator<Item = OsString>,
        allowed: &[&'static str],
    ) -> anyhow::Result<Self> {
        let mut args = args.map(|arg| {
            arg.into_string()
                .map_err(|arg| anyhow!("argument {arg:?} is not UTF-8"))
        });
        let mut flags = Vec::new();
        while let Some(arg) = args.next() {
            let arg = arg?;
            let Some(flag) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?}");
            };
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (flag, None),
            };
            let name = *allowed
                .iter()
                .find(|n| **n == name)
                .ok_or_else(|| anyhow!("unknown flag --{name}"))?;
            if flags.iter().any(|(n, _)| *n == name) {
                bail!("--{name} given twice");
            }
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .ok_or_else(|| anyhow!("--{name} needs a value"))??,
            };
            flags.push((name, value));
        }
        Ok(Self(flags))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn path(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.get(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("--{name} is required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Flags> {
        Flags::parse(
            args.iter().map(OsString::from),
            &["cni-conf-dir", "timeout-seconds"],
        )
    }

    #[test]
    fn both_flag_forms() {
        let flags = parse(&["--cni-conf-dir", "/etc/cni/net.d", "--timeout-seconds=5"]).unwrap();
        assert_eq!(flags.get("cni-conf-dir"), Some("/etc/cni/net.d"));
        assert_eq!(flags.get("timeout-seconds"), Some("5"));
        assert!(flags.path("cni-bin-dir").is_err());
    }

    #[test]
    fn bad_flags() {
        for args in [
            &["--cni-bin-dir", "/x"][..],
            &["--cni-conf-dir"],
            &["--cni-conf-dir", "a", "--cni-conf-dir", "b"],
            &["stray"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn options_need_a_positive_timeout() {
        let args = |timeout: &str| {
            let args = [
                "--cni-conf-dir=/c",
                "--cni-bin-dir=/b",
                "--agent-socket=/s",
                timeout,
            ];
            Flags::parse(args.iter().map(OsString::from), &INSTALL_FLAGS).unwrap()
        };
        let options = install_options(&args("--timeout-seconds=7")).unwrap();
        assert_eq!(options.timeout_seconds, 7);
        assert_eq!(options.plugin_binary, PathBuf::from(SELF_EXE));
        assert!(install_options(&args("--timeout-seconds=0")).is_err());
        assert!(install_options(&args("--timeout-seconds=soon")).is_err());
    }
}
