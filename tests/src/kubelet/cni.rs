//! CNI, called the way a container runtime calls it (libcni's semantics): the lexically first
//! network configuration list of the conf dir; each plugin exec'd in turn with the `CNI_*`
//! environment and its configuration on stdin (`name` and `cniVersion` from the list,
//! `prevResult` from the plugin before); DEL in reverse order with the ADD's result.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

/// How long one plugin may take. mesh-cni waits for the agent for up to its `timeoutSeconds`
/// (30 s in the shipped configuration); a plugin still running after this is killed.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The file [`write_node_conflist`] writes (the node's only network config; an installer such
/// as `mesh-cni install` chains its plugin into it).
pub const NODE_CONFLIST: &str = "10-mesh-tests.conflist";

/// Writes the node's network configuration list to `dir` ([`NODE_CONFLIST`], atomically):
/// the `bridge` plugin on the node's `cbr0` (gateway, no masquerading, hairpin for a pod that
/// reaches itself through a Service) with `host-local` IPAM over the node's pod CIDRs
/// 10.*i*.0.0/24 and fd00:*i*::/64 and default routes of both families, state in
/// `ipam_data_dir` (the kubelet's state dir is the place: host-local's default,
/// /var/lib/cni/networks, would be shared by every test cluster on the machine); then
/// `extra_plugins`, chained after it (e.g. mesh-cni).
pub fn write_node_conflist(
    dir: &Path,
    node_index: u8,
    ipam_data_dir: &Path,
    extra_plugins: &[Value],
) -> Result<PathBuf> {
    let bridge = json!({
        "type": "bridge",
        "bridge": "cbr0",
        "isGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [
                [{"subnet": format!("10.{node_index}.0.0/24")}],
                [{"subnet": format!("fd00:{node_index}::/64")}],
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            "dataDir": ipam_data_dir,
        },
    });
    let plugins: Vec<Value> = std::iter::once(bridge)
        .chain(extra_plugins.iter().cloned())
        .collect();
    let list = json!({"cniVersion": "1.0.0", "name": "mesh-tests", "plugins": plugins});
    crate::sys::mkdir_all(dir)?;
    let path = dir.join(NODE_CONFLIST);
    let text = serde_json::to_vec_pretty(&list).context("serialize the conflist")?;
    crate::sys::write_atomic(&path, &text)?;
    Ok(path)
}

