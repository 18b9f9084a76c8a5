//! The control plane's certificates and keys, made fresh for every cluster (rcgen, ECDSA
//! P-256), so that no two test clusters trust each other and nothing is checked in.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub(crate) struct CertFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// Every credential the control plane needs, as files in one directory.
#[derive(Debug)]
pub(crate) struct Pki {
    /// The cluster CA: it signs every certificate here, and kube-controller-manager signs
    /// CSRs with it.
    pub(crate) ca: CertFiles,
    /// A CA of its own for the authenticating proxy (the apiserver in front of aggregated
    /// APIs): a client certificate of the cluster CA must not be able to claim any user in
    /// request headers. Its certificate also tells kube-controller-manager's and
    /// kube-scheduler's delegated authentication whom to trust for such headers.
    pub(crate) front_proxy_ca: CertFiles,
    /// The apiserver's client certificate towards aggregated APIs.
    pub(crate) front_proxy_client: CertFiles,
    pub(crate) apiserver: CertFiles,
    /// The apiserver's client certificate towards kubelets.
    pub(crate) kubelet_client: CertFiles,
    /// `admin`, group `system:masters`: the harness's own identity.
    pub(crate) admin: CertFiles,
    pub(crate) controller_manager: CertFiles,
    pub(crate) controller_manager_serving: CertFiles,
    pub(crate) scheduler: CertFiles,
    pub(crate) scheduler_serving: CertFiles,
    /// `system:node:<name>`, group `system:nodes`, by node name: what the Node authorizer
    /// and the NodeRestriction admission plugin expect of a kubelet.
    pub(crate) nodes: BTreeMap<String, CertFiles>,
    /// Signs ServiceAccount tokens (kube-apiserver, kube-controller-manager).
    pub(crate) service_account_key: PathBuf,
    /// Verifies ServiceAccount tokens (kube-apiserver).
    pub(crate) service_account_pub: PathBuf,
}

/// What the apiserver's serving certificate must name: every address and name a client may
/// dial it by (in the cp netns, from the nodes, and from pods through the `kubernetes`
/// Service).
pub(crate) const APISERVER_NAMES: &[&str] = &[
    "10.255.0.254",
    "fd00:ff::fe",
    "10.96.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
    "127.0.0.1",
    "::1",
];

/// The user the apiserver's front-proxy client certificate names, the one allowed to set
/// user headers.
pub(crate) const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// kube-controller-manager and kube-scheduler serve their health endpoints on loopback only.
const LOOPBACK_NAMES: &[&str] = &["localhost", "127.0.0.1"];

impl Pki {
    /// Makes the CA and every certificate below it in `dir`, with a node certificate for
    /// each of `nodes`.
    pub(crate) fn generate<'a>(
        dir: &Path,
        nodes: impl IntoIterator<Item = &'a str>,
    ) -> Result<Pki> {
        let (ca, ca_files) = make_ca(dir, "ca", "mesh-tests kubernetes CA")?;
        let (front_proxy, front_proxy_ca) =
            make_ca(dir, "front-proxy-ca", "mesh-tests front-proxy CA")?;
        let front_proxy_client = issue(
            dir,
            "front-proxy-client",
            client(FRONT_PROXY_CLIENT, None),
            &front_proxy,
        )
        .context("issue certificate front-proxy-client")?;
        let issue = |name: &str, params: CertificateParams| {
            issue(dir, name, params, &ca).with_context(|| format!("issue certificate {name}"))
        };
        let nodes = nodes
            .into_iter()
            .map(|node| {
                let cn = format!("system:node:{node}");
                let files = issue(&format!("node-{node}"), client(&cn, Some("system:nodes")))?;
                Ok((node.to_owned(), files))
            })
            .collect::<Result<_>>()?;
        let sa = KeyPair::generate().context("generate the service account key")?;
        let service_account_key = dir.join("sa.key");
        let service_account_pub = dir.join("sa.pub");
        write_private(&service_account_key, &sa.serialize_pem())?;
        write_private(&service_account_pub, &sa.public_key_pem())?;
        Ok(Pki {
            apiserver: issue("apiserver", server("kube-apiserver", APISERVER_NAMES)?)?,
            kubelet_client: issue(
                "apiserver-kubelet-client",
                client("kube-apiserver-kubelet-client", Some("system:masters")),
            )?,
            admin: issue("admin", client("admin", Some("system:masters")))?,
            controller_manager: issue(
                "controller-manager",
                client("system:kube-controller-manager", None),
            )?,
            controller_manager_serving: issue(
                "controller-manager-serving",
                server("kube-controller-manager", LOOPBACK_NAMES)?,
            )?,
            scheduler: issue("scheduler", client("system:kube-scheduler", None))?,
            scheduler_serving: issue(
                "scheduler-serving",
                server("kube-scheduler", LOOPBACK_NAMES)?,
            )?,
            nodes,
            service_account_key,
            service_account_pub,
            ca: ca_files,
            front_proxy_ca,
            front_proxy_client,
        })
    }
}

/// A self-signed CA, written as `<name>.crt` and `<name>.key`.
fn make_ca(
    dir: &Path,
    name: &str,
    common_name: &str,
) -> Result<(CertifiedIssuer<'static, KeyPair>, CertFiles)> {
    let mut params = CertificateParams::default();
    params.distinguished_name.remove(DnType::CommonName);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().with_context(|| format!("generate the key of {name}"))?;
    let key_pem = key.serialize_pem();
    let ca =
        CertifiedIssuer::self_signed(params, key).with_context(|| format!("self-sign {name}"))?;
    let files = files_for(dir, name);
    write_private(&files.cert, &ca.pem())?;
    write_private(&files.key, &key_pem)?;
    Ok((ca, files))
}

/// A client certificate for user `common_name` in group `organization`.
fn client(common_name: &str, organization: Option<&str>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.remove(DnType::CommonName);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// A serving certificate for `names` (IP addresses and DNS names).
fn server(common_name: &str, names: &[&str]) -> Result<CertificateParams> {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names)
        .with_context(|| format!("subject alternative names of {common_name}"))?;
    params.distinguished_name.remove(DnType::CommonName);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

/// Signs `params` with a fresh key and writes `<name>.crt` and `<name>.key`.
fn issue(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    ca: &Issuer<'_, KeyPair>,
) -> Result<CertFiles> {
    let key = KeyPair::generate().context("generate key")?;
    let cert = params.signed_by(&key, ca).context("sign")?;
    let files = files_for(dir, name);
    write_private(&files.cert, &cert.pem())?;
    write_private(&files.key, &key.serialize_pem())?;
    Ok(files)
}

fn files_for(dir: &Path, name: &str) -> CertFiles {
    CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    }
}

/// Writes a credential readable by its owner only (keys and tokens, and certificates too:
/// one rule for the whole directory).
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}
