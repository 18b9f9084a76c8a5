//! Who is asking: a node, proved by a node credential (a TLS client certificate from the
//! node-credential CA whose serial is its node's current one) or by a Kubernetes service
//! account token (checked with TokenReview).

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::authz::PodWatch;
use super::nodes::{Registry, node_of_uri};

/// TokenReview's extra keys naming where a bound token's pod runs.
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// An authenticated agent: the node it speaks for, and who it is (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub node: String,
    /// The credential's subject, or the token's service account.
    pub caller: String,
}

/// Why no caller could be established; `caller` is what is known of who tried.
#[derive(Debug)]
pub struct AuthnFailure {
    pub caller: String,
    pub node: Option<String>,
    pub error: AuthnError,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    #[error("no credential: neither a node client certificate nor an authorization bearer token")]
    Missing,
    #[error("bearer tokens are not accepted: this CA does not run with Kubernetes")]
    TokensNotAccepted,
    #[error("node credentials are not accepted: this CA has no nodes directory")]
    CredentialsNotAccepted,
    #[error("the authorization metadata is not \"Bearer <token>\"")]
    MalformedAuthorization,
    #[error("the client certificate cannot be read: {0}")]
    BadCertificate(String),
    #[error("the client certificate is no node credential of this trust domain (URI SANs: {0:?})")]
    NotANodeCredential(Vec<String>),
    #[error("the credential of node {node} (serial {serial}) is revoked or replaced")]
    Revoked { node: String, serial: String },
    /// The API server could not be asked: not the caller's fault, it may retry.
    #[error("the token could not be reviewed: {0}")]
    ReviewUnavailable(String),
    #[error("the token is not valid: {0}")]
    TokenRejected(String),
    #[error("the token is not bound to the audience {0:?}")]
    WrongAudience(String),
    #[error("{0} is not a service account allowed to request certificates")]
    NotAnAgent(String),
    #[error("the token names no node (no node-name, nor a known running pod-name, in its claims)")]
    NoNode,
}

impl AuthnFailure {
    fn new(caller: impl Into<String>, error: AuthnError) -> Self {
        Self {
            caller: caller.into(),
            node: None,
            error,
        }
    }
}

/// Checks a client certificate (already verified by TLS to chain to the node-credential CA)
/// against the registry: one URI SAN naming a node, and its node's current serial.
pub fn node_of_certificate(
    leaf: &CertificateDer<'_>,
    trust_domain: &str,
    registry: &Registry,
) -> Result<Caller, AuthnFailure> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|err| AuthnFailure::new("unknown", AuthnError::BadCertificate(err.to_string())))?;
    let subject = cert.subject().to_string();
    let uris = uri_sans(&cert)
        .map_err(|reason| AuthnFailure::new(&subject, AuthnError::BadCertificate(reason)))?;
    let node = match &uris[..] {
        [uri] => node_of_uri(trust_domain, uri),
        _ => None,
    };
    let Some(node) = node else {
        return Err(AuthnFailure::new(
            &subject,
            AuthnError::NotANodeCredential(uris.clone()),
        ));
    };
    let serial = cert.raw_serial_as_string();
    if !registry.is_current(node, &serial) {
        return Err(AuthnFailure {
            caller: subject,
            node: Some(node.to_owned()),
            error: AuthnError::Revoked {
                node: node.to_owned(),
                serial,
            },
        });
    }
    Ok(Caller {
        node: node.to_owned(),
        caller: subject,
    })
}

fn uri_sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Vec<String>, String> {
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|err| err.to_string())?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// The token of `authorization: Bearer <token>`.
pub fn bearer_token(value: &str) -> Result<&str, AuthnError> {
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AuthnError::MalformedAuthorization)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthnError::MalformedAuthorization);
    }
    Ok(token)
}

/// Reviews agents' tokens with the API server.
pub struct TokenAuthenticator {
    reviews: Api<TokenReview>,
    policy: TokenPolicy,
    pods: Arc<PodWatch>,
}

/// What a reviewed token must satisfy.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    pub audience: String,
    /// `(namespace, name)` of agents' service accounts.
    pub agents: HashSet<(String, String)>,
}

impl TokenAuthenticator {
    pub fn new(client: kube::Client, policy: TokenPolicy, pods: Arc<PodWatch>) -> Self {
        Self {
            reviews: Api::all(client),
            policy,
            pods,
        }
    }

    /// One TokenReview per request: nothing is cached, so an expired or revoked token fails at
    /// once.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthnFailure> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![self.policy.audience.clone()]),
                token: token.to_owned(),
            },
            ..TokenReview::default()
        };
        let reviewed = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|err| {
                AuthnFailure::new("unknown", AuthnError::ReviewUnavailable(err.to_string()))
            })?;
        let status = reviewed.status.unwrap_or_default();
        evaluate_review(&status, &self.policy, |namespace, pod, uid| {
            self.pods.node_of_pod(namespace, pod, uid)
        })
    }
}

