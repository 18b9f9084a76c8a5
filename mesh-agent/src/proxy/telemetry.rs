//! Istio's TCP metrics for the connections the proxy handles, labelled from what the agent
//! knows: workloads by the cluster file, principals by verified certificates. What it does not
//! know stays `unknown`, as in Istio. [`super::record`] counts them.

use crate::{
    admin::{ConnectionLabels, Reporter, SecurityPolicy},
    identity::SpiffeId,
    workload::Workload,
};

/// One end of a connection, as far as the agent can name it.
#[derive(Clone, Copy, Default)]
pub struct Party<'a> {
    pub workload: Option<&'a Workload>,
    pub principal: Option<&'a SpiffeId>,
}

/// The labels of a connection secured as `security` says.
pub fn connection_labels(
    reporter: Reporter,
    source: Party<'_>,
    destination: Party<'_>,
    security: SecurityPolicy,
) -> ConnectionLabels {
    let mut labels = ConnectionLabels::new(reporter);
    if let Some(workload) = source.workload {
        labels.source_workload = workload.name.to_string();
        labels.source_workload_namespace = workload.namespace.to_string();
        labels.source_app = app_of(workload);
    }
    if let Some(workload) = destination.workload {
        labels.destination_workload = workload.name.to_string();
        labels.destination_workload_namespace = workload.namespace.to_string();
    }
    if let Some(principal) = source.principal {
        labels.source_principal = principal.to_string();
    }
    if let Some(principal) = destination.principal {
        labels.destination_principal = principal.to_string();
    }
    labels.connection_security_policy = security;
    labels
}

fn app_of(workload: &Workload) -> String {
    workload
        .labels
        .get("app")
        .cloned()
        .unwrap_or_else(|| crate::admin::UNKNOWN.to_owned())
}
