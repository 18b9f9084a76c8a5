//! The agent's end of the CNI plugin (`mesh-cni`): a unix socket on which the container
//! runtime's plugin chain hands over each new pod sandbox of the node. An ADD is answered only
//! once the pod is enrolled (guarded, its cgroup enrolled, its listeners and inbound capture
//! up), so the pod's first process starts captured; the plugin fails the sandbox otherwise, and
//! the kubelet tries again.

use std::{
    collections::HashMap,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use mesh_cni::protocol::{self, Command, Outcome, Request, Response};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::kubernetes::{Sandbox, SandboxVerdict, Sandboxes};

/// How long an ADD may wait for enrolment; under the plugin's own default (30 s) so the plugin
/// hears why.
const ENROL_TIMEOUT: Duration = Duration::from_secs(25);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The workloads the reconciler serves completely: `namespace/name` → the inode of the network
/// namespace it serves them in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Served(pub HashMap<String, u64>);

pub struct CniServer {
    listener: UnixListener,
}

impl CniServer {
    /// Binds `socket` (replacing a stale one, or the one of the agent this one takes over
    /// from: new sandboxes then come here), readable by root only.
    pub fn bind(socket: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("removing {}", socket.display())),
        }
        let listener = UnixListener::bind(socket)
            .with_context(|| format!("binding the CNI socket {}", socket.display()))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", socket.display()))?;
        info!(socket = %socket.display(), "CNI socket listening");
        Ok(Self { listener })
    }

    pub fn spawn(
        self,
        sandboxes: Sandboxes,
        served: watch::Receiver<Served>,
        shutdown: CancellationToken,
    ) {
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => break,
                    accepted = self.listener.accept() => accepted,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let (sandboxes, served) = (sandboxes.clone(), served.clone());
                        tokio::spawn(serve(stream, sandboxes, served));
                    }
                    Err(err) => {
                        warn!(error = %err, "accepting on the CNI socket failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            // The socket file stays: it may be the one of the agent that took over, and a
            // stale one only refuses connections, which the plugin treats as no agent.
        });
    }
}

async fn serve(stream: UnixStream, sandboxes: Sandboxes, served: watch::Receiver<Served>) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let limit = u64::try_from(protocol::MAX_MESSAGE_BYTES + 1).unwrap_or(u64::MAX);
    let mut reader = BufReader::new(read.take(limit));
    let outcome =
        match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => Outcome::Failed {
                error: "no request within 5s".to_owned(),
            },
            Ok(Err(err)) => Outcome::Failed {
                error: format!("reading the request: {err}"),
            },
            Ok(Ok(_)) => match protocol::parse_request(&line) {
                Ok(request) => handle(request, &sandboxes, served).await,
                Err(err) => {
                    warn!(error = %err, "bad request on the CNI socket");
                    Outcome::Failed {
                        error: format!("bad request: {err}"),
                    }
                }
            },
        };
    let response = protocol::encode_response(&Response { outcome });
    if let Err(err) = write.write_all(&response).await {
        warn!(error = %err, "cannot answer the CNI plugin");
    }
}

async fn handle(
    request: Request,
    sandboxes: &Sandboxes,
    served: watch::Receiver<Served>,
) -> Outcome {
    let pod = format!("{}/{}", request.pod.namespace, request.pod.name);
    let outcome = match request.command {
        Command::Add => add(&request, sandboxes, served).await,
        Command::Check => check(&request, sandboxes, &served).await,
        Command::Del => {
            let p = &request.pod;
            sandboxes
                .remove(p.uid.clone(), p.namespace.clone(), p.name.clone())
                .await;
            Outcome::NotInMesh {
                reason: "sandbox released".to_owned(),
            }
        }
    };
    info!(command = ?request.command, pod, container = request.container_id, outcome = ?outcome, "CNI request");
    outcome
}

fn sandbox_of(request: &Request) -> Sandbox {
    Sandbox {
        namespace: request.pod.namespace.clone(),
        name: request.pod.name.clone(),
        uid: request.pod.uid.clone(),
        netns: PathBuf::from(&request.netns),
        ips: request.ips.clone(),
    }
}

async fn add(
    request: &Request,
    sandboxes: &Sandboxes,
    mut served: watch::Receiver<Served>,
) -> Outcome {
    let Some(inode) = netns_inode(&request.netns) else {
        return Outcome::Failed {
            error: format!("no network namespace at {:?}", request.netns),
        };
    };
    let workload = match verdict_outcome(sandboxes.add(sandbox_of(request)).await) {
        Ok(workload) => workload,
        Err(outcome) => return outcome,
    };
    let enrolled = served.wait_for(|s| s.0.get(&workload) == Some(&inode));
    match tokio::time::timeout(ENROL_TIMEOUT, enrolled).await {
        Ok(Ok(_)) => Outcome::Enrolled,
        Ok(Err(_)) => Outcome::Failed {
            error: "the agent is stopping".to_owned(),
        },
        Err(_) => Outcome::Failed {
            error: format!(
                "{workload} was not enrolled within {}s (see the agent's readiness for why)",
                ENROL_TIMEOUT.as_secs()
            ),
        },
    }
}

async fn check(
    request: &Request,
    sandboxes: &Sandboxes,
    served: &watch::Receiver<Served>,
) -> Outcome {
    let workload = match verdict_outcome(sandboxes.check(sandbox_of(request)).await) {
        Ok(workload) => workload,
        Err(outcome) => return outcome,
    };
    let inode = netns_inode(&request.netns);
    if inode.is_some() && served.borrow().0.get(&workload) == inode.as_ref() {
        Outcome::Enrolled
    } else {
        Outcome::Failed {
            error: format!("{workload} should be enrolled and is not"),
        }
    }
}

/// The workload to wait for, or the final outcome.
fn verdict_outcome(verdict: anyhow::Result<SandboxVerdict>) -> Result<String, Outcome> {
    match verdict {
        Ok(SandboxVerdict::InMesh { workload }) => Ok(workload),
        Ok(SandboxVerdict::NotInMesh { reason }) => Err(Outcome::NotInMesh { reason }),
        Ok(SandboxVerdict::UnknownPod) => Err(Outcome::Failed {
            error: "the pod is not known to the API server yet".to_owned(),
        }),
        Err(err) => Err(Outcome::Failed {
            error: format!("{err:#}"),
        }),
    }
}

fn netns_inode(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

pub type ServedSender = watch::Sender<Served>;

/// A sender and receiver pair for [`Served`].
pub fn served_channel() -> (ServedSender, watch::Receiver<Served>) {
    watch::channel(Served::default())
}
