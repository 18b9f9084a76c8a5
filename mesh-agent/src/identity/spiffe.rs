//! SPIFFE IDs in Istio's form: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_NAMESPACE_LEN: usize = 63;
const MAX_SERVICE_ACCOUNT_LEN: usize = 253;

/// A workload identity: the trust domain, the Kubernetes namespace and the service account.
///
/// Every value is validated when it is built ([`SpiffeId::new`] or [`str::parse`]), so a
/// `SpiffeId` always prints as a well-formed URI.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a SPIFFE ID of the form this mesh uses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID {0:?} does not start with \"spiffe://\"")]
    WrongScheme(String),
    #[error("SPIFFE ID {0:?} has no trust domain")]
    MissingTrustDomain(String),
    #[error("SPIFFE ID {0:?} does not have the path /ns/<namespace>/sa/<service-account>")]
    UnexpectedPath(String),
    #[error("invalid trust domain {value:?}: {problem}")]
    InvalidTrustDomain { value: String, problem: NameProblem },
    #[error("invalid namespace {value:?}: {problem}")]
    InvalidNamespace { value: String, problem: NameProblem },
    #[error("invalid service account {value:?}: {problem}")]
    InvalidServiceAccount { value: String, problem: NameProblem },
}

/// What is wrong with one part (trust domain, namespace, service account) of a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is longer than {max} characters")]
    TooLong { max: usize },
    #[error("it has the uppercase character {0:?} (names are lowercase)")]
    Uppercase(char),
    #[error("it has the character {0:?}, which is not allowed")]
    InvalidCharacter(char),
    #[error("it must start and end with a lowercase letter or a digit")]
    BadEdge,
}

impl SpiffeId {
    /// Builds an ID from its parts, checking each one.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let (trust_domain, namespace, service_account) = (
            trust_domain.into(),
            namespace.into(),
            service_account.into(),
        );
        validate_trust_domain(&trust_domain)?;
        check_namespace(&namespace).map_err(|problem| SpiffeIdError::InvalidNamespace {
            value: namespace.clone(),
            problem,
        })?;
        check_service_account(&service_account).map_err(|problem| {
            SpiffeIdError::InvalidServiceAccount {
                value: service_account.clone(),
                problem,
            }
        })?;
        Ok(Self {
            trust_domain,
            namespace,
            service_account,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

/// Checks a trust domain: lowercase letters, digits, `.`, `-` and `_`, as the SPIFFE standard
/// allows.
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    check_trust_domain(trust_domain).map_err(|problem| SpiffeIdError::InvalidTrustDomain {
        value: trust_domain.to_owned(),
        problem,
    })
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        if uri.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::WrongScheme(uri.to_owned()))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if trust_domain.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain(uri.to_owned()));
        }
        let (namespace, service_account) =
            split_istio_path(path).ok_or_else(|| SpiffeIdError::UnexpectedPath(uri.to_owned()))?;
        SpiffeId::new(trust_domain, namespace, service_account)
    }
}

/// `ns/<namespace>/sa/<service-account>` (the path without its leading slash) into its two names.
fn split_istio_path(path: &str) -> Option<(&str, &str)> {
    let mut segments = path.split('/');
    let parts = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    );
    match parts {
        (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
            Some((namespace, service_account))
        }
        _ => None,
    }
}

fn check_trust_domain(value: &str) -> Result<(), NameProblem> {
    check_length(value, MAX_TRUST_DOMAIN_LEN)?;
    check_characters(value, |c| matches!(c, '.' | '-' | '_'))
}

/// A Kubernetes namespace is an RFC 1123 label.
fn check_namespace(value: &str) -> Result<(), NameProblem> {
    check_length(value, MAX_NAMESPACE_LEN)?;
    check_characters(value, |c| c == '-')?;
    check_edges(value)
}

/// A Kubernetes service account name is an RFC 1123 subdomain.
fn check_service_account(value: &str) -> Result<(), NameProblem> {
    check_length(value, MAX_SERVICE_ACCOUNT_LEN)?;
    check_characters(value, |c| matches!(c, '-' | '.'))?;
    check_edges(value)
}

fn check_length(value: &str, max: usize) -> Result<(), NameProblem> {
    match value.len() {
        0 => Err(NameProblem::Empty),
        len if len > max => Err(NameProblem::TooLong { max }),
        _ => Ok(()),
    }
}

