//! The inbound HBONE listener, as a peer on the network meets it: the agent's own `Inbound`
//! (mutual TLS on port 15008, then HTTP/2 `CONNECT` streams, authorized and delivered to the
//! workload), serving one workload on a real loopback TCP port, in a network namespace of the
//! fuzzer's own. Each input is one connection; its first byte chooses how the rest is sent:
//!
//! - bit 0 clear: as the very first bytes on the TCP connection (the TLS record sniffing and
//!   rustls's ClientHello parsing);
//! - bit 0 set: as application data, after a real TLS 1.3 handshake with a valid client
//!   certificate (HTTP/2 frames: the h2 server); bit 1 set prepends the h2 client preface.
//!
//! The client lets the server answer what it will (see `quiesce`), then closes its side, so the
//! server sees EOF rather than waiting out its handshake timeout; it reads what the server says
//! until the server closes.
//!
//! Invariants: nothing panics, in any task; the server closes the connection soon after the
//! client did, and every task the connection started ends, leaving no connection open; a stream
//! is answered `200` only for a `CONNECT` to the workload's served port (and `403` only for the
//! port the policy denies), as read from the frames sent by an HPACK decoder that is not h2's.
#![no_main]

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use loona_hpack::Decoder;
use mesh_agent::admin::Metrics;
use mesh_agent::identity::{
    CertificateAuthority, IdentityStore, SpiffeId, TrustBundle, client_config, server_config,
};
use mesh_agent::netns::{self, NetNs};
use mesh_agent::policy::{DEFAULT_ROOT_NAMESPACE, PolicySet};
use mesh_agent::proxy::Lifetime;
use mesh_agent::proxy::hbone::HBONE_PORT;
use mesh_agent::proxy::inbound::{Inbound, InboundContext, LocalTargets};
use mesh_agent::proxy::limits::Limits;
use mesh_agent::proxy::record::Connections;
use mesh_agent::state::{State, StateStore};
use mesh_agent::workload::Cluster;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::task::TaskTracker;

/// The served workload's IP: on the namespace's loopback, like every 127/8 address.
const WORKLOAD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Where the workload listens (an echo server).
const SERVED_PORT: u16 = 8080;
/// The port the policy denies.
const DENIED_PORT: u16 = 8081;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An input takes milliseconds: a server still busy with it this long after the client closed
/// has hung.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

const CLUSTER: &str = "
trustDomain: cluster.local
identity:
  caCert: ca-cert.pem
  caKey: ca-key.pem
nodes:
  - name: node-a
    workloadCgroup: /sys/fs/cgroup/mesh/node-a
    workloads:
      - name: httpbin
        namespace: demo
        serviceAccount: httpbin
        labels: {app: httpbin}
        ips: [127.0.0.2]
        netns: /proc/self/ns/net
        cgroup: /sys/fs/cgroup/mesh/node-a/httpbin
  - name: node-b
    workloadCgroup: /sys/fs/cgroup/mesh/node-b
    workloads:
      - name: sleep
        namespace: demo
        serviceAccount: sleep
        ips: [127.0.0.3]
        netns: /proc/self/ns/net
        cgroup: /sys/fs/cgroup/mesh/node-b/sleep
";