/// The lexically first `*.conflist` in `conf_dir`, parsed: what libcni hands a runtime.
pub(crate) fn load_network_list(conf_dir: &Path) -> Result<Value> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .with_context(|| format!("read the CNI conf dir {}", conf_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    lists.sort();
    let path = lists
        .first()
        .ok_or_else(|| anyhow!("no network config (*.conflist) in {}", conf_dir.display()))?;
    let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let list: Value =
        serde_json::from_slice(&text).with_context(|| format!("parse {}", path.display()))?;
    plugins(&list).with_context(|| format!("network config {}", path.display()))?;
    Ok(list)
}

/// What a runtime tells the plugins about the container (the `CNI_*` variables but the
/// command).
pub(crate) struct Attachment<'a> {
    pub bin_dir: &'a Path,
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub if_name: &'a str,
    /// `CNI_ARGS` pairs (kubelet's `K8S_POD_*`).
    pub args: Vec<(&'static str, String)>,
}

/// ADD: runs the list's plugins in order, each getting the previous one's result; returns
/// the last one's. On error nothing is undone: the caller runs [`del`] (as runtimes do).
pub(crate) async fn add(list: &Value, at: &Attachment<'_>) -> Result<Value> {
    let mut prev: Option<Value> = None;
    for plugin in plugins(list)? {
        let config = plugin_config(list, plugin, prev.as_ref())?;
        let out = exec(plugin, "ADD", &config, at).await?;
        prev = Some(serde_json::from_slice(&out).with_context(|| {
            format!(
                "plugin {} returned no JSON result: {:?}",
                plugin_type(plugin).unwrap_or("?"),
                String::from_utf8_lossy(&out)
            )
        })?);
    }
    prev.ok_or_else(|| anyhow!("the network config has no plugins"))
}

/// DEL: runs the list's plugins in reverse order, each with the ADD's result as `prevResult`
/// (none if the ADD failed). Every plugin runs even if one fails; the first error is returned.
pub(crate) async fn del(list: &Value, at: &Attachment<'_>, result: Option<&Value>) -> Result<()> {
    let mut first_error = None;
    for plugin in plugins(list)?.iter().rev() {
        let outcome = match plugin_config(list, plugin, result) {
            Ok(config) => exec(plugin, "DEL", &config, at).await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The pod's addresses in an ADD result (`ips[].address`, CIDR notation), IPv4 first.
pub(crate) fn result_ips(result: &Value) -> Result<Vec<IpAddr>> {
    let ips = result["ips"]
        .as_array()
        .ok_or_else(|| anyhow!("the CNI result has no ips: {result}"))?;
    let mut out = ips
        .iter()
        .map(|ip| {
            let cidr = ip["address"]
                .as_str()
                .ok_or_else(|| anyhow!("CNI result ip without address: {ip}"))?;
            let addr = cidr.split_once('/').map_or(cidr, |(a, _)| a);
            addr.parse::<IpAddr>()
                .with_context(|| format!("CNI result address {cidr:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|ip| ip.is_ipv6());
    Ok(out)
}

fn plugins(list: &Value) -> Result<&Vec<Value>> {
    let plugins = list["plugins"]
        .as_array()
        .ok_or_else(|| anyhow!("no `plugins` list"))?;
    for p in plugins {
        plugin_type(p)?;
    }
    Ok(plugins)
}

/// A plugin's `type`: the name of its binary in the bin dir (so no path).
fn plugin_type(plugin: &Value) -> Result<&str> {
    match plugin["type"].as_str() {
        Some(t) if !t.is_empty() && !t.contains('/') => Ok(t),
        _ => bail!("plugin without a valid `type`: {plugin}"),
    }
}

/// A plugin's stdin: its entry of the list plus the list's `name` and `cniVersion` and, from
/// the second plugin on (and for DEL), `prevResult`.
fn plugin_config(list: &Value, plugin: &Value, prev: Option<&Value>) -> Result<Value> {
    let mut config = plugin.clone();
    let obj = config
        .as_object_mut()
        .ok_or_else(|| anyhow!("plugin entry is not an object: {plugin}"))?;
    obj.insert("name".into(), list["name"].clone());
    obj.insert("cniVersion".into(), list["cniVersion"].clone());
    if let Some(prev) = prev {
        obj.insert("prevResult".into(), prev.clone());
    }
    Ok(config)
}

/// Execs one plugin, returns its stdout; fails with the CNI error it printed (`code`, `msg`,
/// `details`) or its stderr when it exits non-zero.
async fn exec(
    plugin: &Value,
    command: &str,
    config: &Value,
    at: &Attachment<'_>,
) -> Result<Vec<u8>> {
    let kind = plugin_type(plugin)?;
    let binary = at.bin_dir.join(kind);
    let args = std::iter::once(("IgnoreUnknown", "1".to_owned()))
        .chain(at.args.iter().cloned())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";");
    let mut cmd = Command::new(&binary);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", at.container_id)
        .env("CNI_NETNS", at.netns)
        .env("CNI_IFNAME", at.if_name)
        .env("CNI_PATH", at.bin_dir)
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("CNI {command} by plugin {kind}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{what}: cannot run {}", binary.display()))?;
    let stdin = serde_json::to_vec(config).context("serialize the plugin config")?;
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(&stdin)
            .await
            .with_context(|| format!("{what}: write its config"))?;
    }
    let out = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{what}: no answer within {PLUGIN_TIMEOUT:?}, killed"))?
        .with_context(|| format!("{what}: wait for it"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            plugin_error(&out.stdout, &out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The error a failed plugin printed: CNI's `{"code", "msg", "details"}` on stdout, else its
/// stderr.
fn plugin_error(stdout: &[u8], stderr: &[u8]) -> String {
    match serde_json::from_slice::<Value>(stdout) {
        Ok(e) if e.get("msg").is_some() => {
            let details = e["details"].as_str().filter(|d| !d.is_empty());
            format!(
                "code {}: {}{}",
                e["code"],
                e["msg"].as_str().unwrap_or_default(),
                details.map(|d| format!(": {d}")).unwrap_or_default()
            )
        }
        _ => String::from_utf8_lossy(stderr).trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_config_injects_name_version_and_prev_result() {
        let list =
            json!({"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "a", "x": 1}]});
        let prev = json!({"ips": []});
        let c = plugin_config(&list, &list["plugins"][0], Some(&prev)).unwrap();
        assert_eq!(
            c,
            json!({"type": "a", "x": 1, "name": "net", "cniVersion": "1.0.0", "prevResult": {"ips": []}})
        );
        let first = plugin_config(&list, &list["plugins"][0], None).unwrap();
        assert!(first.get("prevResult").is_none());
    }

    #[test]
    fn result_ips_puts_ipv4_first() {
        let r = json!({"ips": [{"address": "fd00:1::5/64"}, {"address": "10.1.0.5/24"}]});
        let ips = result_ips(&r).unwrap();
        assert_eq!(
            ips,
            [
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00:1::5".parse().unwrap()
            ]
        );
        assert!(result_ips(&json!({"ips": [{"address": "x/1"}]})).is_err());
    }

    #[test]
    fn plugin_error_prefers_the_cni_error() {
        let e = plugin_error(
            br#"{"code": 11, "msg": "try again", "details": "no agent"}"#,
            b"x",
        );
        assert_eq!(e, "code 11: try again: no agent");
        assert_eq!(plugin_error(b"", b" boom \n"), "boom");
    }

    #[test]
    fn plugin_types_are_file_names() {
        assert!(plugin_type(&json!({"type": "../bin/sh"})).is_err());
        assert!(plugin_type(&json!({})).is_err());
        assert_eq!(plugin_type(&json!({"type": "bridge"})).unwrap(), "bridge");
    }
}
