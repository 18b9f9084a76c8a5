//! From Istio's documents (`schema.rs`) to the policies the agent evaluates (`model.rs`), with
//! Istio's own validation rules for what involves several fields.

use std::fmt;

use super::model::{
    Action, AuthorizationPolicy, Labels, MtlsMode, Operation, PeerAuthentication, PolicyId, Rule,
    Source,
};
use super::schema::{
    ActionSetting, AuthorizationPolicyDoc, Metadata, ModeSetting, OperationSpec,
    PeerAuthenticationDoc, RuleSpec, SourceSpec, WorkloadSelector,
};

const MAX_NAMESPACE_LEN: usize = 63;
const MAX_NAME_LEN: usize = 253;

/// A problem with a field, found after the document was read (so without a line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldProblem {
    pub(crate) field: String,
    pub(crate) message: String,
}

impl FieldProblem {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

type Checked<T> = Result<T, FieldProblem>;

pub(crate) fn peer_authentication(
    doc: PeerAuthenticationDoc,
    order: usize,
) -> Checked<PeerAuthentication> {
    let id = policy_id(&doc.metadata, order)?;
    let spec = doc.spec;
    let selector = selector(spec.selector)?;
    let mode = spec.mtls.map(|mtls| mtls.mode).unwrap_or_default();
    let port_modes = match spec.port_level_mtls {
        None => Default::default(),
        Some(_) if selector.is_none() => {
            return Err(FieldProblem::new(
                "spec.portLevelMtls",
                "port-level mTLS needs a workload selector (spec.selector.matchLabels): \
                 Istio does not allow it in mesh-wide or namespace-wide policies",
            ));
        }
        Some(ports) if ports.0.is_empty() => {
            return Err(FieldProblem::new(
                "spec.portLevelMtls",
                "must list at least one port when it is set",
            ));
        }
        Some(ports) => ports
            .0
            .into_iter()
            .map(|(port, mtls)| (port.0, resolved_mode(mtls.mode)))
            .collect(),
    };
    Ok(PeerAuthentication {
        id,
        selector,
        mode: resolved_mode(mode),
        port_modes,
    })
}

/// `None` for `UNSET`.
fn resolved_mode(setting: ModeSetting) -> Option<MtlsMode> {
    match setting {
        ModeSetting::Unset => None,
        ModeSetting::Strict => Some(MtlsMode::Strict),
        ModeSetting::Permissive => Some(MtlsMode::Permissive),
        ModeSetting::Disable => Some(MtlsMode::Disable),
    }
}

pub(crate) fn authorization_policy(
    doc: AuthorizationPolicyDoc,
    order: usize,
) -> Checked<AuthorizationPolicy> {
    let id = policy_id(&doc.metadata, order)?;
    let spec = doc.spec;
    let selector = selector(spec.selector)?;
    let action = match spec.action {
        ActionSetting::Allow => Action::Allow,
        ActionSetting::Deny => Action::Deny,
    };
    let rule_specs = spec.rules.unwrap_or_default();
    if action == Action::Deny && rule_specs.is_empty() {
        return Err(FieldProblem::new(
            "spec.rules",
            "a DENY policy without rules never matches (Istio rejects it): add `rules: [{}]` \
             to deny every connection",
        ));
    }
    let rules = rule_specs
        .into_iter()
        .enumerate()
        .map(|(index, spec)| rule(spec, &format!("spec.rules[{index}]")))
        .collect::<Checked<Vec<_>>>()?;
    Ok(AuthorizationPolicy {
        id,
        selector,
        action,
        rules,
    })
}

fn rule(spec: RuleSpec, path: &str) -> Checked<Rule> {
    let from = match spec.from {
        None => Vec::new(),
        Some(entries) if entries.is_empty() => {
            return Err(FieldProblem::new(
                format!("{path}.from"),
                "must not be empty; leave it out to match any source",
            ));
        }
        Some(entries) => entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let path = format!("{path}.from[{index}].source");
                let source_spec = entry.source.ok_or_else(|| {
                    FieldProblem::new(&path, "missing: each entry needs a source")
                })?;
                source(source_spec, &path)
            })
            .collect::<Checked<Vec<_>>>()?,
    };
    let to = match spec.to {
        None => Vec::new(),
        Some(entries) if entries.is_empty() => {
            return Err(FieldProblem::new(
                format!("{path}.to"),
                "must not be empty; leave it out to match any operation",
            ));
        }
        Some(entries) => entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let path = format!("{path}.to[{index}].operation");
                let operation_spec = entry.operation.ok_or_else(|| {
                    FieldProblem::new(&path, "missing: each entry needs an operation")
                })?;
                operation(operation_spec, &path)
            })
            .collect::<Checked<Vec<_>>>()?,
    };
    Ok(Rule { from, to })
}

