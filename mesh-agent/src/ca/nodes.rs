//! Standalone node credentials: a CA of their own (`nodes/node-ca-cert.pem`, `node-ca-key.pem`)
//! signs one client certificate per node, and `nodes/registry.json` names each node's current
//! serial. A credential whose serial is not its node's current one (revoked, or replaced by a
//! newer `add-node`) authenticates nothing.
//!
//! The node-credential CA is deliberately not the mesh's signing CA: a node credential is
//! never a workload identity, and a workload certificate never authenticates a node.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use nix::fcntl::{Flock, FlockArg};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::fswatch::Fingerprint;
use crate::identity::{CLOCK_SKEW_ALLOWANCE, CertificateAuthority, WorkloadCert};
use crate::workload::Name;

pub const NODE_CA_CERT_FILE: &str = "node-ca-cert.pem";
pub const NODE_CA_KEY_FILE: &str = "node-ca-key.pem";
pub const REGISTRY_FILE: &str = "registry.json";
/// Serializes `add-node` and `revoke-node` runs (and the node CA's creation).
const LOCK_FILE: &str = ".lock";
/// What `add-node` writes into `--out`.
pub const NODE_CERT_FILE: &str = "node-cert.pem";
pub const NODE_KEY_FILE: &str = "node-key.pem";
pub const CA_ROOTS_FILE: &str = "ca-roots.pem";

const NODE_CA_COMMON_NAME: &str = "mesh node credential CA";
/// A node credential is not renewed by the agent; revocation, not expiry, is what ends it.
pub const NODE_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// `spiffe://<trust-domain>/mesh/node/<name>`: a node credential's one URI SAN. The path is
/// outside `/ns/…/sa/…`, so no SPIFFE ID parser takes it for a workload.
pub fn node_uri(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/mesh/node/{node}")
}

/// The node a node credential's URI names, if it is one of this trust domain.
pub fn node_of_uri<'u>(trust_domain: &str, uri: &'u str) -> Option<&'u str> {
    let node = uri
        .strip_prefix("spiffe://")?
        .strip_prefix(trust_domain)?
        .strip_prefix("/mesh/node/")?;
    Name::try_from(node.to_owned()).ok().map(|_| node)
}

/// Node name → the serial (colon-separated hex) of its one valid credential.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Registry(BTreeMap<String, String>);

impl Registry {
    /// A missing file is an empty registry (no node added yet).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a node registry", path.display())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Replaces the file atomically (readers see the old or the new registry, never half).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut json = serde_json::to_vec_pretty(self).context("encoding the node registry")?;
        json.push(b'\n');
        write_atomically(path, &json, 0o644)
    }

    pub fn current_serial(&self, node: &str) -> Option<&str> {
        self.0.get(node).map(String::as_str)
    }

    /// Whether `serial` is `node`'s current credential.
    pub fn is_current(&self, node: &str, serial: &str) -> bool {
        self.current_serial(node) == Some(serial)
    }

    pub fn set(&mut self, node: &str, serial: &str) -> Option<String> {
        self.0.insert(node.to_owned(), serial.to_owned())
    }

    pub fn remove(&mut self, node: &str) -> Option<String> {
        self.0.remove(node)
    }
}

/// The registry as the running CA sees it: re-read whenever the file changed, checked at each
/// use (one `stat`), so a revocation takes effect with the next request.
pub struct RegistryView {
    path: PathBuf,
    cached: Mutex<(Fingerprint, Arc<Registry>)>,
}

impl RegistryView {
    pub fn new(nodes_dir: &Path) -> Self {
        Self {
            path: nodes_dir.join(REGISTRY_FILE),
            cached: Mutex::new((Fingerprint::Missing, Arc::new(Registry::default()))),
        }
    }

    /// The registry now. An unreadable or malformed file counts as empty, so a damaged registry
    /// fails closed (no node credential accepted) rather than honouring revoked serials.
    pub fn current(&self) -> Arc<Registry> {
        let seen = Fingerprint::of(&self.path, |path| Ok(vec![path.to_owned()]));
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.0 != seen {
            let registry = Registry::load(&self.path).unwrap_or_else(|err| {
                error!(
                    registry = %self.path.display(),
                    error = format!("{err:#}"),
                    "cannot read the node registry; refusing every node credential until it is fixed"
                );
                Registry::default()
            });
            info!(registry = %self.path.display(), nodes = registry.0.len(), "node registry loaded");
            *cached = (seen, Arc::new(registry));
        }
        Arc::clone(&cached.1)
    }
}

