//! Chains the plugin into the node's CNI network config (`mesh-cni install`) and takes it out
//! again (`mesh-cni uninstall`).
//!
//! The runtime uses the lexically first `*.conflist`, `*.conf` or `*.json` file of its conf dir,
//! written there by the cluster's network plugin. The installer appends a `mesh-cni` entry to
//! that file's `plugins`, so that every pod sandbox the main plugin sets up then goes through
//! the agent. A single-plugin `.conf` is first converted into the equivalent `.conflist`, as the
//! runtime itself would read it. Every write is a temp file plus a rename in the same directory,
//! so the runtime never reads half a file; temp files end in `.tmp`, which the runtime ignores.
//! Both operations are idempotent: a second run changes nothing.

use std::{
    ffi::OsString,
    fs::{self, OpenOptions, Permissions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process,
};

use serde_json::{Map, Value, json};

use crate::{PLUGIN_TYPE, SUPPORTED_CNI_VERSIONS};

/// Extensions of the files a runtime reads as network configs.
const CONFIG_EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

/// Mode of a config file whose original mode is unknown.
const CONFIG_MODE: u32 = 0o644;

/// Mode of the installed plugin binary (the runtime execs it as root).
const BINARY_MODE: u32 = 0o755;

type Object = Map<String, Value>;

#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Where the runtime looks for network configs (`/etc/cni/net.d`).
    pub cni_conf_dir: PathBuf,
    /// Where the runtime looks for plugin binaries (`/opt/cni/bin`).
    pub cni_bin_dir: PathBuf,
    /// The agent's CNI socket, as seen by the runtime on the node.
    pub agent_socket: PathBuf,
    /// The plugin binary to install (the installer's own, `/proc/self/exe`, in the DaemonSet).
    pub plugin_binary: PathBuf,
    pub timeout_seconds: u64,
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    pub binary: PathBuf,
    pub binary_changed: bool,
    /// The conflist that now ends with the `mesh-cni` entry.
    pub config: PathBuf,
    pub config_changed: bool,
    /// The single-plugin config that was converted into `config`, and removed.
    pub converted_from: Option<PathBuf>,
}

/// What [`uninstall`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UninstallReport {
    /// The configs a `mesh-cni` entry was removed from.
    pub configs_changed: Vec<PathBuf>,
    pub binary_removed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The network plugin has not written its config yet; running again later may succeed.
    #[error(
        "no CNI network config (*.conflist, *.conf, *.json) in {} yet: the cluster's network \
         plugin writes one when it starts; install mesh-cni after it",
        dir.display()
    )]
    NoNetworkConfig { dir: PathBuf },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a CNI network config: {reason}", path.display())]
    InvalidConfig { path: PathBuf, reason: String },
    #[error(
        "{} has cniVersion {version:?}, which mesh-cni does not support (it supports {})",
        path.display(),
        SUPPORTED_CNI_VERSIONS.join(", ")
    )]
    UnsupportedVersion { path: PathBuf, version: String },
    #[error(
        "{} would be converted into {}, which exists with other contents: remove one of them",
        conf.display(),
        conflist.display()
    )]
    ConversionConflict { conf: PathBuf, conflist: PathBuf },
    #[error("agent socket path {} is not UTF-8", .0.display())]
    NonUtf8Socket(PathBuf),
}

/// Installs the plugin binary and chains it into the primary network config.
///
/// Nothing is written when there is no usable config. The binary is in place before the config
/// names it, so that the runtime never runs a chain whose plugin is missing.
pub fn install(options: &InstallOptions) -> Result<InstallReport, InstallError> {
    let entry = plugin_entry(&options.agent_socket, options.timeout_seconds)?;
    let primary = primary_config(&options.cni_conf_dir)?;
    let chain = plan_chain(&primary, entry)?;
    let binary = options.cni_bin_dir.join(PLUGIN_TYPE);
    let binary_changed = install_binary(&options.plugin_binary, &binary)?;
    if chain.changed {
        write_atomically(&chain.target, &to_bytes(chain.list), chain.mode)?;
    }
    if let Some(conf) = &chain.converted_from {
        remove_if_exists(conf)?;
    }
    Ok(InstallReport {
        binary,
        binary_changed,
        config: chain.target,
        config_changed: chain.changed,
        converted_from: chain.converted_from,
    })
}

