//! The chained CNI plugin `mesh-cni`: hands every new pod's sandbox to the node's mesh-agent and
//! lets the pod start only once the agent has enrolled it (or decided it is not in the mesh).
//!
//! The library holds what the agent shares with the plugin ([`protocol`]) and the installer the
//! DaemonSet runs to chain the plugin into the node's network config ([`installer`]); the binary
//! is the plugin itself.

pub mod installer;
pub mod protocol;

/// The `type` of the plugin's entry in a conflist, which is also the name of its binary in the
/// CNI bin dir (the runtime finds a plugin by its type).
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// The CNI spec version the plugin implements.
pub const CNI_VERSION: &str = "1.0.0";

/// Network config versions the plugin accepts: those whose results list addresses as
/// `ips[].address`, which is where the plugin reads the pod's IPs.
pub const SUPPORTED_CNI_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// How long the plugin waits for the agent when the config does not say: enrolment takes
/// milliseconds, but an agent that is starting (or catching up with the API server) may take a
/// while to answer, and the runtime's own deadline for a sandbox is minutes.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