/// The `nodes/` directory.
pub struct NodesDir {
    dir: PathBuf,
}

impl NodesDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    pub fn registry_path(&self) -> PathBuf {
        self.dir.join(REGISTRY_FILE)
    }

    /// Holds the directory's lock until dropped. Creates the directory (mode 0700: it holds the
    /// node-credential CA's key) if missing.
    pub fn lock(&self) -> anyhow::Result<Flock<File>> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("cannot lock {}", path.display()))
    }

    /// The node-credential CA, generated on first use. Call with the lock held.
    pub fn ensure_ca(&self) -> anyhow::Result<CertificateAuthority> {
        let (cert, key) = (
            self.dir.join(NODE_CA_CERT_FILE),
            self.dir.join(NODE_CA_KEY_FILE),
        );
        match (cert.exists(), key.exists()) {
            (true, true) => {}
            (false, false) => {
                let ca = CertificateAuthority::generate_root(NODE_CA_COMMON_NAME)?;
                write_new(&key, ca.key_pem().as_bytes(), 0o600)?;
                write_new(&cert, ca.chain_pem().as_bytes(), 0o644)?;
                info!(cert = %cert.display(), "created the node-credential CA");
                return Ok(ca);
            }
            _ => bail!(
                "{}: one of {NODE_CA_CERT_FILE} and {NODE_CA_KEY_FILE} is missing; restore it or remove both (every node credential must then be added again)",
                self.dir.display()
            ),
        }
        Ok(CertificateAuthority::load(&cert, &key)?)
    }

    /// The node-credential CA's certificate, the trust anchor client certificates must chain
    /// to.
    pub fn ca_certificate(&self) -> anyhow::Result<CertificateDer<'static>> {
        let _lock = self.lock()?;
        Ok(self.ensure_ca()?.signing_certificate().clone())
    }
}

/// A node's new credential: its certificate (PEM), key (PKCS #8 PEM) and serial.
pub struct NodeCredential {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: String,
    pub not_after: SystemTime,
}