/// Removes every `mesh-cni` entry from the configs in `cni_conf_dir` (leaving the rest of each
/// file, and a `.conf` that [`install`] converted, as they are), then the plugin binary.
pub fn uninstall(cni_conf_dir: &Path, cni_bin_dir: &Path) -> Result<UninstallReport, InstallError> {
    let files = match config_files(cni_conf_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        files => files.map_err(io_error("list", cni_conf_dir))?,
    };
    let mut configs_changed = Vec::new();
    for path in files {
        if unchain(&path)? {
            configs_changed.push(path);
        }
    }
    let binary_removed = remove_if_exists(&cni_bin_dir.join(PLUGIN_TYPE))?;
    Ok(UninstallReport {
        configs_changed,
        binary_removed,
    })
}

/// The edit [`install`] makes to the network config.
struct Chain {
    /// The conflist to write.
    target: PathBuf,
    list: Object,
    /// Whether `list` differs from what `target` holds now.
    changed: bool,
    mode: u32,
    converted_from: Option<PathBuf>,
}

fn plugin_entry(agent_socket: &Path, timeout_seconds: u64) -> Result<Value, InstallError> {
    let socket = agent_socket
        .to_str()
        .ok_or_else(|| InstallError::NonUtf8Socket(agent_socket.to_owned()))?;
    Ok(json!({"type": PLUGIN_TYPE, "agentSocket": socket, "timeoutSeconds": timeout_seconds}))
}

/// The config the runtime uses: the lexically first one.
fn primary_config(dir: &Path) -> Result<PathBuf, InstallError> {
    let no_config = || InstallError::NoNetworkConfig {
        dir: dir.to_owned(),
    };
    match config_files(dir) {
        Ok(files) => files.into_iter().next().ok_or_else(no_config),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(no_config()),
        Err(e) => Err(io_error("list", dir)(e)),
    }
}

/// The files of `dir` a runtime would read as network configs, in the order it ranks them.
fn config_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let is_config = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e));
        if is_config && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

fn plan_chain(primary: &Path, entry: Value) -> Result<Chain, InstallError> {
    let config = read_object(primary)?;
    let mode = mode_of(primary);
    if config.contains_key("plugins") {
        let mut list = config.clone();
        set_entry(primary, &mut list, entry)?;
        return Ok(Chain {
            target: primary.to_owned(),
            changed: list != config,
            list,
            mode,
            converted_from: None,
        });
    }
    let target = primary.with_extension("conflist");
    let mut list = conf_to_list(primary, config)?;
    set_entry(primary, &mut list, entry)?;
    let existing = read_object_if_exists(&target)?;
    // A conflist with our entry is one an earlier run converted (the network plugin has since
    // rewritten its .conf): ours to replace. Anything else is not.
    if let Some(existing) = &existing
        && *existing != list
        && !plugins(existing).is_some_and(|p| p.iter().any(is_ours))
    {
        return Err(InstallError::ConversionConflict {
            conf: primary.to_owned(),
            conflist: target,
        });
    }
    Ok(Chain {
        target,
        changed: existing.as_ref() != Some(&list),
        list,
        mode,
        converted_from: Some(primary.to_owned()),
    })
}

/// The conflist a runtime makes of a single-plugin config.
fn conf_to_list(path: &Path, conf: Object) -> Result<Object, InstallError> {
    if !conf.get("type").is_some_and(Value::is_string) {
        return Err(invalid(path, "neither \"plugins\" nor \"type\""));
    }
    let mut list = Object::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = conf.get(key) {
            list.insert(key.into(), value.clone());
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    Ok(list)
}

/// Puts `entry` in place of the first `mesh-cni` entry (dropping any other), or at the end.
fn set_entry(path: &Path, list: &mut Object, entry: Value) -> Result<(), InstallError> {
    check_version(path, list)?;
    let Some(Value::Array(plugins)) = list.get_mut("plugins") else {
        return Err(invalid(path, "\"plugins\" is not a list"));
    };
    let mut seen = false;
    plugins.retain(|p| !is_ours(p) || !std::mem::replace(&mut seen, true));
    match plugins.iter_mut().find(|p| is_ours(p)) {
        Some(ours) => *ours = entry,
        None => plugins.push(entry),
    }
    Ok(())
}

/// Refuses a config the plugin would reject for every pod.
fn check_version(path: &Path, list: &Object) -> Result<(), InstallError> {
    let version = list
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(path, "no \"cniVersion\""))?;
    if SUPPORTED_CNI_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(InstallError::UnsupportedVersion {
            path: path.to_owned(),
            version: version.to_owned(),
        })
    }
}

