//! Noticing that files changed, by polling their metadata rather than with inotify: polling
//! works the same in containers, on bind mounts and network filesystems, and through the
//! symbolic-link swaps of Kubernetes ConfigMap volumes, where inotify events are missed.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// What a poll compares: for each file, its identity, size and times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fingerprint {
    Missing,
    /// The listing or a file's metadata could not be read; the message tells what changed.
    Unreadable(String),
    Files(Vec<FileStamp>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    path: PathBuf,
    device: u64,
    inode: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl Fingerprint {
    /// The state of `path` and of the files `list` finds there.
    pub(crate) fn of(
        path: &Path,
        list: impl FnOnce(&Path) -> Result<Vec<PathBuf>, String>,
    ) -> Self {
        if !path.exists() {
            return Fingerprint::Missing;
        }
        let files = match list(path) {
            Ok(files) => files,
            Err(err) => return Fingerprint::Unreadable(err),
        };
        let stamps: Result<Vec<FileStamp>, String> = files.into_iter().map(FileStamp::of).collect();
        match stamps {
            Ok(stamps) => Fingerprint::Files(stamps),
            Err(err) => Fingerprint::Unreadable(err),
        }
    }
}

impl FileStamp {
    fn of(path: PathBuf) -> Result<Self, String> {
        let metadata =
            std::fs::metadata(&path).map_err(|err| format!("{}: {err}", path.display()))?;
        Ok(Self {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
            path,
        })
    }
}
