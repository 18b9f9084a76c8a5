//! Policies written as users write them for Istio, and what the agent makes of them.

mod authz;
mod errors;
mod loading;
mod mtls;
mod patterns;
mod watch;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use crate::identity::SpiffeId;

use super::*;

const ROOT: &str = "istio-system";
const TD: &str = "cluster.local";

/// A `PeerAuthentication` document; `spec` is YAML at the left margin.
fn peer_auth(namespace: &str, name: &str, spec: &str) -> String {
    document("PeerAuthentication", namespace, name, spec)
}

/// An `AuthorizationPolicy` document; `spec` is YAML at the left margin.
fn authz_policy(namespace: &str, name: &str, spec: &str) -> String {
    document("AuthorizationPolicy", namespace, name, spec)
}

fn document(kind: &str, namespace: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|line| format!("  {line}\n")).collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  \
         namespace: {namespace}\nspec:\n{spec}"
    )
}

/// Documents joined into one multi-document file.
fn file(documents: &[String]) -> String {
    documents.join("---\n")
}

fn parse(text: &str) -> Result<PolicySet, PolicyError> {
    PolicySet::from_yaml(text, Path::new("policy.yaml"), ROOT)
}

fn set(documents: &[String]) -> PolicySet {
    parse(&file(documents)).unwrap_or_else(|err| panic!("policy should load:\n{err}"))
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("policy should be rejected:\n{text}"),
        Err(err) => err.to_string(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn spiffe(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new(TD, namespace, service_account).expect("valid test identity")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("valid test IP")
}
