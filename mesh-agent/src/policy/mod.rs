//! Istio's security API at L4: `PeerAuthentication` (which mTLS mode a workload port accepts) and
//! `AuthorizationPolicy` (which connections reach it), read from the YAML users write for Istio
//! (see `docs/policy.md`).
//!
//! - [`PolicySet`]: an immutable snapshot of the policies of a file or directory, and the two
//!   questions the proxy asks it: [`PolicySet::mtls_mode`] and [`PolicySet::authorize`];
//! - [`PolicyWatcher`]: loads a path, polls it, and publishes each good new set, keeping the last
//!   good one when a change is invalid;
//! - [`PolicyError`]: why a set was rejected, naming the file, the document, the field and the
//!   line.
//!
//! L7 fields (methods, paths, hosts, request principals, `when` conditions...) are refused with
//! the reason, never ignored: a policy that cannot be enforced as written is not enforced at all.

mod compile;
mod error;
mod load;
mod model;
mod pattern;
mod schema;
mod watch;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use error::{DocumentLabel, Location, PolicyError, PolicyProblem};
pub use model::{ConnectionAttrs, MtlsMode};
pub use watch::{DEFAULT_POLL_INTERVAL, PolicyWatcher};

use crate::workload::Workload;
use load::{Loaded, Policy};
use model::{Action, AuthorizationPolicy, PeerAuthentication, PolicyId, labels_select};

/// Istio's default root namespace: policies there without a selector apply to the whole mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The policies of one load, in load order (files sorted by name, then documents in file order).
#[derive(Debug, Clone)]
pub struct PolicySet {
    root_namespace: String,
    peer_authentications: Vec<PeerAuthentication>,
    authorization_policies: Vec<AuthorizationPolicy>,
    files: Vec<PathBuf>,
    warnings: Vec<String>,
}

/// The workload a connection is for, as policies select it.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadRef<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> From<&'a Workload> for WorkloadRef<'a> {
    fn from(workload: &'a Workload) -> Self {
        Self {
            namespace: workload.namespace.as_str(),
            labels: &workload.labels,
        }
    }
}

/// The mTLS mode of a workload port, and which policy decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsResolution {
    pub mode: MtlsMode,
    pub scope: MtlsScope,
    /// `namespace/name` of the deciding `PeerAuthentication`; `None` for the default.
    pub policy: Option<String>,
    /// Worth a warning: several workload-level policies selected the workload; the first (in file
    /// and document order) was used, where Istio would use the oldest.
    pub conflicts: Vec<String>,
}

/// Which level of `PeerAuthentication` decided a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsScope {
    /// No policy sets a mode: Istio's default, PERMISSIVE.
    Default,
    /// A policy of the root namespace without selector.
    Mesh,
    /// A policy of the workload's namespace without selector.
    Namespace,
    /// A policy whose selector matches the workload.
    Workload,
    /// The `portLevelMtls` entry for the port, of that workload policy.
    Port,
}

/// What authorization decided for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `by`: `namespace/name` of the ALLOW policy that matched; `None` when no ALLOW policy
    /// applies to the workload (and no DENY policy matched).
    Allow {
        by: Option<String>,
    },
    Deny {
        by: DenyReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// `namespace/name` of the DENY policy that matched.
    Policy(String),
    /// The workload has ALLOW policies and none matched; their `namespace/name`.
    NoAllowMatch(Vec<String>),
}

impl PolicySet {
    /// No policies: every port PERMISSIVE, every connection allowed.
    pub fn empty(root_namespace: &str) -> Self {
        Self::from_loaded(root_namespace, Loaded::default())
    }

    /// Loads a policy file, or every `*.yaml` / `*.yml` file of a directory (sorted by name; an
    /// empty directory is an empty set). Any problem rejects the whole set.
    pub fn load(path: &Path, root_namespace: &str) -> Result<Self, PolicyError> {
        let loaded = load::load(path)?;
        Ok(Self::from_loaded(root_namespace, loaded))
    }

    /// Parses the text of one policy file; `file` names it in errors.
    pub fn from_yaml(text: &str, file: &Path, root_namespace: &str) -> Result<Self, PolicyError> {
        let loaded = load::parse_files([(file, text)])?;
        Ok(Self::from_loaded(root_namespace, loaded))
    }