/// Removes the `mesh-cni` entries of one config file; tells whether there were any.
fn unchain(path: &Path) -> Result<bool, InstallError> {
    let mut config = match read_object(path) {
        Ok(config) => config,
        // Not JSON we can read, so not a file we edited.
        Err(InstallError::InvalidConfig { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let Some(Value::Array(plugins)) = config.get_mut("plugins") else {
        return Ok(false);
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(false);
    }
    write_atomically(path, &to_bytes(config), mode_of(path))?;
    Ok(true)
}

fn plugins(list: &Object) -> Option<&Vec<Value>> {
    list.get("plugins").and_then(Value::as_array)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Copies the binary unless the same one is already installed; tells whether it copied.
fn install_binary(source: &Path, target: &Path) -> Result<bool, InstallError> {
    let contents = fs::read(source).map_err(io_error("read the plugin binary", source))?;
    let installed = fs::metadata(target)
        .is_ok_and(|m| m.permissions().mode() & 0o7777 == BINARY_MODE)
        && fs::read(target).is_ok_and(|current| current == contents);
    if installed {
        return Ok(false);
    }
    write_atomically(target, &contents, BINARY_MODE)?;
    Ok(true)
}

fn read_object(path: &Path) -> Result<Object, InstallError> {
    let bytes = fs::read(path).map_err(io_error("read", path))?;
    parse_object(path, &bytes)
}

fn read_object_if_exists(path: &Path) -> Result<Option<Object>, InstallError> {
    match fs::read(path) {
        Ok(bytes) => parse_object(path, &bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path)(e)),
    }
}

fn parse_object(path: &Path, bytes: &[u8]) -> Result<Object, InstallError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(invalid(path, "not a JSON object")),
        Err(e) => Err(invalid(path, &e.to_string())),
    }
}

/// The file's permission bits, kept when it is rewritten (some clusters keep configs 0600).
fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).map_or(CONFIG_MODE, |m| m.permissions().mode() & 0o7777)
}

fn to_bytes(object: Object) -> Vec<u8> {
    // A `Value` has string keys only: serializing it cannot fail.
    let mut bytes =
        serde_json::to_vec_pretty(&Value::Object(object)).expect("JSON values always serialize");
    bytes.push(b'\n');
    bytes
}

/// Replaces `path` with `contents` through a temp file in the same directory, so that readers
/// see the old file or the new one, never a partial one (and a running binary is never
/// overwritten, which would fail with ETXTBSY).
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    let temp = temp_path(path);
    let written = write_file(&temp, contents, mode).and_then(|()| fs::rename(&temp, path));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written.map_err(io_error("write", path))
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // The umask may have cleared bits of `mode` at creation.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

/// `.NAME.PID.tmp`: hidden, and with an extension no runtime reads.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", process::id()));
    path.with_file_name(name)
}

fn remove_if_exists(path: &Path) -> Result<bool, InstallError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_owned();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

