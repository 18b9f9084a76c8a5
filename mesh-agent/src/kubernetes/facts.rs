//! What the agent keeps of each API object: the few fields routing, identity and enrolment
//! read, taken once when the object arrives (a node watches every pod of the cluster; keeping
//! whole objects would cost far more memory).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The label that puts a namespace or a pod in the mesh, as in Istio ambient.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// From the status; empty until the pod's sandbox is up.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// Succeeded or Failed: its containers are gone for good.
    pub finished: bool,
    /// Being deleted (still running until its kubelet says it is gone).
    pub deleting: bool,
    pub qos_class: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceFacts {
    pub name: String,
    pub ambient: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortFacts>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortFacts {
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per endpoint through the EndpointSlices.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFacts {
    pub namespace: String,
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: String,
    /// (port name, port number)
    pub ports: Vec<(Option<String>, u16)>,
    /// Addresses of ready endpoints.
    pub ready: Vec<IpAddr>,
}

/// Why an object is left out of the mesh's view (logged once per object version).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FactsError {
    #[error("the object has no {0}")]
    Missing(&'static str),
    #[error("{field}: {value:?} is not an IP address")]
    BadIp { field: &'static str, value: String },
    #[error("port {0} is out of range")]
    BadPort(i32),
}

impl PodFacts {
    pub fn of(pod: &Pod) -> Result<Self, FactsError> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref().ok_or(FactsError::Missing("spec"))?;
        let status = pod.status.as_ref();
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| parse_ip("status.podIPs", &ip.ip))
            .collect::<Result<Vec<_>, _>>()?;
        let phase = status.and_then(|s| s.phase.as_deref());
        Ok(Self {
            uid: required(&meta.uid, "metadata.uid")?,
            namespace: required(&meta.namespace, "metadata.namespace")?,
            name: required(&meta.name, "metadata.name")?,
            node: spec.node_name.clone(),
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            labels: meta.labels.clone().unwrap_or_default(),
            ips,
            host_network: spec.host_network == Some(true),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            deleting: meta.deletion_timestamp.is_some(),
            qos_class: status.and_then(|s| s.qos_class.clone()),
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Enrolled as Istio ambient decides it: the pod's own label wins (`none` opts out,
    /// `ambient` opts in), else its namespace's; host-network pods never (their sockets are the
    /// node's).
    pub fn in_mesh(&self, namespace_ambient: bool) -> bool {
        if self.host_network || self.finished {
            return false;
        }
        match self.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some(DATAPLANE_MODE_NONE) => false,
            Some(DATAPLANE_MODE_AMBIENT) => true,
            _ => namespace_ambient,
        }
    }
}

impl NamespaceFacts {
    pub fn of(namespace: &Namespace) -> Result<Self, FactsError> {
        let meta = &namespace.metadata;
        Ok(Self {
            name: required(&meta.name, "metadata.name")?,
            ambient: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|mode| mode == DATAPLANE_MODE_AMBIENT),
        })
    }
}

impl ServiceFacts {
    /// `None` for Services without virtual IPs (headless, ExternalName): the mesh routes
    /// their clients' connections by the endpoint IPs they resolve to.
    pub fn of(service: &Service) -> Result<Option<Self>, FactsError> {
        let meta = &service.metadata;
        let Some(spec) = &service.spec else {
            return Ok(None);
        };
        let cluster_ips = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter(|ip| !ip.is_empty() && *ip != "None")
            .map(|ip| parse_ip("spec.clusterIPs", ip))
            .collect::<Result<Vec<_>, _>>()?;
        let mut unique = Vec::new();
        for ip in cluster_ips {
            if !unique.contains(&ip) {
                unique.push(ip);
            }
        }
        if unique.is_empty() || spec.type_.as_deref() == Some("ExternalName") {
            return Ok(None);
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .map(|p| {
                let port = port_number(p.port)?;
                let target = match &p.target_port {
                    None => TargetPort::Number(port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n)?),
                    Some(IntOrString::String(name)) => match name.parse::<i32>() {
                        Ok(n) => TargetPort::Number(port_number(n)?),
                        Err(_) => TargetPort::Named(name.clone()),
                    },
                };
                Ok(ServicePortFacts {
                    name: p.name.clone(),
                    port,
                    target,
                })
            })
            .collect::<Result<Vec<_>, FactsError>>()?;
        Ok(Some(Self {
            namespace: required(&meta.namespace, "metadata.namespace")?,
            name: required(&meta.name, "metadata.name")?,
            cluster_ips: unique,
            ports,
            selector: spec.selector.clone().unwrap_or_default(),
        }))
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl SliceFacts {
    /// `None` for slices of no Service.
    pub fn of(slice: &EndpointSlice) -> Result<Option<Self>, FactsError> {
        let meta = &slice.metadata;
        let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            return Ok(None);
        };
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| Some((p.name.clone(), p.port?)))
            .map(|(name, port)| Ok((name, port_number(port)?)))
            .collect::<Result<Vec<_>, FactsError>>()?;
        let mut ready = Vec::new();
        for endpoint in slice.endpoints.iter().flatten() {
            // Kubernetes: an endpoint without `ready` is ready.
            let is_ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !is_ready {
                continue;
            }
            for address in &endpoint.addresses {
                ready.push(parse_ip("endpoints.addresses", address)?);
            }
        }
        Ok(Some(Self {
            namespace: required(&meta.namespace, "metadata.namespace")?,
            service: service.clone(),
            ports,
            ready,
        }))
    }

    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.service)
    }
}

/// A metadata field every object of the API has; its absence makes the object unusable.
fn required(value: &Option<String>, field: &'static str) -> Result<String, FactsError> {
    value.clone().ok_or(FactsError::Missing(field))
}

fn parse_ip(field: &'static str, value: &str) -> Result<IpAddr, FactsError> {
    value.parse().map_err(|_| FactsError::BadIp {
        field,
        value: value.to_owned(),
    })
}

fn port_number(port: i32) -> Result<u16, FactsError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(FactsError::BadPort(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)]) -> PodFacts {
        PodFacts {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            node: Some("n".into()),
            service_account: "sa".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ips: Vec::new(),
            host_network: false,
            finished: false,
            deleting: false,
            qos_class: None,
        }
    }

    #[test]
    fn enrolment_follows_istio_ambient() {
        assert!(pod(&[]).in_mesh(true));
        assert!(!pod(&[]).in_mesh(false));
        assert!(!pod(&[(DATAPLANE_MODE_LABEL, "none")]).in_mesh(true));
        assert!(pod(&[(DATAPLANE_MODE_LABEL, "ambient")]).in_mesh(false));
        let mut host = pod(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        host.host_network = true;
        assert!(!host.in_mesh(true));
    }
}