/// Decides on a TokenReview's answer. `node_of_pod(namespace, pod, uid)` says where a running
/// pod is scheduled, for tokens that name their pod but not their node.
pub fn evaluate_review(
    status: &TokenReviewStatus,
    policy: &TokenPolicy,
    node_of_pod: impl Fn(&str, &str, Option<&str>) -> Option<String>,
) -> Result<Caller, AuthnFailure> {
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let caller = if username.is_empty() {
        "unknown".to_owned()
    } else {
        username.clone()
    };
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".to_owned());
        return Err(AuthnFailure::new(caller, AuthnError::TokenRejected(reason)));
    }
    let audience_bound = status
        .audiences
        .as_ref()
        .is_some_and(|audiences| audiences.contains(&policy.audience));
    if !audience_bound {
        return Err(AuthnFailure::new(
            caller,
            AuthnError::WrongAudience(policy.audience.clone()),
        ));
    }
    let Some((namespace, account)) = service_account_of(&username) else {
        return Err(AuthnFailure::new(
            &caller,
            AuthnError::NotAnAgent(caller.clone()),
        ));
    };
    if !policy
        .agents
        .contains(&(namespace.to_owned(), account.to_owned()))
    {
        return Err(AuthnFailure::new(
            &caller,
            AuthnError::NotAnAgent(caller.clone()),
        ));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| {
        extra
            .get(key)
            .and_then(|values| values.first())
            .filter(|value| !value.is_empty())
            .cloned()
    };
    let node = first(EXTRA_NODE_NAME).or_else(|| {
        let pod = first(EXTRA_POD_NAME)?;
        node_of_pod(namespace, &pod, first(EXTRA_POD_UID).as_deref())
    });
    match node {
        Some(node) => Ok(Caller { node, caller }),
        None => Err(AuthnFailure::new(caller, AuthnError::NoNode)),
    }
}

/// `system:serviceaccount:<namespace>:<name>` → (namespace, name).
fn service_account_of(username: &str) -> Option<(&str, &str)> {
    let (namespace, name) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)?
        .split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some((namespace, name))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn policy() -> TokenPolicy {
        TokenPolicy {
            audience: "istio-ca".to_owned(),
            agents: [("mesh-system".to_owned(), "mesh-agent".to_owned())].into(),
        }
    }

    fn status(username: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..UserInfo::default()
            }),
        }
    }

    const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

    fn no_pods(_: &str, _: &str, _: Option<&str>) -> Option<String> {
        None
    }

    #[test]
    fn token_of_an_agent_names_its_node() {
        let caller = evaluate_review(
            &status(AGENT, &["istio-ca"], &[(EXTRA_NODE_NAME, "node-a")]),
            &policy(),
            no_pods,
        )
        .expect("granted");
        assert_eq!(caller.node, "node-a");
        assert_eq!(caller.caller, AGENT);
    }

    #[test]
    fn pod_name_is_resolved_through_the_pods() {
        let caller = evaluate_review(
            &status(
                AGENT,
                &["istio-ca"],
                &[(EXTRA_POD_NAME, "agent-x"), (EXTRA_POD_UID, "u1")],
            ),
            &policy(),
            |ns, pod, uid| {
                (ns == "mesh-system" && pod == "agent-x" && uid == Some("u1"))
                    .then(|| "node-b".to_owned())
            },
        )
        .expect("granted");
        assert_eq!(caller.node, "node-b");
    }

    #[test]
    fn refusals() {
        let mut unauthenticated = status(AGENT, &["istio-ca"], &[(EXTRA_NODE_NAME, "n")]);
        unauthenticated.authenticated = Some(false);
        unauthenticated.error = Some("token expired".to_owned());
        let cases = [
            (unauthenticated, "token expired"),
            (
                status(AGENT, &["kubernetes"], &[(EXTRA_NODE_NAME, "n")]),
                "audience",
            ),
            (
                status(
                    "system:serviceaccount:default:sleep",
                    &["istio-ca"],
                    &[(EXTRA_NODE_NAME, "n")],
                ),
                "not a service account allowed",
            ),
            (
                status("alice", &["istio-ca"], &[(EXTRA_NODE_NAME, "n")]),
                "not a service account allowed",
            ),
            (status(AGENT, &["istio-ca"], &[]), "names no node"),
            (
                status(AGENT, &["istio-ca"], &[(EXTRA_POD_NAME, "gone")]),
                "names no node",
            ),
        ];
        for (status, expected) in cases {
            let failure = evaluate_review(&status, &policy(), no_pods).expect_err(expected);
            assert!(
                failure.error.to_string().contains(expected),
                "{}",
                failure.error
            );
        }
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token("Bearer abc").expect("ok"), "abc");
        assert_eq!(bearer_token("bearer  abc ").expect("ok"), "abc");
        for bad in ["abc", "Basic abc", "Bearer ", "Bearer"] {
            assert!(bearer_token(bad).is_err(), "{bad}");
        }
    }
}
