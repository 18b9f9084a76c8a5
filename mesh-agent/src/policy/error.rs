//! Why policy files are rejected, named down to the file, the document, the field and the line.

use std::fmt;
use std::path::PathBuf;

/// Why a policy set could not be loaded. Nothing of it is used then: a file with an error is
/// rejected whole, and so is the set it belongs to.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The path, the directory listing or a file could not be read (missing, permissions, not
    /// UTF-8...).
    #[error("cannot read policy {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One or more files are not valid policies; one problem per rejected file.
    #[error("{}", join_lines(.problems))]
    Invalid { problems: Vec<PolicyProblem> },
}

/// What is wrong in one file, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyProblem {
    pub file: PathBuf,
    /// The document of a multi-document file, when the problem is inside one.
    pub document: Option<DocumentLabel>,
    /// The problem, after the path of the field it is in (`spec.mtls.mode: unknown variant ...`).
    pub message: String,
    /// Where serde_yaml_ng located it (1-based), when it did.
    pub location: Option<Location>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// A document of a file: its position (1-based, counting every `---`-separated document) and,
/// when they could be read, its kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DocumentLabel {
    pub index: usize,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(document) = &self.document {
            write!(f, "{document}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(at) = self.location {
            write!(f, " at line {} column {}", at.line, at.column)?;
        }
        Ok(())
    }
}

impl fmt::Display for DocumentLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.index)?;
        let object = match (&self.namespace, &self.name) {
            (Some(namespace), Some(name)) => Some(format!("{namespace}/{name}")),
            (None, Some(name)) => Some(name.clone()),
            (Some(namespace), None) => Some(format!("{namespace}/?")),
            (None, None) => None,
        };
        match (&self.kind, object) {
            (Some(kind), Some(object)) => write!(f, " ({kind} {object})"),
            (Some(kind), None) => write!(f, " ({kind})"),
            (None, Some(object)) => write!(f, " ({object})"),
            (None, None) => Ok(()),
        }
    }
}

fn join_lines(problems: &[PolicyProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
