//! Pods: a network namespace plus a cgroup, and the programs run inside them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sys;

/// The pods' /etc/hosts, in the cluster's scratch directory: every pod by name.
pub(crate) const HOSTS_FILE: &str = "hosts";

/// One pod of the test cluster.
#[derive(Debug, Clone)]
pub struct Pod {
    pub(crate) name: String,
    pub(crate) node: String,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) enrolled: bool,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
    pub(crate) netns: String,
    pub(crate) cgroup: PathBuf,
    /// The cluster's scratch directory (server logs go there).
    pub(crate) workdir: PathBuf,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn node(&self) -> &str {
        &self.node
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
    pub fn enrolled(&self) -> bool {
        self.enrolled
    }
    /// `namespace/name`, as the agent logs it in `src_workload`.
    pub fn workload_id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }
    /// Name of the pod's network namespace (as `ip netns` knows it).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }
    /// `/var/run/netns/<netns name>`.
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }
    /// The pod's cgroup v2 directory.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// A `Command` that runs `program` inside this pod's cgroup and netns.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        sys::place(&mut cmd, &self.cgroup, &self.netns_path())
            .with_context(|| format!("prepare command for pod {}", self.name))?;
        sys::with_hosts_file(&mut cmd, &self.workdir.join(HOSTS_FILE))?;
        Ok(cmd)
    }

    /// Starts `program` in the pod; it is killed when the guard is dropped.
    pub fn spawn<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_with(program.as_ref(), args, |_| {})
    }

    /// Like [`Pod::spawn`], with stdin and stdout piped (take them through
    /// [`ChildGuard::child_mut`]), for a program the caller drives and stops by closing its
    /// stdin.
    pub fn spawn_piped<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_with(program.as_ref(), args, |cmd| {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        })
    }

    fn spawn_with<I, S>(
        &self,
        program: &OsStr,
        args: I,
        configure: impl FnOnce(&mut Command),
    ) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program, args)?;
        configure(&mut cmd);
        let name = format!("{} in pod {}", program.to_string_lossy(), self.name);
        let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        Ok(ChildGuard { child, name })
    }

    /// Runs `program` in the pod to completion and captures its output. Fails
    /// only if it cannot be started or outlives `timeout` (it is then killed);
    /// a non-zero exit is reported in the returned [`RunOutput`].
    pub fn run<I, S>(
        &self,
        program: impl AsRef<OsStr>,
        args: I,
        timeout: Duration,
    ) -> Result<RunOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let mut cmd = self.command(program, args)?;
        run_with_timeout(&mut cmd, timeout)
            .with_context(|| format!("{} in pod {}", program.to_string_lossy(), self.name))
    }

    /// `curl -sS -g --max-time 10 URL` (body on stdout) in the pod.
    pub fn curl(&self, url: &str) -> Result<RunOutput> {
        self.run(
            "curl",
            ["-sS", "-g", "--max-time", "10", url],
            Duration::from_secs(15),
        )
    }

    /// Starts `python3 -m http.server PORT --bind :: --directory DIR` (dual
    /// stack) in the pod and waits until it accepts connections. Its request
    /// log (stderr) is kept; see [`HttpServer::requests`].
    pub fn http_server(&self, port: u16, dir: &Path) -> Result<HttpServer> {
        let log = self
            .workdir
            .join(format!("{}-{}-http-{port}.log", self.node, self.name));
        let log_file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let port_s = port.to_string();
        let mut cmd = self.command(
            "/usr/bin/python3",
            [
                OsStr::new("-m"),
                OsStr::new("http.server"),
                OsStr::new(&port_s),
                OsStr::new("--bind"),
                OsStr::new("::"),
                OsStr::new("--directory"),
                dir.as_os_str(),
            ],
        )?;
        cmd.env("PYTHONUNBUFFERED", "1")
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let name = format!("http server :{port} in pod {}", self.name);
        let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        let mut guard = ChildGuard { child, name };
        self.wait_for_port(&mut guard, port)
            .with_context(|| tail_of(&log))?;
        Ok(HttpServer { guard, log, port })
    }

    /// Starts a TCP echo server (`socat TCP6-LISTEN:PORT,fork,reuseaddr,ipv6only=0 PIPE`,
    /// dual stack) in the pod and waits until it accepts connections.
    pub fn tcp_echo(&self, port: u16) -> Result<ChildGuard> {
        let mut guard = self.spawn(
            "socat",
            [
                format!("TCP6-LISTEN:{port},fork,reuseaddr,ipv6only=0"),
                "PIPE".to_string(),
            ],
        )?;
        self.wait_for_port(&mut guard, port)?;
        Ok(guard)
    }

    /// Polls until something in the pod accepts TCP connections on
    /// 127.0.0.1:`port` (checked from a thread that joins the pod's netns, so
    /// the probe itself is not a pod process), for up to 10 s; fails early if
    /// `server` exits.
    pub fn wait_for_port(&self, server: &mut ChildGuard, port: u16) -> Result<()> {
        let netns = self.netns_path();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = sys::in_netns(&netns, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("{} exited ({status}) before listening", server.name);
            }
            if Instant::now() >= deadline {
                bail!("{} not accepting on port {port} after 10 s", server.name);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    pub(crate) child: Child,
    pub(crate) name: String,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
    /// Kills the process now and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `python3 -m http.server`.
#[derive(Debug)]
pub struct HttpServer {
    pub guard: ChildGuard,
    log: PathBuf,
    port: u16,
}

impl HttpServer {
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Request lines the server logged, e.g.
    /// `::ffff:10.1.0.2 - - [date] "GET / HTTP/1.1" 200 -`; the first word is
    /// the client address the server saw (IPv4 clients appear as `::ffff:a.b.c.d`).
    pub fn requests(&self) -> Result<Vec<String>> {
        let text = fs::read_to_string(&self.log)
            .with_context(|| format!("read {}", self.log.display()))?;
        Ok(text
            .lines()
            .filter(|l| l.contains("\"GET ") || l.contains("\"HEAD "))
            .map(str::to_owned)
            .collect())
    }
    /// The client addresses of [`Self::requests`], with `::ffff:` mapping undone.
    pub fn client_addrs(&self) -> Result<Vec<IpAddr>> {
        Ok(self
            .requests()?
            .iter()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .map(|a| a.to_canonical())
            .collect())
    }
}

/// What a program run in a pod did.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl RunOutput {
    /// Exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    pub fn success(&self) -> bool {
        self.status.success()
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// Fails with the exit status and stderr unless the program exited 0.
    pub fn check(self) -> Result<Self> {
        if !self.success() {
            bail!("exited with {}: {}", self.status, self.stderr_str().trim());
        }
        Ok(self)
    }
}

/// Runs `cmd` with stdout and stderr captured; kills it after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<RunOutput> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn")?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap_or_default();
            bail!(
                "still running after {timeout:?}, killed; stderr: {}",
                String::from_utf8_lossy(&err).trim()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(RunOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// The last lines of a log file, for error messages.
pub(crate) fn tail_of(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(30);
    format!(
        "last lines of {}:\n{}",
        path.display(),
        lines[start..].join("\n")
    )
}

/// `ip:port` as the agent logs destinations (`[ip]:port` for IPv6).
pub fn addr(ip: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

/// `http://ip:port/` (`http://[ip]:port/` for IPv6).
pub fn http_url(ip: impl Into<IpAddr>, port: u16) -> String {
    format!("http://{}/", addr(ip, port))
}