fn source(spec: SourceSpec, path: &str) -> Checked<Source> {
    let source = Source {
        principals: spec.principals.into_iter().map(|p| p.0).collect(),
        not_principals: spec.not_principals.into_iter().map(|p| p.0).collect(),
        namespaces: spec.namespaces.into_iter().map(|n| n.0).collect(),
        not_namespaces: spec.not_namespaces.into_iter().map(|n| n.0).collect(),
        service_accounts: spec.service_accounts.into_iter().map(|s| s.0).collect(),
        not_service_accounts: spec.not_service_accounts.into_iter().map(|s| s.0).collect(),
        ip_blocks: spec.ip_blocks.into_iter().map(|b| b.0).collect(),
        not_ip_blocks: spec.not_ip_blocks.into_iter().map(|b| b.0).collect(),
    };
    let names_identities = !(source.principals.is_empty()
        && source.not_principals.is_empty()
        && source.namespaces.is_empty()
        && source.not_namespaces.is_empty());
    let names_service_accounts =
        !(source.service_accounts.is_empty() && source.not_service_accounts.is_empty());
    let names_ip_blocks = !(source.ip_blocks.is_empty() && source.not_ip_blocks.is_empty());
    if names_identities && names_service_accounts {
        return Err(FieldProblem::new(
            path,
            "serviceAccounts and notServiceAccounts cannot be combined with principals or \
             namespaces (Istio rejects it)",
        ));
    }
    if !(names_identities || names_service_accounts || names_ip_blocks) {
        return Err(FieldProblem::new(
            path,
            "must set at least one of principals, notPrincipals, namespaces, notNamespaces, \
             serviceAccounts, notServiceAccounts, ipBlocks, notIpBlocks",
        ));
    }
    Ok(source)
}

fn operation(spec: OperationSpec, path: &str) -> Checked<Operation> {
    if spec.ports.is_empty() && spec.not_ports.is_empty() {
        return Err(FieldProblem::new(path, "must set ports or notPorts"));
    }
    Ok(Operation {
        ports: spec.ports.into_iter().map(|p| p.0).collect(),
        not_ports: spec.not_ports.into_iter().map(|p| p.0).collect(),
    })
}

/// `matchLabels`, checked as Istio does; empty is the same as no selector.
fn selector(spec: Option<WorkloadSelector>) -> Checked<Option<Labels>> {
    let labels = spec.map(|s| s.match_labels.0).unwrap_or_default();
    for (key, value) in &labels {
        if key.is_empty() {
            return Err(FieldProblem::new(
                "spec.selector.matchLabels",
                format!("an empty label key is not allowed (in \"={value}\")"),
            ));
        }
        if key.contains('*') || value.contains('*') {
            return Err(FieldProblem::new(
                format!("spec.selector.matchLabels.{key}"),
                format!("wildcards are not supported in selectors (\"{key}={value}\")"),
            ));
        }
    }
    Ok(if labels.is_empty() {
        None
    } else {
        Some(labels)
    })
}

fn policy_id(metadata: &Metadata, order: usize) -> Checked<PolicyId> {
    let name = metadata.name.as_deref().unwrap_or_default();
    let namespace = metadata.namespace.as_deref().unwrap_or_default();
    if name.is_empty() {
        return Err(FieldProblem::new(
            "metadata.name",
            "missing: every policy needs a name",
        ));
    }
    if namespace.is_empty() {
        return Err(FieldProblem::new(
            "metadata.namespace",
            "missing: this agent has no default namespace, so every policy must name its own",
        ));
    }
    check_dns_name(name, MAX_NAME_LEN, true).map_err(|problem| {
        FieldProblem::new(
            "metadata.name",
            format!("{name:?} is not a valid name: {problem}"),
        )
    })?;
    check_dns_name(namespace, MAX_NAMESPACE_LEN, false).map_err(|problem| {
        FieldProblem::new(
            "metadata.namespace",
            format!("{namespace:?} is not a valid namespace: {problem}"),
        )
    })?;
    Ok(PolicyId {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        order,
    })
}

/// Kubernetes names: lowercase letters, digits and `-` (and `.` in object names), starting and
/// ending with a letter or a digit.
fn check_dns_name(value: &str, max_len: usize, dots_allowed: bool) -> Result<(), String> {
    if value.len() > max_len {
        return Err(format!("it is longer than {max_len} characters"));
    }
    let allowed = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots_allowed && c == '.')
    };
    if let Some(bad) = value.chars().find(|&c| !allowed(c)) {
        return Err(format!(
            "it has the character {bad:?}; use lowercase letters, digits and '-'{}",
            if dots_allowed { " or '.'" } else { "" }
        ));
    }
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !(alphanumeric(value.chars().next()) && alphanumeric(value.chars().last())) {
        return Err("it must start and end with a letter or a digit".to_owned());
    }
    Ok(())
}