/// Signs a credential for `node`: a fresh P-256 key, subject CN=<node>, one URI SAN
/// ([`node_uri`]), clientAuth only, CA:FALSE.
pub fn issue_credential(
    node_ca: &CertificateAuthority,
    trust_domain: &str,
    node: &str,
) -> anyhow::Result<NodeCredential> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    params.subject_alt_names = vec![SanType::URI(rcgen::string::Ia5String::try_from(node_uri(
        trust_domain,
        node,
    ))?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
    params.not_after = (now + NODE_CREDENTIAL_LIFETIME)
        .min(node_ca.not_after())
        .into();
    let cert: WorkloadCert = node_ca.sign_leaf(&params)?;
    let leaf = cert
        .chain()
        .first()
        .context("signed credential has no certificate")?;
    Ok(NodeCredential {
        cert_pem: pem_encode("CERTIFICATE", leaf),
        key_pem: pem_encode("PRIVATE KEY", cert.key().secret_der()),
        serial: cert.serial().to_owned(),
        not_after: cert.not_after(),
    })
}

/// `add-node`: writes `out/node-cert.pem`, `out/node-key.pem` (0600), `out/ca-roots.pem`, then
/// records the serial as `node`'s only valid one (replacing, hence revoking, an older one).
/// The registry changes last, so a failure leaves the old credential working.
pub fn add_node(
    nodes_dir: &Path,
    trust_domain: &str,
    node: &str,
    roots_pem: &str,
    out: &Path,
) -> anyhow::Result<NodeCredential> {
    let name = Name::try_from(node.to_owned())
        .map_err(|reason| anyhow::anyhow!("node name {node:?}: {reason}"))?;
    let nodes = NodesDir::new(nodes_dir);
    let _lock = nodes.lock()?;
    let node_ca = nodes.ensure_ca()?;
    let credential = issue_credential(&node_ca, trust_domain, name.as_str())?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    write_atomically(
        &out.join(NODE_KEY_FILE),
        credential.key_pem.as_bytes(),
        0o600,
    )?;
    write_atomically(
        &out.join(NODE_CERT_FILE),
        credential.cert_pem.as_bytes(),
        0o644,
    )?;
    write_atomically(&out.join(CA_ROOTS_FILE), roots_pem.as_bytes(), 0o644)?;
    let registry_path = nodes.registry_path();
    let mut registry = Registry::load(&registry_path)?;
    let replaced = registry.set(name.as_str(), &credential.serial);
    registry.save(&registry_path)?;
    info!(
        node,
        serial = credential.serial,
        replaced = replaced.as_deref().unwrap_or(""),
        "node credential issued"
    );
    Ok(credential)
}

/// `revoke-node`: `node` has no valid credential any more. Returns the serial it had, if any.
pub fn revoke_node(nodes_dir: &Path, node: &str) -> anyhow::Result<Option<String>> {
    let nodes = NodesDir::new(nodes_dir);
    let _lock = nodes.lock()?;
    let registry_path = nodes.registry_path();
    let mut registry = Registry::load(&registry_path)?;
    let revoked = registry.remove(node);
    if revoked.is_some() {
        registry.save(&registry_path)?;
        info!(
            node,
            serial = revoked.as_deref().unwrap_or(""),
            "node credential revoked"
        );
    }
    Ok(revoked)
}

/// Creates `path` (never replacing a file) with `mode`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a temporary file with `mode` beside `path` and renames it over `path`: the file is
/// never seen half-written, and a key file never exists with a wider mode.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".tmp{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let _ = fs::remove_file(&temp);
    write_new(&temp, contents, mode)?;
    fs::rename(&temp, path).with_context(|| {
        let _ = fs::remove_file(&temp);
        format!("cannot replace {}", path.display())
    })
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn node_uris_round_trip() {
        let uri = node_uri("cluster.local", "node-a");
        assert_eq!(uri, "spiffe://cluster.local/mesh/node/node-a");
        assert_eq!(node_of_uri("cluster.local", &uri), Some("node-a"));
        assert_eq!(node_of_uri("other.local", &uri), None);
        for bad in [
            "spiffe://cluster.local/ns/default/sa/node-a",
            "spiffe://cluster.local/mesh/node/",
            "spiffe://cluster.local/mesh/node/a/b",
            "spiffe://cluster.local/mesh/node/Node",
        ] {
            assert_eq!(node_of_uri("cluster.local", bad), None, "{bad}");
        }
    }

    #[test]
    fn add_replace_revoke() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = dir.path().join("nodes");
        let out = dir.path().join("out");
        let first = add_node(&nodes, "cluster.local", "node-a", "ROOTS\n", &out).expect("add");
        let key_mode = fs::metadata(out.join(NODE_KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let ca_key_mode = fs::metadata(nodes.join(NODE_CA_KEY_FILE))
            .expect("node CA key")
            .permissions()
            .mode();
        assert_eq!(ca_key_mode & 0o777, 0o600);
        assert_eq!(
            fs::read_to_string(out.join(CA_ROOTS_FILE)).expect("roots"),
            "ROOTS\n"
        );

        let view = RegistryView::new(&nodes);
        assert!(view.current().is_current("node-a", &first.serial));

        let second = add_node(&nodes, "cluster.local", "node-a", "ROOTS\n", &out).expect("re-add");
        assert_ne!(first.serial, second.serial);
        let registry = view.current();
        assert!(
            !registry.is_current("node-a", &first.serial),
            "replaced serial still valid"
        );
        assert!(registry.is_current("node-a", &second.serial));

        assert_eq!(
            revoke_node(&nodes, "node-a").expect("revoke"),
            Some(second.serial.clone())
        );
        assert!(
            !view.current().is_current("node-a", &second.serial),
            "revoked serial still valid"
        );
        assert_eq!(revoke_node(&nodes, "node-a").expect("revoke again"), None);
    }

    #[test]
    fn bad_names_and_damaged_registry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = dir.path().join("nodes");
        let err = add_node(&nodes, "cluster.local", "Node_A", "", dir.path())
            .err()
            .expect("refused");
        assert!(format!("{err:#}").contains("Node_A"), "{err:#}");

        let out = dir.path().join("out");
        let credential = add_node(&nodes, "cluster.local", "node-a", "", &out).expect("add");
        let view = RegistryView::new(&nodes);
        assert!(view.current().is_current("node-a", &credential.serial));
        fs::write(nodes.join(REGISTRY_FILE), "{not json").expect("damage");
        assert!(
            !view.current().is_current("node-a", &credential.serial),
            "a damaged registry must fail closed"
        );
    }
}
