//! Finding policy files, splitting them into documents, and reading each document as the kind it
//! says it is.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_yaml_ng::Value;

use super::compile::{self, FieldProblem};
use super::error::{DocumentLabel, Location, PolicyError, PolicyProblem};
use super::model::{AuthorizationPolicy, PeerAuthentication, PolicyId};
use super::schema::{
    API_VERSIONS, AUTHORIZATION_POLICY, AuthorizationPolicyDoc, Header, PEER_AUTHENTICATION,
    PeerAuthenticationDoc,
};

#[derive(Debug, Clone)]
pub(crate) enum Policy {
    Peer(PeerAuthentication),
    Authorization(AuthorizationPolicy),
}

impl Policy {
    fn kind(&self) -> &'static str {
        match self {
            Policy::Peer(_) => PEER_AUTHENTICATION,
            Policy::Authorization(_) => AUTHORIZATION_POLICY,
        }
    }

    fn id(&self) -> &PolicyId {
        match self {
            Policy::Peer(policy) => &policy.id,
            Policy::Authorization(policy) => &policy.id,
        }
    }
}

/// The policies of a path, in load order, and the files they came from.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) policies: Vec<Policy>,
    pub(crate) files: Vec<PathBuf>,
}

/// A policy and where it was written.
struct Located {
    policy: Policy,
    file: PathBuf,
    label: DocumentLabel,
}

