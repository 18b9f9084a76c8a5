//! Policies as the agent evaluates them: read from Istio's YAML (`schema.rs`), checked and
//! normalised (`compile.rs`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::identity::SpiffeId;

use super::pattern::{Glob, IpBlock, ServiceAccountRef};

/// The mutual TLS mode a workload port accepts, once `UNSET` has been resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Only mutual TLS from the mesh is accepted: a plaintext client is reset.
    Strict,
    /// Both mutual TLS and plaintext are accepted (Istio's default).
    Permissive,
    /// Mutual TLS is not used for this port: peers connect in plaintext.
    Disable,
}

impl MtlsMode {
    /// The name Istio gives this mode (`STRICT`, `PERMISSIVE`, `DISABLE`).
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }

    /// Whether a plaintext connection (no verified peer identity) may reach the port.
    pub fn accepts_plaintext(self) -> bool {
        !matches!(self, MtlsMode::Strict)
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name` of a policy, and its place in the load order (files sorted by name, then
/// documents in file order), which stands in for Istio's "oldest wins" when policies tie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolicyId {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) order: usize,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `matchLabels`: a workload is selected when it carries every one of these labels. An empty
/// selector is stored as `None`, as Istio treats it like no selector.
pub(crate) type Labels = BTreeMap<String, String>;

pub(crate) fn labels_select(selector: &Labels, workload_labels: &Labels) -> bool {
    selector
        .iter()
        .all(|(key, value)| workload_labels.get(key) == Some(value))
}

#[derive(Debug, Clone)]
pub(crate) struct PeerAuthentication {
    pub(crate) id: PolicyId,
    pub(crate) selector: Option<Labels>,
    /// `None` is `UNSET`: inherit from the broader scope.
    pub(crate) mode: Option<MtlsMode>,
    /// `portLevelMtls`: per destination port; `None` is `UNSET` (inherit the workload's mode).
    pub(crate) port_modes: BTreeMap<u16, Option<MtlsMode>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub(crate) struct AuthorizationPolicy {
    pub(crate) id: PolicyId,
    pub(crate) selector: Option<Labels>,
    pub(crate) action: Action,
    /// Empty: the policy matches nothing (an ALLOW policy without rules allows nothing).
    pub(crate) rules: Vec<Rule>,
}

/// One rule: any `from` entry AND any `to` entry (an absent list matches everything).
#[derive(Debug, Clone, Default)]
pub(crate) struct Rule {
    pub(crate) from: Vec<Source>,
    pub(crate) to: Vec<Operation>,
}

/// Every field that is set must match; within a field, any value may match.
#[derive(Debug, Clone, Default)]
pub(crate) struct Source {
    pub(crate) principals: Vec<Glob>,
    pub(crate) not_principals: Vec<Glob>,
    pub(crate) namespaces: Vec<Glob>,
    pub(crate) not_namespaces: Vec<Glob>,
    pub(crate) service_accounts: Vec<ServiceAccountRef>,
    pub(crate) not_service_accounts: Vec<ServiceAccountRef>,
    pub(crate) ip_blocks: Vec<IpBlock>,
    pub(crate) not_ip_blocks: Vec<IpBlock>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Operation {
    pub(crate) ports: Vec<u16>,
    pub(crate) not_ports: Vec<u16>,
}

/// What a connection offers to authorization: who the peer proved to be (nothing for plaintext),
/// where it comes from, and which port it wants.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAttrs<'a> {
    /// The peer's verified SPIFFE ID (mutual TLS); `None` for plaintext.
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination_port: u16,
}

impl AuthorizationPolicy {
    pub(crate) fn matches(&self, conn: &ConnectionAttrs<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(conn))
    }
}

impl Rule {
    fn matches(&self, conn: &ConnectionAttrs<'_>) -> bool {
        let from_matches = self.from.is_empty() || self.from.iter().any(|s| s.matches(conn));
        let to_matches = self.to.is_empty() || self.to.iter().any(|o| o.matches(conn));
        from_matches && to_matches
    }
}

impl Source {
    fn matches(&self, conn: &ConnectionAttrs<'_>) -> bool {
        // Istio's principal is the SPIFFE ID without its scheme: `td/ns/<ns>/sa/<sa>`.
        let principal = conn.source.map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain(),
                id.namespace(),
                id.service_account()
            )
        });
        let principal_is = |glob: &Glob| principal.as_deref().is_some_and(|p| glob.matches(p));
        let namespace_is = |glob: &Glob| conn.source.is_some_and(|id| glob.matches(id.namespace()));
        let service_account_is = |sa: &ServiceAccountRef| {
            conn.source
                .is_some_and(|id| id.namespace() == sa.namespace && id.service_account() == sa.name)
        };
        let ip_is_in = |block: &IpBlock| block.contains(conn.source_ip);

        required(&self.principals, principal_is)
            && excluded(&self.not_principals, principal_is)
            && required(&self.namespaces, namespace_is)
            && excluded(&self.not_namespaces, namespace_is)
            && required(&self.service_accounts, service_account_is)
            && excluded(&self.not_service_accounts, service_account_is)
            && required(&self.ip_blocks, ip_is_in)
            && excluded(&self.not_ip_blocks, ip_is_in)
    }
}

impl Operation {
    fn matches(&self, conn: &ConnectionAttrs<'_>) -> bool {
        let port_is = |port: &u16| *port == conn.destination_port;
        required(&self.ports, port_is) && excluded(&self.not_ports, port_is)
    }
}

/// A positive field: unset (empty) matches; set, one of its values must match.
fn required<T>(values: &[T], is_match: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(is_match)
}

/// A `not*` field: none of its values may match.
fn excluded<T>(values: &[T], is_match: impl Fn(&T) -> bool) -> bool {
    !values.iter().any(is_match)
}
