//! istiod as the CA of a [`super::KubeMesh`] (deploy/istiod/): Istio's `pilot-discovery`,
//! built from istio.io/istio by `cargo xtask setup`, run in the control plane's network
//! namespace as [`super::ca`] runs the mesh's CA, with what an Istio install gives it for the
//! agents to be its node agents:
//!
//! - `CA_TRUSTED_NODE_ACCOUNTS=mesh-system/mesh-agent` (docs/kubernetes.md, "istiod as the
//!   CA"), so its node authorizer lets the agents ask for their own node's pods' identities;
//! - its namespace `istio-system`, where it keeps its self-signed root (Secret
//!   `istio-ca-secret`) and from which it publishes the ConfigMap `istio-ca-root-cert` in
//!   every namespace;
//! - the mesh's trust domain in its mesh config.
//!
//! It runs with the cluster's admin credentials: its own RBAC is Istio's chart's, not this
//! project's to test.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, Result};

use super::ca::{CA_GRPC_PORT, Launch};

/// istiod's namespace and the ConfigMap (and its key) with its root it publishes in each.
pub const ISTIO_NAMESPACE: &str = "istio-system";
pub const ISTIO_ROOTS_CONFIGMAP: &str = "istio-ca-root-cert";
pub const ISTIO_ROOTS_KEY: &str = "root-cert.pem";
/// The name on istiod's serving certificate the agents check (the Service's).
pub const ISTIOD_SERVER_NAME: &str = "istiod.istio-system.svc";
/// Its HTTP port (`/ready`), on loopback.
const ISTIOD_HTTP_PORT: u16 = 8080;

/// Writes istiod's mesh config into `dir` and says how to run it.
pub(super) fn launch(dir: &Path, admin_kubeconfig: &Path, trust_domain: &str) -> Result<Launch> {
    crate::sys::mkdir_all(dir)?;
    let mesh_config = dir.join("mesh.yaml");
    std::fs::write(&mesh_config, format!("trustDomain: {trust_domain}\n"))
        .with_context(|| format!("write {}", mesh_config.display()))?;
    let flag =
        |name: &str, value: &dyn std::fmt::Display| OsString::from(format!("--{name}={value}"));
    let args = vec![
        OsString::from("discovery"),
        flag("kubeconfig", &admin_kubeconfig.display()),
        flag("meshConfig", &mesh_config.display()),
        flag("secureGRPCAddr", &format!(":{CA_GRPC_PORT}")),
        // Everything else on loopback, out of the agents' way.
        flag("httpAddr", &format!("127.0.0.1:{ISTIOD_HTTP_PORT}")),
        flag("grpcAddr", &"127.0.0.1:15010"),
        flag("httpsAddr", &"127.0.0.1:15017"),
        flag("monitoringAddr", &"127.0.0.1:15014"),
        flag("ctrlz_port", &9876),
        OsString::from("--log_as_json"),
        flag("log_output_level", &"default:info,serverca:debug"),
    ];
    let env = [
        ("PATH", "/usr/bin:/bin".into()),
        ("HOME", dir.display().to_string()),
        ("POD_NAMESPACE", ISTIO_NAMESPACE.into()),
        ("CA_TRUSTED_NODE_ACCOUNTS", "mesh-system/mesh-agent".into()),
    ]
    .into_iter()
    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
    .collect();
    Ok(Launch {
        program: super::tool("pilot-discovery")?,
        args,
        env,
        ready_port: ISTIOD_HTTP_PORT,
        ready_path: "/ready".to_owned(),
    })
}