/// The files `path` stands for: itself if it is a file (whatever its name), or the `*.yaml` and
/// `*.yml` files of a directory, sorted by name. Hidden files (`.name.yaml`, like the `..data`
/// entries of a Kubernetes ConfigMap volume) and subdirectories are not read. Symbolic links are
/// followed.
pub(crate) fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let metadata = fs::metadata(path).map_err(|source| read_error(path, source))?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(|source| read_error(path, source))? {
        let file = entry.map_err(|source| read_error(path, source))?.path();
        let is_file = fs::metadata(&file).is_ok_and(|m| m.is_file());
        if has_policy_file_name(&file) && is_file {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

fn has_policy_file_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Reads every file of `path`. The first file that cannot be read stops the load; files with
/// invalid policies are all reported, one problem each.
pub(crate) fn load(path: &Path) -> Result<Loaded, PolicyError> {
    let files = policy_files(path)?;
    let mut texts = Vec::with_capacity(files.len());
    for file in &files {
        let text = fs::read_to_string(file).map_err(|source| read_error(file, source))?;
        texts.push((file.clone(), text));
    }
    parse_files(
        texts
            .iter()
            .map(|(file, text)| (file.as_path(), text.as_str())),
    )
}

/// Parses files given as (name, text), in that order.
pub(crate) fn parse_files<'a>(
    files: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<Loaded, PolicyError> {
    let mut located = Vec::new();
    let mut problems = Vec::new();
    let mut names = Vec::new();
    for (file, text) in files {
        names.push(file.to_owned());
        match parse_file(text, file, located.len()) {
            Ok(policies) => located.extend(policies),
            Err(problem) => problems.push(*problem),
        }
    }
    problems.extend(duplicates(&located));
    if !problems.is_empty() {
        return Err(PolicyError::Invalid { problems });
    }
    Ok(Loaded {
        policies: located.into_iter().map(|l| l.policy).collect(),
        files: names,
    })
}

/// Every document of a file, or the first problem. Empty documents (only comments, or nothing
/// between two `---`) are skipped but keep their number: documents are numbered as the YAML
/// stream has them, from 1 (a comment before the first `---` is not a document).
fn parse_file(
    text: &str,
    file: &Path,
    first_order: usize,
) -> Result<Vec<Located>, Box<PolicyProblem>> {
    let headers = serde_yaml_ng::Deserializer::from_str(text);
    let bodies = serde_yaml_ng::Deserializer::from_str(text);
    let mut located = Vec::new();
    // After a syntax error the document iterators repeat the error forever: every path out of
    // this loop on an error returns.
    for (position, (header, body)) in headers.zip(bodies).enumerate() {
        let unnamed = DocumentLabel {
            index: position + 1,
            ..DocumentLabel::default()
        };
        let header = Option::<Header>::deserialize(header).map_err(|err| {
            Box::new(DocumentProblem::from_yaml(&err).locate(file, unnamed.clone()))
        })?;
        let Some(header) = header else {
            continue;
        };
        let label = label_of(&header, unnamed.index);
        let order = first_order + located.len();
        let policy = parse_document(&header, body, order)
            .map_err(|problem| Box::new(problem.locate(file, label.clone())))?;
        located.push(Located {
            policy,
            file: file.to_owned(),
            label,
        });
    }
    Ok(located)
}

fn parse_document(
    header: &Header,
    body: serde_yaml_ng::Deserializer<'_>,
    order: usize,
) -> Result<Policy, DocumentProblem> {
    let yaml_problem = |err: serde_yaml_ng::Error| DocumentProblem::from_yaml(&err);
    match kind_of(header)? {
        Kind::PeerAuthentication => {
            let doc = PeerAuthenticationDoc::deserialize(body).map_err(yaml_problem)?;
            Ok(Policy::Peer(compile::peer_authentication(doc, order)?))
        }
        Kind::AuthorizationPolicy => {
            let doc = AuthorizationPolicyDoc::deserialize(body).map_err(yaml_problem)?;
            Ok(Policy::Authorization(compile::authorization_policy(
                doc, order,
            )?))
        }
    }
}

enum Kind {
    PeerAuthentication,
    AuthorizationPolicy,
}

/// `PeerAuthentication` or `AuthorizationPolicy`; anything else is refused, with a hint for the
/// resources users of older Istio releases (and of the seed tutorial) reach for.
fn kind_of(header: &Header) -> Result<Kind, DocumentProblem> {
    let kind = match &header.kind {
        None => return Err(DocumentProblem::field("kind", missing_kind_message())),
        Some(value) => value
            .as_str()
            .ok_or_else(|| DocumentProblem::field("kind", "must be a string".to_owned()))?,
    };
    match kind {
        PEER_AUTHENTICATION => Ok(Kind::PeerAuthentication),
        AUTHORIZATION_POLICY => Ok(Kind::AuthorizationPolicy),
        other => {
            let api_version = header.api_version.as_ref().and_then(Value::as_str);
            Err(DocumentProblem::field(
                "kind",
                unknown_kind_message(other, api_version),
            ))
        }
    }
}

fn missing_kind_message() -> String {
    format!("missing: expected {PEER_AUTHENTICATION} or {AUTHORIZATION_POLICY}")
}

fn unknown_kind_message(kind: &str, api_version: Option<&str>) -> String {
    let written = match api_version {
        Some(api_version) => format!("{kind:?} ({api_version})"),
        None => format!("{kind:?}"),
    };
    let hint = match kind {
        "Policy" | "MeshPolicy" => {
            "; the authentication.istio.io/v1alpha1 API was removed from Istio: write a \
             PeerAuthentication instead"
        }
        "DestinationRule" => {
            "; no DestinationRule is needed: connections between mesh workloads are upgraded to \
             mutual TLS automatically"
        }
        "RequestAuthentication" => "; it validates JWTs, which needs L7: not supported",
        _ => "",
    };
    format!(
        "unknown kind {written}: this agent reads {PEER_AUTHENTICATION} and \
         {AUTHORIZATION_POLICY} ({}){hint}",
        API_VERSIONS.join(" or ")
    )
}

fn label_of(header: &Header, index: usize) -> DocumentLabel {
    let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_owned);
    let metadata = header.metadata.as_ref();
    DocumentLabel {
        index,
        kind: text(header.kind.as_ref()),
        namespace: text(metadata.and_then(|m| m.get("namespace"))),
        name: text(metadata.and_then(|m| m.get("name"))),
    }
}

/// Two documents defining the same object: Kubernetes would keep one of them, and which one
/// would depend on the order they were applied in.
fn duplicates(located: &[Located]) -> Vec<PolicyProblem> {
    let mut first_seen: HashMap<(&str, &str, &str), &Located> = HashMap::new();
    let mut problems = Vec::new();
    for entry in located {
        let id = entry.policy.id();
        let key = (entry.policy.kind(), id.namespace.as_str(), id.name.as_str());
        match first_seen.get(&key) {
            None => {
                first_seen.insert(key, entry);
            }
            Some(first) => problems.push(PolicyProblem {
                file: entry.file.clone(),
                document: Some(entry.label.clone()),
                message: format!(
                    "metadata.name: {} {id} is defined twice; the first is in {}, document {}",
                    entry.policy.kind(),
                    first.file.display(),
                    first.label.index
                ),
                location: None,
            }),
        }
    }
    problems
}

/// A problem inside one document, before it is placed in its file.
struct DocumentProblem {
    message: String,
    location: Option<Location>,
}

impl DocumentProblem {
    fn field(field: &str, message: String) -> Self {
        Self {
            message: format!("{field}: {message}"),
            location: None,
        }
    }

    fn from_yaml(err: &serde_yaml_ng::Error) -> Self {
        let location = err.location().map(|at| Location {
            line: at.line(),
            column: at.column(),
        });
        let message = err.to_string();
        let message = match location {
            Some(at) => without_location(&message, at),
            None => message,
        };
        Self { message, location }
    }

    fn locate(self, file: &Path, label: DocumentLabel) -> PolicyProblem {
        PolicyProblem {
            file: file.to_owned(),
            document: Some(label),
            message: self.message,
            location: self.location,
        }
    }
}

impl From<FieldProblem> for DocumentProblem {
    fn from(problem: FieldProblem) -> Self {
        Self {
            message: problem.to_string(),
            location: None,
        }
    }
}

/// serde_yaml_ng writes " at line L column C" into its messages (at the end, or before the
/// parser's context); the location is kept apart.
fn without_location(message: &str, at: Location) -> String {
    let written = format!(" at line {} column {}", at.line, at.column);
    message.replacen(&written, "", 1)
}

fn read_error(path: &Path, source: std::io::Error) -> PolicyError {
    PolicyError::Read {
        path: path.to_owned(),
        source,
    }
}
