//! The tutorial's manifests, `deploy/examples/tutorial/`: what `kubectl` applies on
//! Kubernetes, and on the file-based cluster the source of the servers' command lines and of
//! the policies written to the agents' policy directory, so that both modes run the same
//! application under the same policies.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::kube::deploy_dir;

/// A policy of the story, as a manifest of the tutorial.
#[derive(Debug)]
pub struct Manifest {
    /// Its file in [`dir`].
    pub file: &'static str,
    /// The object's kind and name (in [`super::NAMESPACE`]).
    pub kind: &'static str,
    pub name: &'static str,
    /// The file's text.
    pub yaml: &'static str,
}

/// The story's `preference-mutualtls` in STRICT mode.
pub const STRICT: Manifest = Manifest {
    file: "peer-authentication-strict.yaml",
    kind: "PeerAuthentication",
    name: super::PEER_AUTHENTICATION,
    yaml: include_str!("../../../deploy/examples/tutorial/peer-authentication-strict.yaml"),
};

/// The same PeerAuthentication back in PERMISSIVE mode.
pub const PERMISSIVE: Manifest = Manifest {
    file: "peer-authentication-permissive.yaml",
    kind: "PeerAuthentication",
    name: super::PEER_AUTHENTICATION,
    yaml: include_str!("../../../deploy/examples/tutorial/peer-authentication-permissive.yaml"),
};

/// ALLOW for preference, with customer's identity as the only principal.
pub const ALLOW_ONLY_CUSTOMER: Manifest = Manifest {
    file: "authorization-policy.yaml",
    kind: "AuthorizationPolicy",
    name: super::AUTHORIZATION_POLICY,
    yaml: include_str!("../../../deploy/examples/tutorial/authorization-policy.yaml"),
};

/// The manifests whose Deployments file mode runs the servers of.
const SERVERS: [&str; 2] = [
    include_str!("../../../deploy/examples/tutorial/preference.yaml"),
    include_str!("../../../deploy/examples/tutorial/recommendation.yaml"),
];

/// `deploy/examples/tutorial/`, for `kubectl apply -k` and `-f`.
pub fn dir() -> PathBuf {
    deploy_dir().join("examples/tutorial")
}

/// The command line (`command`, then `args`) of the first container of the Deployment `name`.
pub fn command_of(name: &str) -> Result<Vec<String>> {
    for text in SERVERS {
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let object = Value::deserialize(document).context("parse a tutorial manifest")?;
            if object["kind"].as_str() == Some("Deployment")
                && object["metadata"]["name"].as_str() == Some(name)
            {
                return container_command(&object["spec"]["template"]["spec"]["containers"][0])
                    .with_context(|| format!("the Deployment {name}"));
            }
        }
    }
    bail!("no Deployment {name} in the tutorial's manifests")
}

fn container_command(container: &Value) -> Result<Vec<String>> {
    let words = |key: &str| -> Result<Vec<String>> {
        let Some(list) = container.get(key) else {
            return Ok(Vec::new());
        };
        list.as_sequence()
            .with_context(|| format!("{key} is not a list"))?
            .iter()
            .map(|w| w.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .with_context(|| format!("{key} has a word that is not a string"))
    };
    let mut line = words("command")?;
    line.extend(words("args")?);
    if line.is_empty() {
        bail!("its container has no command");
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The constants say what the files hold.
    #[test]
    fn the_policy_manifests_are_what_their_constants_say() {
        for m in [&STRICT, &PERMISSIVE, &ALLOW_ONLY_CUSTOMER] {
            let object: Value = serde_yaml_ng::from_str(m.yaml).expect(m.file);
            assert_eq!(object["kind"].as_str(), Some(m.kind), "{}", m.file);
            assert_eq!(
                object["metadata"]["name"].as_str(),
                Some(m.name),
                "{}",
                m.file
            );
            let namespace = object["metadata"]["namespace"].as_str();
            assert_eq!(namespace, Some(super::super::NAMESPACE), "{}", m.file);
            assert!(dir().join(m.file).is_file(), "{}", m.file);
        }
    }

    #[test]
    fn the_servers_run_python_with_their_answers() {
        let recommendation = command_of("recommendation-v2").unwrap();
        assert_eq!(recommendation[..3], ["python3", "-u", "-c"]);
        assert_eq!(
            recommendation[4..],
            ["recommendation v2 from recommendation-v2", "8080"]
        );
        let preference = command_of("preference").unwrap();
        assert_eq!(
            preference[4..],
            ["preference", "8080", "http://recommendation:8080/"]
        );
    }
}
