//! Load generator of the soak (`mesh-bench --soak`, `cargo xtask soak`): a many-connection echo
//! server and two clients, run inside pods' network namespaces by the harness. Every result is a
//! JSON line on stdout; diagnostics go to stderr.
//!
//! - `serve --port P [--ports N]`: echoes what it reads on every connection, on ports P to
//!   P+N-1; tens of thousands at once (an idle connection holds no buffer).
//! - `hold --to IP:PORT --count N`: opens N connections (at most `--concurrency` being opened at
//!   once), echoes one byte on each to prove it is through, and keeps them. Every `--check-every`
//!   seconds it echoes a byte on the next `--sample` of them (in turn, so every one is checked
//!   again and again); a connection that fails is reported and dropped. When stdin closes it
//!   checks all it still holds, closes them and exits. Lines: `opened`, then `check` (one per
//!   round), `broken` (the first few failures in detail), `final`, `closed`.
//! - `churn --to IP:PORT --rate R --seconds S [--ports N]`: opens R new connections per second
//!   for S seconds, to PORT..PORT+N-1 in turn
//!   (paced on a 2 ms clock from the start, so a late tick is caught up; at most
//!   `--max-in-flight` at once: past it the schedule falls behind, and what was not launched by
//!   the end of the window never is), each: connect, write `--bytes`, read them back, close.
//!   One summary line: successes, failures by kind, the rate achieved, latency percentiles.
//!
//! All three raise their open-files limit first.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
#[command(about = "Load generator of the mesh soak")]
struct Cli {
    /// Runtime worker threads
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server (IPv4 and IPv6)
    Serve {
        #[arg(long)]
        port: u16,
        /// Listen on this many ports: `--port` and the next ones
        #[arg(long, default_value_t = 1)]
        ports: u16,
    },
    /// Open and hold connections, checking them until stdin closes
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Connections being opened at once
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        /// Seconds between two sample checks
        #[arg(long, default_value_t = 2.0)]
        check_every: f64,
        /// Connections checked per round
        #[arg(long, default_value_t = 1000)]
        sample: usize,
        /// Limit of one open or one echo, milliseconds
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// New connections at a fixed rate
    Churn {
        #[arg(long)]
        to: SocketAddr,
        /// New connections per second
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        seconds: f64,
        /// Spread the connections over this many ports: the port of `--to` and the next ones
        #[arg(long, default_value_t = 1)]
        ports: u16,
        /// Bytes written and read back on each
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// New connections open at once, at most
        #[arg(long, default_value_t = 512)]
        max_in_flight: usize,
        /// Limit of one whole connection, milliseconds
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

/// Failures reported in detail, per phase; the rest are only counted.
const DETAILED_FAILURES: usize = 10;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let nofile = match raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("mesh-load: raising the open-files limit: {e}");
            0
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve { port, ports } => {
                let listeners = (0..ports.max(1))
                    .map(|k| tokio::spawn(serve(port + k)))
                    .collect::<Vec<_>>();
                // Each runs until it fails to listen.
                for l in listeners {
                    l.await.map_err(|e| e.to_string())??;
                }
                Ok(())
            }
            Cmd::Hold {
                to,
                count,
                concurrency,
                check_every,
                sample,
                timeout_ms,
            } => {
                let opts = HoldOpts {
                    to,
                    count,
                    concurrency: concurrency.max(1),
                    check_every: Duration::from_secs_f64(check_every.max(0.1)),
                    sample,
                    timeout: Duration::from_millis(timeout_ms),
                    nofile,
                };
                hold(opts).await
            }
            Cmd::Churn {
                to,
                rate,
                seconds,
                ports,
                bytes,
                max_in_flight,
                timeout_ms,
            } => {
                let opts = ChurnOpts {
                    to,
                    rate,
                    seconds,
                    ports: ports.max(1),
                    bytes: bytes.max(1),
                    max_in_flight: max_in_flight.max(1),
                    timeout: Duration::from_millis(timeout_ms),
                };
                churn(opts).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises RLIMIT_NOFILE (soft and hard) as far as the kernel allows; the new soft limit.
fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    // Raising the hard limit needs CAP_SYS_RESOURCE (the harness runs as root).
    let want = libc::rlimit {
        rlim_cur: nr_open.max(lim.rlim_max),
        rlim_max: nr_open.max(lim.rlim_max),
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
        return Ok(want.rlim_cur);
    }
    let up = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &up) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(up.rlim_cur)
}

fn print(v: Value) {
    // One write per line, so lines of concurrent tasks never interleave.
    println!("{v}");
}

/// A short, countable name for a failure: `connect: ConnectionRefused`, `read: UnexpectedEof`.
fn kind(stage: &str, e: &io::Error) -> String {
    format!("{stage}: {:?}", e.kind())
}

#[derive(Debug)]
struct Failure {
    kind: String,
    detail: String,
}

impl Failure {
    fn io(stage: &str, e: io::Error) -> Self {
        Failure {
            kind: kind(stage, &e),
            detail: format!("{stage}: {e}"),
        }
    }
    fn other(kind: &str, detail: String) -> Self {
        Failure {
            kind: kind.into(),
            detail,
        }
    }
}

/// Failure counts by kind, and the first few in detail.
#[derive(Default)]
struct Failures {
    by_kind: BTreeMap<String, u64>,
    total: u64,
}

impl Failures {
    /// Counts `f`; prints it in detail while there were fewer than [`DETAILED_FAILURES`].
    fn add(&mut self, f: &Failure, phase: &str, index: Option<usize>) {
        if (self.total as usize) < DETAILED_FAILURES {
            print(json!({"event": "broken", "phase": phase, "index": index, "error": f.detail}));
        }
        *self.by_kind.entry(f.kind.clone()).or_default() += 1;
        self.total += 1;
    }
    fn json(&self) -> Value {
        json!(self.by_kind)
    }
}

// ------------------------------------------------------------------- serve

async fn serve(port: u16) -> Result<(), String> {
    let socket = TcpSocket::new_v6().map_err(|e| format!("socket: {e}"))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    // Dual stack: IPV6_V6ONLY off (the default on Linux, set here to be sure).
    set_v6only_off(&socket);
    socket
        .bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))
        .map_err(|e| format!("bind port {port}: {e}"))?;
    let listener = socket
        .listen(8192)
        .map_err(|e| format!("listen on port {port}: {e}"))?;
    let mut accept_errors = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(echo(stream));
            }
            Err(e) => {
                accept_errors += 1;
                if accept_errors <= 10 || accept_errors.is_power_of_two() {
                    eprintln!("mesh-load serve: accept failed ({accept_errors} so far): {e}");
                }
                // EMFILE and the like: let connections close before accepting again.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn set_v6only_off(socket: &TcpSocket) {
    use std::os::fd::AsRawFd as _;
    let off: libc::c_int = 0;
    // SAFETY: a valid socket and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const off).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Echoes until EOF or an error. The buffer exists only while there is data to echo, so an idle
/// connection costs its task and its socket.
async fn echo(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 * 1024];
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

// -------------------------------------------------------------------- hold

struct HoldOpts {
    to: SocketAddr,
    count: usize,
    concurrency: usize,
    check_every: Duration,
    sample: usize,
    timeout: Duration,
    nofile: u64,
}

async fn open_one(to: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    let mut stream = match tokio::time::timeout(timeout, TcpStream::connect(to)).await {
        Err(_) => {
            return Err(Failure::other(
                "connect: timeout",
                format!("connect: no answer within {timeout:?}"),
            ));
        }
        Ok(Err(e)) => return Err(Failure::io("connect", e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    echo_byte(&mut stream, b'o', timeout).await?;
    Ok(stream)
}

/// Writes one byte and reads it back.
async fn echo_byte(stream: &mut TcpStream, byte: u8, timeout: Duration) -> Result<(), Failure> {
    let exchange = async {
        stream
            .write_all(&[byte])
            .await
            .map_err(|e| Failure::io("write", e))?;
        let mut b = [0u8; 1];
        stream
            .read_exact(&mut b)
            .await
            .map_err(|e| Failure::io("read", e))?;
        if b[0] != byte {
            return Err(Failure::other(
                "mismatch",
                format!("sent {byte:#04x}, read back {:#04x}", b[0]),
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(Failure::other(
            "echo: timeout",
            format!("no echo within {timeout:?}"),
        )),
    }
}

/// Echoes a byte on each connection in `which` (indices into `conns`), `concurrency` at a time;
/// a failed one is dropped from `conns`. (checked, failed in this round).
async fn check(
    conns: &mut [Option<TcpStream>],
    which: Vec<usize>,
    opts: &HoldOpts,
    failures: &mut Failures,
    phase: &str,
    byte: u8,
) -> (usize, usize) {
    let taken: Vec<(usize, TcpStream)> = which
        .into_iter()
        .filter_map(|i| conns[i].take().map(|s| (i, s)))
        .collect();
    let checked = taken.len();
    let timeout = opts.timeout;
    let mut results = futures::stream::iter(taken)
        .map(|(i, mut s)| async move {
            let r = echo_byte(&mut s, byte, timeout).await;
            (i, s, r)
        })
        .buffer_unordered(opts.concurrency);
    let mut failed = 0;
    while let Some((i, s, r)) = results.next().await {
        match r {
            Ok(()) => conns[i] = Some(s),
            Err(f) => {
                failed += 1;
                failures.add(&f, phase, Some(i));
            }
        }
    }
    (checked, failed)
}

async fn hold(opts: HoldOpts) -> Result<(), String> {
    let started = Instant::now();
    let mut failures = Failures::default();
    let mut conns: Vec<Option<TcpStream>> = Vec::with_capacity(opts.count);
    {
        let (to, timeout) = (opts.to, opts.timeout);
        let mut opened = futures::stream::iter(0..opts.count)
            .map(|i| async move { (i, open_one(to, timeout).await) })
            .buffer_unordered(opts.concurrency);
        while let Some((i, r)) = opened.next().await {
            match r {
                Ok(s) => conns.push(Some(s)),
                Err(f) => failures.add(&f, "open", Some(i)),
            }
        }
    }
    let held = conns.len();
    print(json!({
        "event": "opened",
        "held": held,
        "failed": failures.total,
        "errors": failures.json(),
        "open_s": started.elapsed().as_secs_f64(),
        "nofile": opts.nofile,
    }));

    // stdin's end is the signal to finish; read on a thread of its own (tokio's stdin needs a
    // feature the workspace does not enable).
    let (eof_tx, mut eof_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = eof_tx.send(());
    });

    let mut cursor = 0usize;
    let mut round = 0u64;
    let mut total_checked = 0u64;
    let mut tick = tokio::time::interval(opts.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = &mut eof_rx => break,
            _ = tick.tick() => {}
        }
        if conns.is_empty() || opts.sample == 0 {
            continue;
        }
        round += 1;
        let n = conns.len();
        let k = opts.sample.min(n);
        let which: Vec<usize> = (0..k).map(|j| (cursor + j) % n).collect();
        cursor = (cursor + k) % n;
        let t = Instant::now();
        let byte = b'a' + (round % 26) as u8;
        let (checked, failed) = check(&mut conns, which, &opts, &mut failures, "check", byte).await;
        total_checked += checked as u64;
        print(json!({
            "event": "check",
            "round": round,
            "t_s": started.elapsed().as_secs_f64(),
            "checked": checked,
            "failed": failed,
            "held": conns.iter().filter(|c| c.is_some()).count(),
            "check_ms": t.elapsed().as_secs_f64() * 1e3,
        }));
    }

    let t = Instant::now();
    let all: Vec<usize> = (0..conns.len()).collect();
    let broken_before = failures.total;
    let (checked, failed) = check(&mut conns, all, &opts, &mut failures, "final", b'z').await;
    print(json!({
        "event": "final",
        "checked": checked,
        "failed": failed,
        "held": conns.iter().filter(|c| c.is_some()).count(),
        "check_ms": t.elapsed().as_secs_f64() * 1e3,
        "rounds": round,
        "sample_checks": total_checked,
        "failed_total": failures.total,
        "failed_before_final": broken_before,
        "errors": failures.json(),
    }));
    let t = Instant::now();
    drop(conns);
    print(json!({"event": "closed", "close_ms": t.elapsed().as_secs_f64() * 1e3}));
    Ok(())
}

// ------------------------------------------------------------------- churn

struct ChurnOpts {
    to: SocketAddr,
    rate: f64,
    seconds: f64,
    ports: u16,
    bytes: usize,
    max_in_flight: usize,
    timeout: Duration,
}

#[derive(Default)]
struct ChurnStats {
    ok: u64,
    failures: Failures,
    /// Latency of each successful connection, µs: connect to the last byte read back.
    latencies_us: Vec<u32>,
    /// Successful connections finished in each second since the start.
    per_second: Vec<u64>,
    /// When the last connection finished, since the start.
    last_done: Duration,
}

async fn one_connection(to: SocketAddr, payload: Arc<Vec<u8>>) -> Result<(), Failure> {
    let mut s = TcpStream::connect(to)
        .await
        .map_err(|e| Failure::io("connect", e))?;
    let _ = s.set_nodelay(true);
    s.write_all(&payload)
        .await
        .map_err(|e| Failure::io("write", e))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)
        .await
        .map_err(|e| Failure::io("read", e))?;
    if back != *payload {
        return Err(Failure::other(
            "mismatch",
            "the echo differs from what was written".into(),
        ));
    }
    Ok(())
}

async fn churn(opts: ChurnOpts) -> Result<(), String> {
    if !(opts.rate > 0.0 && opts.seconds > 0.0) {
        return Err("--rate and --seconds must be positive".into());
    }
    let payload: Arc<Vec<u8>> = Arc::new((0..opts.bytes).map(|i| b'a' + (i % 26) as u8).collect());
    let stats = Arc::new(Mutex::new(ChurnStats::default()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let window = Duration::from_secs_f64(opts.seconds);
    let planned = (opts.rate * opts.seconds).round() as u64;
    let start = Instant::now();
    let mut launched = 0u64;
    // Ticks at which the in-flight limit held a connection back.
    let mut held_back_ticks = 0u64;
    let mut max_in_flight_seen = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let elapsed = start.elapsed();
        // The schedule ends with the window: what the in-flight limit holds back at its end is
        // never launched (`planned` - `launched`).
        let due = if elapsed >= window {
            planned
        } else {
            ((opts.rate * elapsed.as_secs_f64()) as u64).min(planned)
        };
        while launched < due {
            let now_in_flight = in_flight.load(Ordering::Relaxed);
            max_in_flight_seen = max_in_flight_seen.max(now_in_flight);
            if now_in_flight >= opts.max_in_flight {
                held_back_ticks += 1;
                break;
            }
            launched += 1;
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (stats, in_flight, payload) = (stats.clone(), in_flight.clone(), payload.clone());
            let mut to = opts.to;
            to.set_port(opts.to.port() + (launched % u64::from(opts.ports)) as u16);
            let timeout = opts.timeout;
            tokio::spawn(async move {
                let t0 = Instant::now();
                let r = match tokio::time::timeout(timeout, one_connection(to, payload)).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure::other(
                        "timeout",
                        format!("not done within {timeout:?}"),
                    )),
                };
                let done = start.elapsed();
                let mut st = stats.lock().unwrap();
                st.last_done = st.last_done.max(done);
                match r {
                    Ok(()) => {
                        st.ok += 1;
                        st.latencies_us
                            .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        let sec = done.as_secs() as usize;
                        if st.per_second.len() <= sec {
                            st.per_second.resize(sec + 1, 0);
                        }
                        st.per_second[sec] += 1;
                    }
                    Err(f) => st.failures.add(&f, "churn", None),
                }
                drop(st);
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
        if elapsed >= window {
            break;
        }
    }
    let launch_s = start.elapsed().as_secs_f64();
    // The last ones finish, or time out.
    let deadline = Instant::now() + opts.timeout + Duration::from_secs(1);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let unfinished = in_flight.load(Ordering::Relaxed);
    let mut st = stats.lock().unwrap();
    let mut lat = std::mem::take(&mut st.latencies_us);
    lat.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        if lat.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        Some(lat[rank.clamp(1, lat.len()) - 1] as f64)
    };
    // The full seconds of the window (the last, partial one left out).
    let full = (opts.seconds.floor() as usize).max(1);
    let mut per_second: Vec<u64> = st.per_second.iter().copied().take(full).collect();
    per_second.resize(full, 0);
    let mut sorted = per_second.clone();
    sorted.sort_unstable();
    let busy_s = st.last_done.as_secs_f64().max(opts.seconds);
    print(json!({
        "event": "churn",
        "target_rate": opts.rate,
        "ports": opts.ports,
        "seconds": opts.seconds,
        "bytes": opts.bytes,
        "planned": planned,
        "launched": launched,
        "not_launched": planned - launched,
        "ok": st.ok,
        "failed": st.failures.total,
        "unfinished": unfinished,
        "errors": st.failures.json(),
        "launch_s": launch_s,
        "last_done_s": st.last_done.as_secs_f64(),
        // Successful connections per second, from the start to the last one done (at least the
        // window): what the mesh carried.
        "achieved_rate": st.ok as f64 / busy_s,
        "launched_rate": launched as f64 / launch_s.max(opts.seconds),
        "per_second_min": sorted.first().copied().unwrap_or(0),
        "per_second_median": sorted.get(sorted.len() / 2).copied().unwrap_or(0),
        "per_second_max": sorted.last().copied().unwrap_or(0),
        "per_second": per_second,
        "max_in_flight_seen": max_in_flight_seen,
        "held_back_ticks": held_back_ticks,
        "latency_us": {
            "p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0), "p999": pct(99.9),
            "max": lat.last().map(|&v| v as f64),
        },
    }));
    Ok(())
}
