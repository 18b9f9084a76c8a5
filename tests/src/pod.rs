//! Pods: a network namespace plus a cgroup, and the programs run inside them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::PodSpec;
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
    /// The node's network namespace (name).
    pub(crate) node_netns: String,
    /// The node end of the pod's veth pair, a port of the node's `cbr0`: `p{j}`.
    pub(crate) veth: String,
    /// The pod's default gateways: the node's `cbr0` addresses.
    pub(crate) gateway4: Ipv4Addr,
    pub(crate) gateway6: Ipv6Addr,
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
    /// The node end of the pod's veth pair (`p{j}`, a port of the node's `cbr0`).
    pub fn veth(&self) -> &str {
        &self.veth
    }
    /// The MAC address of the pod's `eth0`, derived from its IPv4 address so that a recreated
    /// `eth0` has the same one: the node's and other pods' neighbour caches stay right (a real
    /// CNI gives a new MAC and announces it with a gratuitous ARP; this harness sends none).
    pub fn mac(&self) -> String {
        let [_, i, _, h] = self.ipv4.octets();
        format!("02:6d:74:{i:02x}:00:{h:02x}")
    }
    /// The pod as a spec (name, namespace, service account, labels, enrolment), e.g. to
    /// derive a changed one for [`crate::Cluster::update_pod`].
    pub fn spec(&self) -> PodSpec {
        PodSpec {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            labels: self.labels.clone(),
            enrolled: self.enrolled,
        }
    }
    /// The inode of the pod's current network namespace (the agent names the pod's
    /// `mesh_sk_lookup_<inode>` link after it); a recreated namespace has a new one.
    pub fn netns_inode(&self) -> Result<u64> {
        let path = self.netns_path();
        Ok(fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino())
    }
    /// The id of the pod's current cgroup (its directory's inode on cgroup v2); a recreated
    /// cgroup has a new one.
    pub fn cgroup_id(&self) -> Result<u64> {
        Ok(fs::metadata(&self.cgroup)
            .with_context(|| format!("stat {}", self.cgroup.display()))?
            .ino())
    }

    // ------------------------------------------------------------ lifecycle

    /// Creates the pod's network namespace as a CNI would: `lo` up, IPv6 DAD off, a veth pair
    /// whose pod end is `eth0` (with [`Pod::mac`]) and whose node end ([`Pod::veth`]) is a port
    /// of the node's `cbr0` with `rp_filter` 0, the pod's addresses and default routes.
    pub(crate) fn create_netns(&self) -> Result<()> {
        let (ns, node_ns, veth) = (&self.netns, &self.node_netns, &self.veth);
        sys::netns_add(ns)?;
        let mac = self.mac();
        sys::ip(&[
            "link", "add", "eth0", "address", &mac, "netns", ns, "type", "veth", "peer", "name",
            veth, "netns", node_ns,
        ])?;
        sys::sysctls_in(
            &sys::netns_path(node_ns),
            &[(format!("net/ipv4/conf/{veth}/rp_filter"), "0")],
        )
        .with_context(|| format!("sysctls in {node_ns}"))?;
        sys::ip_in(node_ns, &["link", "set", veth, "master", "cbr0", "up"])?;
        sys::ip_in(ns, &["link", "set", "lo", "up"])?;
        sys::ip_in(ns, &["link", "set", "eth0", "up"])?;
        let v4 = format!("{}/24", self.ipv4);
        let v6 = format!("{}/64", self.ipv6);
        sys::ip_in(ns, &["addr", "add", &v4, "dev", "eth0"])?;
        sys::ip_in(ns, &["addr", "add", &v6, "dev", "eth0", "nodad"])?;
        let (gw4, gw6) = (self.gateway4.to_string(), self.gateway6.to_string());
        sys::ip_in(ns, &["route", "add", "default", "via", &gw4])?;
        sys::ip_in(ns, &["-6", "route", "add", "default", "via", &gw6])?;
        Ok(())
    }

    /// Ends every process in the pod's cgroup (`cgroup.kill`) and waits until none is left.
    pub fn kill_processes(&self) -> Result<()> {
        sys::kill_cgroup(&self.cgroup).with_context(|| format!("kill pod {}", self.name))
    }

    /// What the runtime does when a pod goes away: ends the pod's processes, deletes its veth
    /// pair (from the node's side, as a CNI DEL does) and its network namespace. Nothing of it
    /// is re-created; see [`Pod::recreate_netns`]. Idempotent.
    ///
    /// The veth is deleted explicitly because the namespace outlives its name while anything
    /// holds it (pods' processes have private mount namespaces with copies of every
    /// `/run/netns` mount, and the agent may hold it open); its `eth0` and so the node's
    /// `p{j}` would live on with it and block a new `p{j}`.
    pub fn delete_netns(&self) -> Result<()> {
        self.kill_processes()?;
        if sys::link_exists(&self.node_netns, &self.veth)? {
            sys::ip_in(&self.node_netns, &["link", "del", &self.veth])?;
        }
        sys::netns_del(&self.netns)
    }

    /// What a pod restart does: [`Pod::delete_netns`] (if it is still there), then a new
    /// namespace of the same name with a new veth pair ([`Pod::veth`] keeps its name), the
    /// same addresses and routes. The pod's cgroup stays; its processes are gone and must be
    /// started again.
    pub fn recreate_netns(&self) -> Result<()> {
        self.delete_netns()?;
        self.create_netns()
            .with_context(|| format!("recreate the netns of pod {}", self.name))
    }

    /// What a container restart does: ends the pod's processes, removes its cgroup and makes
    /// it again at the same path, so it gets a new cgroup id ([`Pod::cgroup_id`]). The network
    /// namespace stays.
    pub fn recreate_cgroup(&self) -> Result<()> {
        sys::kill_and_remove_cgroup(&self.cgroup)?;
        sys::mkdir_all(&self.cgroup)
    }

    /// Removes everything of the pod: processes, veth, network namespace, cgroup.
    pub(crate) fn destroy(&self) -> Result<()> {
        self.delete_netns()?;
        sys::kill_and_remove_cgroup(&self.cgroup)
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
        self.curl_within(url, Duration::from_secs(10))
    }

    /// `curl -sS -g --max-time SECS URL` in the pod: a fetch that gives up after `max_time`
    /// (curl exits 28), for attempts repeated in a loop.
    pub fn curl_within(&self, url: &str, max_time: Duration) -> Result<RunOutput> {
        let secs = format!("{:.3}", max_time.as_secs_f64());
        self.run(
            "curl",
            ["-sS", "-g", "--max-time", &secs, url],
            max_time + Duration::from_secs(5),
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
    /// Guards a process the caller started; `name` names it in messages.
    pub fn new(child: Child, name: String) -> Self {
        Self { child, name }
    }

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