const POLICY: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-8081
  namespace: demo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - to:
    - operation:
        ports: [\"8081\"]
";

/// The peer: `demo/sleep` of node-b, with a certificate of the mesh's CA.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/sleep";

struct Fixture {
    runtime: Runtime,
    connector: TlsConnector,
    connections: Connections,
    /// Tasks alive between inputs: the listeners' and the echo server's.
    idle_tasks: usize,
    _policy: watch::Sender<Arc<PolicySet>>,
    _lifetime: Lifetime,
    _tracker: TaskTracker,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(Fixture::new);

/// `MESH_FUZZ_VERBOSE=1`: print each stream's answer and request (running one input by hand).
static VERBOSE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("MESH_FUZZ_VERBOSE").is_some());

impl Fixture {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        netns::remember_home().expect("the fuzzer's netns");
        let cluster = Cluster::parse(CLUSTER, Path::new("/fuzz/cluster.yaml")).expect("cluster");
        let limits = Limits::new(&cluster.limits);
        let state = State::build(cluster, "node-a").expect("state");
        let info = state
            .workload_by_uid("demo/httpbin")
            .cloned()
            .expect("the served workload");

        let ca = Arc::new(CertificateAuthority::generate_root("fuzz root").expect("CA"));
        let bundle = TrustBundle::from_ca(&ca).expect("bundle");
        let lifetime = Duration::from_secs(24 * 60 * 60);
        let client_id: SpiffeId = CLIENT_ID.parse().expect("client identity");
        let server_store = IdentityStore::new(ca.clone(), lifetime);
        server_store.insert(
            info.identity.clone(),
            ca.issue(&info.identity, lifetime)
                .expect("server certificate"),
        );
        let client_store = IdentityStore::new(ca.clone(), lifetime);
        client_store.insert(
            client_id.clone(),
            ca.issue(&client_id, lifetime).expect("client certificate"),
        );
        let tls = server_config(
            server_store,
            info.identity.clone(),
            bundle.clone(),
            "cluster.local",
        )
        .expect("server TLS");
        let connector = TlsConnector::from(
            client_config(client_store, client_id, bundle, vec![info.identity.clone()])
                .expect("client TLS"),
        );

        let policy = PolicySet::from_yaml(POLICY, Path::new("policy.yaml"), DEFAULT_ROOT_NAMESPACE)
            .expect("policy");
        let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
        let connections = Connections::new(Metrics::new());
        let context = InboundContext {
            state: StateStore::new(state),
            policy: policy_rx,
            connections: connections.clone(),
            max_concurrent_streams: 16,
            local: LocalTargets::default(),
            limits,
        };
        let tracker = TaskTracker::new();
        let lifetime = Lifetime::default();
        runtime.block_on(async {
            let netns = NetNs::open(Path::new("/proc/self/ns/net")).expect("netns");
            let inbound = Inbound::listen(info, netns, tls, context, lifetime.clone())
                .expect("the inbound listeners");
            inbound.serve(&tracker);
            let echo = TcpListener::bind((WORKLOAD_IP, SERVED_PORT))
                .await
                .expect("the workload's port");
            tokio::spawn(echo_server(echo));
            tokio::time::sleep(Duration::from_millis(10)).await;
        });
        let idle_tasks = runtime.metrics().num_alive_tasks();
        Self {
            runtime,
            connector,
            connections,
            idle_tasks,
            _policy: policy_tx,
            _lifetime: lifetime,
            _tracker: tracker,
        }
    }
}

/// The workload: sends back what it gets.
async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut r, mut w) = conn.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

fuzz_target!(init: enter_own_netns(), |data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    let fixture = &*FIXTURE;
    fixture.runtime.block_on(async {
        let tcp = TcpStream::connect((WORKLOAD_IP, HBONE_PORT))
            .await
            .expect("the HBONE listener accepts");
        let _ = tcp.set_nodelay(true);
        // A reset rather than TIME_WAIT when done: thousands of connections a second would
        // otherwise use up the ephemeral ports.
        let _ = tcp.set_zero_linger();
        if mode & 1 == 0 {
            exchange(tcp, payload).await;
        } else {
            let name = ServerName::try_from("httpbin.demo").expect("a name");
            let tls = fixture
                .connector
                .connect(name, tcp)
                .await
                .expect("a valid client completes the handshake");
            let mut sent = Vec::with_capacity(PREFACE.len() + payload.len());
            if mode & 2 != 0 {
                sent.extend_from_slice(PREFACE);
            }
            sent.extend_from_slice(payload);
            let received = exchange(tls, &sent).await;
            check_answers(&sent, &received);
        }
        settle(fixture).await;
    });
});

