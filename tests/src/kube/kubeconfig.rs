//! Kubeconfig files for the control plane's clients.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::pki::{CertFiles, write_private};

/// How a kubeconfig's user proves who it is.
pub(crate) enum Credentials<'a> {
    ClientCertificate(&'a CertFiles),
    /// A bearer token (a ServiceAccount's, from the TokenRequest API).
    Token(&'a str),
}

/// Writes a kubeconfig with one cluster (`server`, trusted through the CA file `ca`), one
/// user and one context, the current one. Paths are absolute, so the file works from any
/// directory.
pub(crate) fn write(
    path: &Path,
    server: &str,
    ca: &Path,
    user: &str,
    credentials: Credentials<'_>,
) -> Result<()> {
    let user_entry: Value = match credentials {
        Credentials::ClientCertificate(files) => json!({
            "client-certificate": files.cert,
            "client-key": files.key,
        }),
        Credentials::Token(token) => json!({ "token": token }),
    };
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "mesh-tests",
            "cluster": { "server": server, "certificate-authority": ca },
        }],
        "users": [{ "name": user, "user": user_entry }],
        "contexts": [{
            "name": "mesh-tests",
            "context": { "cluster": "mesh-tests", "user": user },
        }],
        "current-context": "mesh-tests",
    });
    let text = serde_yaml_ng::to_string(&doc).context("serialize kubeconfig")?;
    write_private(path, &text)
}
