//! `CA.yaml`, the CA service's configuration (see docs/identity.md).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rcgen::SanType;
use serde::Deserialize;

use crate::identity::validate_trust_domain;

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15012);
/// `--metrics-addr`'s default: `/metrics` and `/healthz/ready`.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15014";
/// The audience agents' tokens must be bound to (Istio's).
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
pub const DEFAULT_MAX_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// The file as written. Relative paths are relative to the file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The signing certificate: a root, or an intermediate followed by its parents.
    pub signing_cert: PathBuf,
    /// Its PKCS #8 key; only the CA's host has it.
    pub signing_key: PathBuf,
    /// The roots handed to agents and nodes; default: the root of `signingCert`.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// DNS names and IP addresses of the CA's own serving certificate.
    pub server_names: Vec<String>,
    /// Requests asking for longer get this.
    #[serde(default = "default_max_certificate_lifetime", with = "humantime_serde")]
    pub max_certificate_lifetime: Duration,
    /// The node credentials' directory (registry and node-credential CA). Without it, no node
    /// credential is accepted (Kubernetes tokens only).
    #[serde(default)]
    pub nodes: Option<PathBuf>,
    pub authorization: AuthorizationConfig,
}

/// Exactly one of the two ways to know which workloads run on which node.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// Standalone: the cluster file (reloaded when it changes).
    #[serde(default)]
    pub cluster_file: Option<PathBuf>,
    /// Kubernetes: TokenReview and Pods.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesConfig {
    /// `namespace/name` of the service accounts whose tokens authenticate agents.
    pub agent_service_accounts: Vec<String>,
    #[serde(default = "default_audience")]
    pub audience: String,
}

/// The validated choice of [`AuthorizationConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    ClusterFile(PathBuf),
    Kubernetes(KubernetesConfig),
}