fn check_characters(
    value: &str,
    allowed_punctuation: impl Fn(char) -> bool,
) -> Result<(), NameProblem> {
    for c in value.chars() {
        if c.is_ascii_uppercase() {
            return Err(NameProblem::Uppercase(c));
        }
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || allowed_punctuation(c)) {
            return Err(NameProblem::InvalidCharacter(c));
        }
    }
    Ok(())
}

fn check_edges(value: &str) -> Result<(), NameProblem> {
    let is_alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if is_alphanumeric(value.chars().next()) && is_alphanumeric(value.chars().last()) {
        Ok(())
    } else {
        Err(NameProblem::BadEdge)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let uri = String::deserialize(deserializer)?;
        uri.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let uri = "spiffe://cluster.local/ns/default/sa/sleep-v1.x";
        let id: SpiffeId = uri.parse().expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep-v1.x");
        assert_eq!(id.to_string(), uri);
        assert_eq!(
            SpiffeId::new("cluster.local", "default", "sleep-v1.x"),
            Ok(id)
        );
    }

    #[test]
    fn rejects_malformed_ids_with_their_reason() {
        type IsExpected = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, IsExpected)] = &[
            ("", |e| *e == SpiffeIdError::Empty),
            ("http://td/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::WrongScheme(_))
            }),
            ("SPIFFE://td/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::WrongScheme(_))
            }),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::MissingTrustDomain(_))
            }),
            ("spiffe://td", |e| {
                matches!(e, SpiffeIdError::UnexpectedPath(_))
            }),
            ("spiffe://td/ns/a", |e| {
                matches!(e, SpiffeIdError::UnexpectedPath(_))
            }),
            ("spiffe://td/ns/a/sa/b/extra", |e| {
                matches!(e, SpiffeIdError::UnexpectedPath(_))
            }),
            ("spiffe://td/ns/a/sa/b/", |e| {
                matches!(e, SpiffeIdError::UnexpectedPath(_))
            }),
            ("spiffe://td/sa/b/ns/a", |e| {
                matches!(e, SpiffeIdError::UnexpectedPath(_))
            }),
            ("spiffe://td/ns//sa/b", |e| {
                matches!(
                    e,
                    SpiffeIdError::InvalidNamespace {
                        problem: NameProblem::Empty,
                        ..
                    }
                )
            }),
            ("spiffe://Cluster.local/ns/a/sa/b", |e| {
                matches!(
                    e,
                    SpiffeIdError::InvalidTrustDomain {
                        problem: NameProblem::Uppercase('C'),
                        ..
                    }
                )
            }),
            ("spiffe://td:8080/ns/a/sa/b", |e| {
                matches!(
                    e,
                    SpiffeIdError::InvalidTrustDomain {
                        problem: NameProblem::InvalidCharacter(':'),
                        ..
                    }
                )
            }),
            ("spiffe://td/ns/Default/sa/b", |e| {
                matches!(
                    e,
                    SpiffeIdError::InvalidNamespace {
                        problem: NameProblem::Uppercase('D'),
                        ..
                    }
                )
            }),
            ("spiffe://td/ns/a.b/sa/b", |e| {
                matches!(
                    e,
                    SpiffeIdError::InvalidNamespace {
                        problem: NameProblem::InvalidCharacter('.'),
                        ..
                    }
                )
            }),
            ("spiffe://td/ns/-a/sa/b", |e| {
                matches!(
                    e,
                    SpiffeIdError::InvalidNamespace {
                        problem: NameProblem::BadEdge,
                        ..
                    }
                )
            }),
            ("spiffe://td/ns/a/sa/b?x=1", |e| {
                matches!(
                    e,
                    SpiffeIdError::InvalidServiceAccount {
                        problem: NameProblem::InvalidCharacter('?'),
                        ..
                    }
                )
            }),
        ];
        for (uri, is_expected) in cases {
            let err = uri.parse::<SpiffeId>().expect_err(uri);
            assert!(is_expected(&err), "{uri:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn rejects_overlong_namespace() {
        let namespace = "a".repeat(64);
        let err = SpiffeId::new("td", namespace, "sa").expect_err("too long");
        assert!(matches!(
            err,
            SpiffeIdError::InvalidNamespace {
                problem: NameProblem::TooLong { max: 63 },
                ..
            }
        ));
    }

    #[test]
    fn serializes_as_uri_string() {
        let id = SpiffeId::new("td", "ns1", "sa1").expect("valid");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"spiffe://td/ns/ns1/sa/sa1\"");
        let back: SpiffeId = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/ns/x\"").is_err());
    }
}