/// Sends `bytes`, lets the server answer (and relay) what it will, then closes the sending side,
/// while reading until the server closes.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: S, bytes: &[u8]) -> Vec<u8> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let received = RefCell::new(Vec::new());
    let send = async {
        let _ = writer.write_all(bytes).await;
        let _ = writer.flush().await;
        quiesce(|| received.borrow().len()).await;
        let _ = writer.shutdown().await;
    };
    let receive = async {
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            received.borrow_mut().extend_from_slice(&buf[..n]);
        }
    };
    let both = async { tokio::join!(send, receive) };
    if tokio::time::timeout(CLOSE_WAIT, both).await.is_err() {
        panic!("the server still holds the connection {CLOSE_WAIT:?} after the client closed it");
    }
    received.into_inner()
}

/// Runs the runtime until nothing moves: no byte received, no task started or ended, for a
/// number of rounds in a row. Each `yield_now` lets every task run and polls the I/O driver once,
/// and loopback delivers at once, so the server has done what it can without the client (answered,
/// connected to the workload, relayed its echo) when this returns; no time is waited for.
async fn quiesce(progress: impl Fn() -> usize) {
    const QUIET_ROUNDS: u32 = 16;
    const MAX_ROUNDS: u32 = 4096;
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut last = (progress(), metrics.num_alive_tasks());
    let mut quiet = 0;
    for _ in 0..MAX_ROUNDS {
        tokio::task::yield_now().await;
        let now = (progress(), metrics.num_alive_tasks());
        if now == last {
            quiet += 1;
            if quiet == QUIET_ROUNDS {
                return;
            }
        } else {
            (last, quiet) = (now, 0);
        }
    }
}

/// Waits for the tasks the connection started to end; none may outlive it for long.
async fn settle(fixture: &Fixture) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let deadline = Instant::now() + CLOSE_WAIT;
    let mut spins = 0u32;
    while metrics.num_alive_tasks() > fixture.idle_tasks {
        if Instant::now() > deadline {
            panic!(
                "{} tasks still alive {CLOSE_WAIT:?} after the connection closed",
                metrics.num_alive_tasks() - fixture.idle_tasks
            );
        }
        spins += 1;
        if spins < 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let open = fixture.connections.list();
    assert!(
        open.is_empty(),
        "{} connections still listed as open",
        open.len()
    );
}

/// One HTTP/2 frame (RFC 9113 §4.1).
struct Frame<'a> {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &'a [u8],
}

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The complete frames at the start of `bytes`.
fn frames(mut bytes: &[u8]) -> impl Iterator<Item = Frame<'_>> {
    std::iter::from_fn(move || {
        if bytes.len() < 9 {
            return None;
        }
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes.len() < 9 + len {
            return None;
        }
        let frame = Frame {
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
            payload: &bytes[9..9 + len],
        };
        bytes = &bytes[9 + len..];
        Some(frame)
    })
}

/// The header block fragment of a HEADERS frame, without padding and priority.
fn fragment<'a>(frame: &Frame<'a>) -> Option<&'a [u8]> {
    let mut payload = frame.payload;
    let mut pad = 0;
    if frame.flags & PADDED != 0 {
        let (&len, rest) = payload.split_first()?;
        pad = usize::from(len);
        payload = rest;
    }
    if frame.flags & PRIORITY != 0 {
        payload = payload.get(5..)?;
    }
    payload.get(..payload.len().checked_sub(pad)?)
}

/// The first header block of each stream, decoded in order by one decoder (HPACK's state
/// spans the connection); stops where the frames can no longer be followed, as h2 would.
fn header_blocks(bytes: &[u8]) -> HashMap<u32, Vec<(Vec<u8>, Vec<u8>)>> {
    let mut decoder = Decoder::new();
    decoder.set_max_allowed_table_size(4096);
    let mut blocks = HashMap::new();
    let mut pending: Option<(u32, Vec<u8>)> = None;
    for frame in frames(bytes) {
        let complete = match (frame.kind, pending.as_mut()) {
            (CONTINUATION, Some((stream, block))) if frame.stream == *stream => {
                block.extend_from_slice(frame.payload);
                frame.flags & END_HEADERS != 0
            }
            (_, Some(_)) | (CONTINUATION, None) => break,
            (HEADERS, None) => {
                let Some(fragment) = fragment(&frame) else {
                    break;
                };
                pending = Some((frame.stream, fragment.to_vec()));
                frame.flags & END_HEADERS != 0
            }
            _ => false,
        };
        if complete && let Some((stream, block)) = pending.take() {
            let mut headers = Vec::new();
            let decoded = decoder.decode_with_cb(&block, |name: Cow<[u8]>, value: Cow<[u8]>| {
                headers.push((name.into_owned(), value.into_owned()));
            });
            if decoded.is_err() {
                break;
            }
            blocks.entry(stream).or_insert(headers);
        }
    }
    blocks
}