    /// Parses policy documents given as (name, YAML text), in that order, as if each were a
    /// file; the names stand for files in errors and in [`PolicySet::files`] (the Kubernetes
    /// source names each object `Kind/namespace/name`).
    pub fn from_documents<'a>(
        documents: impl IntoIterator<Item = (&'a Path, &'a str)>,
        root_namespace: &str,
    ) -> Result<Self, PolicyError> {
        let loaded = load::parse_files(documents)?;
        Ok(Self::from_loaded(root_namespace, loaded))
    }

    fn from_loaded(root_namespace: &str, loaded: Loaded) -> Self {
        let mut peer_authentications = Vec::new();
        let mut authorization_policies = Vec::new();
        for policy in loaded.policies {
            match policy {
                Policy::Peer(policy) => peer_authentications.push(policy),
                Policy::Authorization(policy) => authorization_policies.push(policy),
            }
        }
        let mut set = Self {
            root_namespace: root_namespace.to_owned(),
            peer_authentications,
            authorization_policies,
            files: loaded.files,
            warnings: Vec::new(),
        };
        set.warnings = set.tie_warnings();
        set
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The files the set was read from, in load order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn peer_authentication_count(&self) -> usize {
        self.peer_authentications.len()
    }

    pub fn authorization_policy_count(&self) -> usize {
        self.authorization_policies.len()
    }

    /// Worth logging when the set is loaded: several mesh-wide or namespace-wide
    /// `PeerAuthentication`s compete, and the first in load order is used where Istio would use
    /// the oldest.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The mTLS mode `port` of `workload` accepts.
    pub fn mtls_mode(&self, workload: &WorkloadRef<'_>, port: u16) -> MtlsMode {
        self.resolve_mtls(workload, port).mode
    }

    /// The mTLS mode `port` of `workload` accepts, and why: the workload-level policy wins over
    /// the namespace-wide one, which wins over the mesh-wide one; `UNSET` inherits from the next
    /// broader level; the port's `portLevelMtls` entry overrides the workload policy's mode; with
    /// no mode set anywhere, PERMISSIVE.
    pub fn resolve_mtls(&self, workload: &WorkloadRef<'_>, port: u16) -> MtlsResolution {
        let mut resolution = MtlsResolution {
            mode: MtlsMode::Permissive,
            scope: MtlsScope::Default,
            policy: None,
            conflicts: Vec::new(),
        };
        if let Some(mesh) = self.mesh_peer_authentication() {
            resolution.apply(mesh.mode, MtlsScope::Mesh, &mesh.id);
        }
        if let Some(namespace) = self.namespace_peer_authentication(workload.namespace) {
            resolution.apply(namespace.mode, MtlsScope::Namespace, &namespace.id);
        }
        let selecting = self.workload_peer_authentications(workload);
        if let Some((chosen, others)) = selecting.split_first() {
            resolution.apply(chosen.mode, MtlsScope::Workload, &chosen.id);
            if let Some(&port_mode) = chosen.port_modes.get(&port) {
                resolution.apply(port_mode, MtlsScope::Port, &chosen.id);
            }
            if !others.is_empty() {
                resolution.conflicts.push(tie_note(
                    "workload-level PeerAuthentications select this workload",
                    selecting.iter().map(|p| &p.id),
                ));
            }
        }
        resolution
    }

    /// Whether the connection may reach `workload`: a matching DENY policy denies; otherwise, if
    /// ALLOW policies apply to the workload, one of them must match; otherwise it is allowed.
    pub fn authorize(&self, workload: &WorkloadRef<'_>, conn: &ConnectionAttrs<'_>) -> Decision {
        let applicable: Vec<&AuthorizationPolicy> = self
            .authorization_policies
            .iter()
            .filter(|policy| self.applies_to(&policy.id, policy.selector.as_ref(), workload))
            .collect();
        let with_action = |action| applicable.iter().filter(move |p| p.action == action);
        if let Some(deny) = with_action(Action::Deny).find(|p| p.matches(conn)) {
            return Decision::Deny {
                by: DenyReason::Policy(deny.id.to_string()),
            };
        }
        let allows: Vec<_> = with_action(Action::Allow).collect();
        if allows.is_empty() {
            return Decision::Allow { by: None };
        }
        match allows.iter().find(|p| p.matches(conn)) {
            Some(allow) => Decision::Allow {
                by: Some(allow.id.to_string()),
            },
            None => Decision::Deny {
                by: DenyReason::NoAllowMatch(allows.iter().map(|p| p.id.to_string()).collect()),
            },
        }
    }

    /// A policy applies to the workloads of its namespace, or of every namespace when it is in
    /// the root namespace, that its selector matches (no selector matches all of them).
    fn applies_to(
        &self,
        id: &PolicyId,
        selector: Option<&model::Labels>,
        workload: &WorkloadRef<'_>,
    ) -> bool {
        let in_scope = id.namespace == workload.namespace || id.namespace == self.root_namespace;
        in_scope && selector.is_none_or(|labels| labels_select(labels, workload.labels))
    }

    fn mesh_peer_authentication(&self) -> Option<&PeerAuthentication> {
        self.namespace_wide_peer_authentications(&self.root_namespace)
            .next()
    }

    /// The workload's namespace-wide policy; in the root namespace, that is the mesh-wide one,
    /// already applied.
    fn namespace_peer_authentication(&self, namespace: &str) -> Option<&PeerAuthentication> {
        if namespace == self.root_namespace {
            return None;
        }
        self.namespace_wide_peer_authentications(namespace).next()
    }

    fn namespace_wide_peer_authentications<'s>(
        &'s self,
        namespace: &str,
    ) -> impl Iterator<Item = &'s PeerAuthentication> {
        let namespace = namespace.to_owned();
        self.peer_authentications
            .iter()
            .filter(move |p| p.selector.is_none() && p.id.namespace == namespace)
    }

    /// Policies with a selector matching the workload, in load order.
    fn workload_peer_authentications(
        &self,
        workload: &WorkloadRef<'_>,
    ) -> Vec<&PeerAuthentication> {
        self.peer_authentications
            .iter()
            .filter(|p| p.selector.is_some())
            .filter(|p| self.applies_to(&p.id, p.selector.as_ref(), workload))
            .collect()
    }

    /// Mesh-wide and namespace-wide `PeerAuthentication`s that compete, whatever the workload.
    fn tie_warnings(&self) -> Vec<String> {
        let mut by_namespace: BTreeMap<&str, Vec<&PolicyId>> = BTreeMap::new();
        for policy in self
            .peer_authentications
            .iter()
            .filter(|p| p.selector.is_none())
        {
            by_namespace
                .entry(policy.id.namespace.as_str())
                .or_default()
                .push(&policy.id);
        }
        by_namespace
            .into_iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|(namespace, ids)| {
                let what = if namespace == self.root_namespace {
                    "mesh-wide PeerAuthentications (root namespace, no selector) compete".to_owned()
                } else {
                    format!("namespace-wide PeerAuthentications of {namespace} compete")
                };
                tie_note(&what, ids.into_iter())
            })
            .collect()
    }
}