fn invalid(path: &Path, reason: &str) -> InstallError {
    InstallError::InvalidConfig {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use tempfile::TempDir;

    use super::*;

    struct Node {
        _root: TempDir,
        conf_dir: PathBuf,
        bin_dir: PathBuf,
        plugin: PathBuf,
    }

    fn node() -> Node {
        let root = tempfile::tempdir().unwrap();
        let conf_dir = root.path().join("net.d");
        let bin_dir = root.path().join("bin");
        fs::create_dir(&conf_dir).unwrap();
        fs::create_dir(&bin_dir).unwrap();
        let plugin = root.path().join("mesh-cni-build");
        fs::write(&plugin, b"\x7fELF plugin v1").unwrap();
        Node {
            _root: root,
            conf_dir,
            bin_dir,
            plugin,
        }
    }

    impl Node {
        fn options(&self, socket: &str) -> InstallOptions {
            InstallOptions {
                cni_conf_dir: self.conf_dir.clone(),
                cni_bin_dir: self.bin_dir.clone(),
                agent_socket: socket.into(),
                plugin_binary: self.plugin.clone(),
                timeout_seconds: 30,
            }
        }

        fn install(&self) -> InstallReport {
            install(&self.options("/var/run/mesh/cni.sock")).unwrap()
        }

        fn write(&self, name: &str, json: Value) -> PathBuf {
            let path = self.conf_dir.join(name);
            fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
            path
        }

        fn read(&self, name: &str) -> Value {
            serde_json::from_slice(&fs::read(self.conf_dir.join(name)).unwrap()).unwrap()
        }

        fn names(&self) -> Vec<String> {
            let mut names: Vec<_> = fs::read_dir(&self.conf_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
    }

    fn bridge() -> Value {
        json!({"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}})
    }

    fn ours(socket: &str) -> Value {
        json!({"type": "mesh-cni", "agentSocket": socket, "timeoutSeconds": 30})
    }

    fn conflist(plugins: Vec<Value>) -> Value {
        json!({"cniVersion": "1.0.0", "name": "pods", "plugins": plugins})
    }

    #[test]
    fn appends_to_the_primary_conflist_and_copies_the_binary() {
        let node = node();
        node.write("10-pods.conflist", conflist(vec![bridge()]));
        let report = node.install();
        assert!(report.binary_changed && report.config_changed);
        assert_eq!(report.config, node.conf_dir.join("10-pods.conflist"));
        assert_eq!(
            node.read("10-pods.conflist"),
            conflist(vec![bridge(), ours("/var/run/mesh/cni.sock")])
        );
        let binary = node.bin_dir.join("mesh-cni");
        assert_eq!(fs::read(&binary).unwrap(), b"\x7fELF plugin v1");
        assert_eq!(
            fs::metadata(&binary).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(node.names(), ["10-pods.conflist"], "no temp file left");
    }

    #[test]
    fn second_install_changes_nothing() {
        let node = node();
        node.write("10-pods.conflist", conflist(vec![bridge()]));
        node.install();
        let config = node.conf_dir.join("10-pods.conflist");
        let before = (
            fs::read(&config).unwrap(),
            fs::metadata(&config).unwrap().modified().unwrap(),
        );
        let report = node.install();
        assert!(!report.binary_changed && !report.config_changed);
        let after = (
            fs::read(&config).unwrap(),
            fs::metadata(&config).unwrap().modified().unwrap(),
        );
        assert_eq!(before, after);
    }

    #[test]
    fn converts_a_single_conf() {
        let node = node();
        let conf = json!({"cniVersion": "0.4.0", "name": "pods", "type": "ptp", "ipMasq": true});
        node.write("10-pods.conf", conf.clone());
        let report = node.install();
        assert_eq!(
            report.converted_from,
            Some(node.conf_dir.join("10-pods.conf"))
        );
        assert_eq!(node.names(), ["10-pods.conflist"]);
        assert_eq!(
            node.read("10-pods.conflist"),
            json!({"cniVersion": "0.4.0", "name": "pods",
                   "plugins": [conf, ours("/var/run/mesh/cni.sock")]})
        );
        let again = node.install();
        assert!(!again.config_changed && again.converted_from.is_none());
    }

    #[test]
    fn replaces_a_conversion_after_the_network_plugin_rewrote_its_conf() {
        let node = node();
        node.write(
            "10-pods.conf",
            json!({"cniVersion": "1.0.0", "name": "pods", "type": "ptp"}),
        );
        node.install();
        let rewritten = json!({"cniVersion": "1.0.0", "name": "pods", "type": "ptp", "mtu": 1400});
        node.write("10-pods.conf", rewritten.clone());
        node.install();
        assert_eq!(node.names(), ["10-pods.conflist"]);
        assert_eq!(node.read("10-pods.conflist")["plugins"][0], rewritten);
    }

    #[test]
    fn refuses_to_overwrite_a_foreign_conflist_when_converting() {
        let node = node();
        node.write(
            "10-pods.conf",
            json!({"cniVersion": "1.0.0", "name": "pods", "type": "ptp"}),
        );
        node.write("10-pods.conflist", conflist(vec![bridge()]));
        let error = install(&node.options("/s")).unwrap_err();
        assert!(
            matches!(error, InstallError::ConversionConflict { .. }),
            "{error}"
        );
        assert_eq!(node.read("10-pods.conflist"), conflist(vec![bridge()]));
    }

    #[test]
    fn updates_the_entry_in_place() {
        let node = node();
        let portmap = json!({"type": "portmap", "capabilities": {"portMappings": true}});
        node.write(
            "10-pods.conflist",
            conflist(vec![
                bridge(),
                ours("/old.sock"),
                portmap.clone(),
                ours("/older.sock"),
            ]),
        );
        let report = install(&node.options("/new.sock")).unwrap();
        assert!(report.config_changed);
        assert_eq!(
            node.read("10-pods.conflist"),
            conflist(vec![bridge(), ours("/new.sock"), portmap])
        );
    }

    #[test]
    fn edits_only_the_lexically_first_config() {
        let node = node();
        node.write("README.txt", json!({}));
        fs::create_dir(node.conf_dir.join("00-dir.conf")).unwrap();
        fs::write(node.conf_dir.join(".20-x.conflist.7.tmp"), b"{").unwrap();
        node.write(
            "30-other.conf",
            json!({"cniVersion": "1.0.0", "name": "o", "type": "ptp"}),
        );
        node.write("20-pods.json", conflist(vec![bridge()]));
        let report = node.install();
        assert_eq!(report.config, node.conf_dir.join("20-pods.json"));
        assert_eq!(node.read("30-other.conf")["type"], "ptp");
    }

    #[test]
    fn fails_without_a_network_config_and_writes_nothing() {
        let node = node();
        let error = install(&node.options("/s")).unwrap_err();
        assert!(
            matches!(error, InstallError::NoNetworkConfig { .. }),
            "{error}"
        );
        assert!(!node.bin_dir.join("mesh-cni").exists());
        let mut missing = node.options("/s");
        missing.cni_conf_dir = node.conf_dir.join("absent");
        let error = install(&missing).unwrap_err();
        assert!(
            matches!(error, InstallError::NoNetworkConfig { .. }),
            "{error}"
        );
    }

    #[test]
    fn rejects_unusable_configs() {
        let node = node();
        node.write(
            "10-pods.conflist",
            json!({"cniVersion": "0.2.0", "name": "p", "plugins": []}),
        );
        let error = install(&node.options("/s")).unwrap_err();
        assert!(
            matches!(error, InstallError::UnsupportedVersion { .. }),
            "{error}"
        );
        fs::write(node.conf_dir.join("10-pods.conflist"), b"{not json").unwrap();
        let error = install(&node.options("/s")).unwrap_err();
        assert!(
            matches!(error, InstallError::InvalidConfig { .. }),
            "{error}"
        );
        node.write(
            "10-pods.conflist",
            json!({"cniVersion": "1.0.0", "plugins": {}}),
        );
        let error = install(&node.options("/s")).unwrap_err();
        assert!(
            matches!(error, InstallError::InvalidConfig { .. }),
            "{error}"
        );
        assert!(!node.bin_dir.join("mesh-cni").exists());
    }

    #[test]
    fn keeps_the_mode_of_the_config() {
        let node = node();
        let path = node.write("10-pods.conflist", conflist(vec![bridge()]));
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        node.install();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o600
        );
    }

    #[test]
    fn uninstall_removes_the_entry_and_the_binary_only() {
        let node = node();
        node.write(
            "10-pods.conf",
            json!({"cniVersion": "1.0.0", "name": "pods", "type": "ptp"}),
        );
        node.write(
            "20-other.conflist",
            conflist(vec![bridge(), ours("/stale.sock")]),
        );
        node.write("30-broken.json", json!([1]));
        node.install();
        let report = uninstall(&node.conf_dir, &node.bin_dir).unwrap();
        assert_eq!(
            report.configs_changed,
            [
                node.conf_dir.join("10-pods.conflist"),
                node.conf_dir.join("20-other.conflist")
            ]
        );
        assert!(report.binary_removed);
        assert_eq!(
            node.read("10-pods.conflist"),
            json!({"cniVersion": "1.0.0", "name": "pods",
                   "plugins": [{"cniVersion": "1.0.0", "name": "pods", "type": "ptp"}]})
        );
        assert_eq!(node.read("20-other.conflist"), conflist(vec![bridge()]));
        assert!(!node.bin_dir.join("mesh-cni").exists());
        let again = uninstall(&node.conf_dir, &node.bin_dir).unwrap();
        assert!(again.configs_changed.is_empty() && !again.binary_removed);
    }

    #[test]
    fn uninstall_without_conf_dir_is_a_no_op() {
        let node = node();
        let report = uninstall(&node.conf_dir.join("absent"), &node.bin_dir).unwrap();
        assert!(report.configs_changed.is_empty() && !report.binary_removed);
    }
}