fn header<'h>(headers: &'h [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

/// `200` only for a `CONNECT` to the served port of the workload, `403` only for one to the
/// denied port, as the requests read by a decoder of our own.
fn check_answers(sent: &[u8], received: &[u8]) {
    let answers = header_blocks(received);
    if *VERBOSE {
        let kinds: Vec<(u8, u8, u32, usize)> = frames(received)
            .map(|f| (f.kind, f.flags, f.stream, f.payload.len()))
            .collect();
        eprintln!(
            "sent {} bytes, received {} bytes: frames {kinds:?}",
            sent.len(),
            received.len()
        );
    }
    if answers.is_empty() {
        return;
    }
    let Some(frames_sent) = sent.strip_prefix(PREFACE) else {
        panic!("the server answered a stream of a connection without the HTTP/2 preface");
    };
    let requests = header_blocks(frames_sent);
    for (stream, answer) in &answers {
        let status = header(answer, ":status");
        if *VERBOSE {
            let show = |h: Option<&Vec<(Vec<u8>, Vec<u8>)>>, name| {
                h.and_then(|h| header(h, name))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            eprintln!(
                "stream {stream}: {:?} {:?} -> {:?}",
                show(requests.get(stream), ":method"),
                show(requests.get(stream), ":authority"),
                show(Some(answer), ":status")
            );
        }
        let port = match status {
            Some(b"200") => SERVED_PORT,
            Some(b"403") => DENIED_PORT,
            _ => continue,
        };
        let Some(request) = requests.get(stream) else {
            continue; // past where our decoding stopped
        };
        let show = |name| header(request, name).map(String::from_utf8_lossy);
        let status = String::from_utf8_lossy(status.unwrap_or_default());
        assert_eq!(
            show(":method").as_deref(),
            Some("CONNECT"),
            "stream {stream} answered {status}"
        );
        let authority = show(":authority");
        let dst = authority
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok());
        assert_eq!(
            dst.map(|d| (d.ip().to_canonical(), d.port())),
            Some((IpAddr::V4(WORKLOAD_IP), port)),
            "stream {stream} answered {status} for authority {authority:?}"
        );
    }
}

/// A network namespace of the fuzzer's own, so that its listeners (port 15008 on 127.0.0.2, the
/// plaintext capture port on `[::]`) meet no agent or test of the machine, nor another fuzzer
/// process. As root, a new network namespace; otherwise inside a new user namespace. Runs in
/// libFuzzer's initialisation, while the process has one thread (as `unshare` needs).
fn enter_own_netns() {
    // SAFETY: plain system calls on this thread, with buffers that outlive them.
    unsafe {
        // As in the agent's binary (the Rust runtime's default): a write to a closed peer is
        // an error, not a signal.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            let as_root = std::io::Error::last_os_error();
            let (uid, gid) = (libc::geteuid(), libc::getegid());
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                panic!(
                    "hbone_front needs a network namespace of its own: unshare(CLONE_NEWNET): \
                     {as_root}; with a user namespace: {}",
                    std::io::Error::last_os_error()
                );
            }
            let _ = std::fs::write("/proc/self/setgroups", "deny");
            std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).expect("uid_map");
            std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")).expect("gid_map");
        }
        loopback_up();
    }
}

/// `ip link set lo up`.
unsafe fn loopback_up() {
    // SAFETY: see the caller; `req` is a zeroed `ifreq` named "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        assert_eq!(
            libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req),
            0,
            "SIOCGIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        );
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req),
            0,
            "SIOCSIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        );
        libc::close(fd);
    }
}
