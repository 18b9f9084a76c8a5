//! Readiness probes: `tcpSocket` and `httpGet`, with kubelet's timing (initial delay, period,
//! timeout, success and failure thresholds). They run from a thread that joins the pod's
//! network namespace, so they reach the pod at its own address whatever it binds, and are
//! not a pod's traffic to the mesh (the thread is in the kubelet's cgroup, not the pod's).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::blocking;

/// What one probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// A TCP connection is accepted.
    Tcp(SocketAddr),
    /// `GET path` answers 200..=399.
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
        headers: Vec<(String, String)>,
    },
}

/// A readiness probe of one container, ready to run.
#[derive(Debug, Clone)]
pub(crate) struct Prober {
    check: Check,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Prober {
    /// The probe of `probe` (of `container`, whose named ports it may use) against the pod
    /// at `pod_ip`; an error for what this kubelet does not run (exec, grpc, HTTPS).
    pub(crate) fn new(probe: &Probe, container: &Container, pod_ip: IpAddr) -> Result<Self> {
        let check = if let Some(tcp) = &probe.tcp_socket {
            let ip = target_host(tcp.host.as_deref(), pod_ip)?;
            Check::Tcp(SocketAddr::new(ip, port(&tcp.port, container)?))
        } else if let Some(http) = &probe.http_get {
            if http.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                bail!("mesh-kubelet probes plain HTTP only, not {:?}", http.scheme);
            }
            let ip = target_host(http.host.as_deref(), pod_ip)?;
            let addr = SocketAddr::new(ip, port(&http.port, container)?);
            let headers: Vec<(String, String)> = http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect();
            let host = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("host"))
                .map_or_else(|| addr.to_string(), |(_, v)| v.clone());
            Check::Http {
                addr,
                host,
                path: http.path.clone().unwrap_or_else(|| "/".into()),
                headers,
            }
        } else {
            bail!("mesh-kubelet runs tcpSocket and httpGet probes only");
        };
        let seconds = |v: Option<i32>, default: u64| {
            Duration::from_secs(v.and_then(|s| u64::try_from(s).ok()).unwrap_or(default))
        };
        let count = |v: Option<i32>, default: u32| {
            v.and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        Ok(Prober {
            check,
            initial_delay: seconds(probe.initial_delay_seconds, 0),
            period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        })
    }

    /// Probes forever, calling `report` with the container's readiness whenever it changes
    /// (it starts not ready); the caller aborts the task when the container stops.
    pub(crate) async fn run(self, netns: PathBuf, report: impl Fn(bool)) {
        tokio::time::sleep(self.initial_delay).await;
        let (mut ready, mut successes, mut failures) = (false, 0, 0);
        loop {
            let (check, ns, timeout) = (self.check.clone(), netns.clone(), self.timeout);
            let passed =
                blocking(move || crate::sys::in_netns(&ns, || check_once(&check, timeout)))
                    .await
                    .unwrap_or(false);
            if passed {
                (successes, failures) = (successes + 1, 0);
            } else {
                (successes, failures) = (0, failures + 1);
            }
            let now = if ready {
                failures < self.failure_threshold
            } else {
                successes >= self.success_threshold
            };
            if now != ready {
                ready = now;
                report(ready);
            }
            tokio::time::sleep(self.period).await;
        }
    }
}

/// The probe's `host` (an address; names are not resolved) or the pod's address.
fn target_host(host: Option<&str>, pod_ip: IpAddr) -> Result<IpAddr> {
    match host.filter(|h| !h.is_empty()) {
        None => Ok(pod_ip),
        Some(h) => h
            .parse()
            .map_err(|_| anyhow!("probe host {h:?} is not an IP address")),
    }
}

/// A probe port: a number, or the name of one of the container's ports.
fn port(port: &IntOrString, container: &Container) -> Result<u16> {
    let number = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .ok_or_else(|| anyhow!("probe port {name:?} is not a port of the container"))?,
    };
    u16::try_from(number)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| anyhow!("probe port {number} is out of range"))
}

/// One probe, from the calling thread's network namespace.
fn check_once(check: &Check, timeout: Duration) -> bool {
    match check {
        Check::Tcp(addr) => TcpStream::connect_timeout(addr, timeout).is_ok(),
        Check::Http {
            addr,
            host,
            path,
            headers,
        } => http_status(*addr, host, path, headers, timeout)
            .is_ok_and(|code| (200..400).contains(&code)),
    }
}

/// The status code of `GET path` (HTTP/1.1, the connection closed after it), as kubelet sends
/// it (`User-Agent: kube-probe/<version>`).
fn http_status(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kube-probe/1.36\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    let code = line
        .strip_prefix("HTTP/1.")
        .and_then(|l| l.get(2..5))
        .ok_or_else(|| anyhow!("not an HTTP answer: {line:?}"))?;
    Ok(code.parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container() -> Container {
        serde_json::from_value(json!({
            "name": "c", "image": "i", "ports": [{"name": "web", "containerPort": 8080}]
        }))
        .unwrap()
    }

    #[test]
    fn named_ports_and_defaults() {
        let probe: Probe =
            serde_json::from_value(json!({"httpGet": {"port": "web", "path": "/ready"}})).unwrap();
        let ip: IpAddr = "10.1.0.2".parse().unwrap();
        let p = Prober::new(&probe, &container(), ip).unwrap();
        assert_eq!(
            p.check,
            Check::Http {
                addr: "10.1.0.2:8080".parse().unwrap(),
                host: "10.1.0.2:8080".into(),
                path: "/ready".into(),
                headers: vec![],
            }
        );
        assert_eq!(
            (p.period, p.timeout, p.failure_threshold),
            (Duration::from_secs(10), Duration::from_secs(1), 3)
        );
        let exec: Probe = serde_json::from_value(json!({"exec": {"command": ["true"]}})).unwrap();
        assert!(Prober::new(&exec, &container(), ip).is_err());
    }

    #[test]
    fn http_status_reads_the_status_line() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
                .unwrap();
        });
        let code = http_status(addr, "h", "/healthz", &[], Duration::from_secs(2)).unwrap();
        assert_eq!(code, 503);
        server.join().unwrap();
    }
}
