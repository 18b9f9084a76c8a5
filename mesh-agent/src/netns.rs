//! Sockets in workloads' network namespaces.
//!
//! The agent runs in the node's namespace but listens and connects inside each workload's, as
//! if it were in the pod: a socket belongs to the namespace of the thread that created it, so the
//! calling thread enters the namespace only for the `socket()` call and returns at once.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::Context as _;
use nix::sched::{CloneFlags, setns};
use tokio::net::{TcpListener, TcpSocket};

/// Connections a listener holds before the agent accepts them (the kernel caps it at somaxconn).
const LISTEN_BACKLOG: u32 = 4096;

/// The agent's own namespace, captured before any thread moves.
static HOME: OnceLock<File> = OnceLock::new();

/// Records the namespace the agent started in. Call once, early, from the main thread.
pub fn remember_home() -> anyhow::Result<()> {
    let home = File::open("/proc/self/ns/net").context("opening the agent's own netns")?;
    let _ = HOME.set(home);
    Ok(())
}

#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
    inode: u64,
}

impl NetNs {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let file = File::open(path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        let inode = file
            .metadata()
            .with_context(|| format!("reading network namespace {}", path.display()))?
            .ino();
        Ok(Self {
            file,
            path: path.to_owned(),
            inode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode number: stable for its lifetime, unique on the machine.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Binds a listener inside this namespace. With `SO_REUSEPORT`, so that a workload's new
    /// listeners can open while the old ones close (its namespace kept, its spec changed) and a
    /// second agent can take over from the first (an upgrade).
    pub fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.tcp_socket_for(&addr)?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    }

    /// Lets the kernel hand connections waiting on a closing listener to another listener of
    /// its `SO_REUSEPORT` group (`net.ipv4.tcp_migrate_req`, Linux 5.14): when an old agent
    /// closes its listeners during an upgrade, the new one accepts what was queued.
    pub fn migrate_queued_connections(&self) -> io::Result<()> {
        self.inside(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))?
    }

    /// Creates an unconnected TCP socket inside this namespace, for connecting to `dst`.
    pub fn tcp_socket_for(&self, dst: &SocketAddr) -> io::Result<TcpSocket> {
        self.inside(|| match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        })?
    }

    fn inside<T>(&self, make: impl FnOnce() -> T) -> io::Result<T> {
        let home = HOME
            .get()
            .ok_or_else(|| io::Error::other("netns::remember_home was not called"))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let made = make();
        if let Err(err) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A runtime thread left in a workload's namespace would open later sockets in the
            // wrong place; nothing sane can continue.
            tracing::error!(error = %err, netns = %self.path.display(), "cannot return to the agent's netns");
            std::process::abort();
        }
        Ok(made)
    }
}

/// The kernel's cookie for the network namespace a socket lives in; the capture programs key
/// original destinations by it.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and length describe `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}