/// "<what>: a, b; using a, the first in file and document order (Istio uses the oldest)".
fn tie_note<'a>(what: &str, ids: impl Iterator<Item = &'a PolicyId>) -> String {
    let names: Vec<String> = ids.map(ToString::to_string).collect();
    let chosen = names.first().cloned().unwrap_or_default();
    format!(
        "{what}: {}; using {chosen}, the first in file and document order (Istio would use the \
         oldest)",
        names.join(", ")
    )
}

impl MtlsResolution {
    /// A set mode replaces the inherited one; `UNSET` (`None`) keeps it.
    fn apply(&mut self, mode: Option<MtlsMode>, scope: MtlsScope, id: &PolicyId) {
        if let Some(mode) = mode {
            self.mode = mode;
            self.scope = scope;
            self.policy = Some(id.to_string());
        }
    }
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { by: Some(policy) } => {
                write!(f, "allowed by AuthorizationPolicy {policy}")
            }
            Decision::Allow { by: None } => f.write_str("allowed (no ALLOW policy applies)"),
            Decision::Deny { by } => by.fmt(f),
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::Policy(policy) => write!(f, "denied by AuthorizationPolicy {policy}"),
            DenyReason::NoAllowMatch(policies) => {
                write!(f, "no ALLOW policy matched ({})", policies.join(", "))
            }
        }
    }
}

impl fmt::Display for MtlsScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsScope::Default => "default",
            MtlsScope::Mesh => "mesh",
            MtlsScope::Namespace => "namespace",
            MtlsScope::Workload => "workload",
            MtlsScope::Port => "port",
        })
    }
}