impl CaConfig {
    /// Reads, checks and resolves the file; every error names it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the CA configuration {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses the text of `path` (which names it in errors and anchors its relative paths).
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let mut config: Self = serde_yaml_ng::from_str(text)
            .with_context(|| format!("{}: invalid CA configuration", path.display()))?;
        config
            .check()
            .with_context(|| format!("{}: invalid CA configuration", path.display()))?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        validate_trust_domain(&self.trust_domain)?;
        if self.server_names.is_empty() {
            bail!("serverNames: give at least one DNS name or IP address of the CA");
        }
        for name in &self.server_names {
            server_name_san(name)?;
        }
        if self.max_certificate_lifetime.is_zero() {
            bail!("maxCertificateLifetime must be longer than zero");
        }
        let kubernetes = self.authorization()?;
        if let Authorization::Kubernetes(kubernetes) = kubernetes {
            kubernetes.service_accounts()?;
            if kubernetes.audience.is_empty() {
                bail!("authorization.kubernetes.audience must not be empty");
            }
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let paths = [&mut self.signing_cert, &mut self.signing_key]
            .into_iter()
            .chain(self.trust_bundle.as_mut())
            .chain(self.nodes.as_mut())
            .chain(self.authorization.cluster_file.as_mut());
        for path in paths {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    /// Which authorization the file chose (checked when loaded: exactly one).
    pub fn authorization(&self) -> anyhow::Result<Authorization> {
        match (
            &self.authorization.cluster_file,
            &self.authorization.kubernetes,
        ) {
            (Some(file), None) => Ok(Authorization::ClusterFile(file.clone())),
            (None, Some(kubernetes)) => Ok(Authorization::Kubernetes(kubernetes.clone())),
            (Some(_), Some(_)) => {
                bail!("authorization: give clusterFile or kubernetes, not both")
            }
            (None, None) => bail!("authorization: give clusterFile or kubernetes"),
        }
    }

    /// The serving certificate's subjectAltNames.
    pub fn server_sans(&self) -> anyhow::Result<Vec<SanType>> {
        self.server_names
            .iter()
            .map(|name| server_name_san(name))
            .collect()
    }
}

impl KubernetesConfig {
    /// `agentServiceAccounts` as (namespace, name) pairs.
    pub fn service_accounts(&self) -> anyhow::Result<Vec<(String, String)>> {
        if self.agent_service_accounts.is_empty() {
            bail!(
                "authorization.kubernetes.agentServiceAccounts: give at least one namespace/name"
            );
        }
        self.agent_service_accounts
            .iter()
            .map(|entry| match entry.split_once('/') {
                Some((namespace, name))
                    if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
                {
                    Ok((namespace.to_owned(), name.to_owned()))
                }
                _ => bail!(
                    "authorization.kubernetes.agentServiceAccounts: {entry:?} is not namespace/name"
                ),
            })
            .collect()
    }
}

/// An IP address becomes an IP SAN, anything else must be a valid DNS name.
fn server_name_san(name: &str) -> anyhow::Result<SanType> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    rustls_pki_types::DnsName::try_from(name).with_context(|| {
        format!("serverNames: {name:?} is neither an IP address nor a DNS name")
    })?;
    let dns = rcgen::string::Ia5String::try_from(name)
        .with_context(|| format!("serverNames: {name:?} is not ASCII"))?;
    Ok(SanType::DnsName(dns))
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
}

fn default_max_certificate_lifetime() -> Duration {
    DEFAULT_MAX_CERTIFICATE_LIFETIME
}

fn default_audience() -> String {
    DEFAULT_AUDIENCE.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
signingCert: ca-cert.pem
signingKey: /etc/mesh/ca-key.pem
serverNames: [mesh-ca, 10.255.0.253]
nodes: nodes/
authorization:
  clusterFile: cluster.yaml
";

    #[test]
    fn defaults_and_relative_paths() {
        let config = CaConfig::parse(MINIMAL, Path::new("/srv/ca/CA.yaml")).expect("valid");
        assert_eq!(config.trust_domain, "cluster.local");
        assert_eq!(config.listen, DEFAULT_LISTEN);
        assert_eq!(config.signing_cert, Path::new("/srv/ca/ca-cert.pem"));
        assert_eq!(config.signing_key, Path::new("/etc/mesh/ca-key.pem"));
        assert_eq!(config.nodes.as_deref(), Some(Path::new("/srv/ca/nodes/")));
        assert_eq!(
            config.authorization().expect("one"),
            Authorization::ClusterFile("/srv/ca/cluster.yaml".into())
        );
        assert_eq!(
            config.max_certificate_lifetime,
            DEFAULT_MAX_CERTIFICATE_LIFETIME
        );
        assert_eq!(config.server_sans().expect("valid").len(), 2);
    }

    #[test]
    fn kubernetes_section() {
        let text = "
signingCert: c.pem
signingKey: k.pem
serverNames: [mesh-ca.mesh-system.svc]
maxCertificateLifetime: 1h
authorization:
  kubernetes:
    agentServiceAccounts: [mesh-system/mesh-agent]
";
        let config = CaConfig::parse(text, Path::new("CA.yaml")).expect("valid");
        let Authorization::Kubernetes(kubernetes) = config.authorization().expect("one") else {
            panic!("expected kubernetes");
        };
        assert_eq!(kubernetes.audience, "istio-ca");
        assert_eq!(
            kubernetes.service_accounts().expect("valid"),
            vec![("mesh-system".to_owned(), "mesh-agent".to_owned())]
        );
    }

    #[test]
    fn refusals() {
        let both = MINIMAL.replace(
            "  clusterFile: cluster.yaml",
            "  clusterFile: c.yaml\n  kubernetes:\n    agentServiceAccounts: [a/b]",
        );
        let bad_sa = MINIMAL.replace(
            "  clusterFile: cluster.yaml",
            "  kubernetes:\n    agentServiceAccounts: [mesh-agent]",
        );
        for (text, expected) in [
            (both.as_str(), "not both"),
            (bad_sa.as_str(), "not namespace/name"),
            (&MINIMAL.replace("mesh-ca,", "\"bad name!\","), "neither"),
            (&format!("{MINIMAL}extra: 1\n"), "unknown field"),
            (
                &MINIMAL.replace("nodes: nodes/\n", "trustDomain: Bad\n"),
                "trust domain",
            ),
        ] {
            let err = CaConfig::parse(text, Path::new("CA.yaml")).expect_err(text);
            assert!(format!("{err:#}").contains(expected), "{err:#}");
        }
    }
}
