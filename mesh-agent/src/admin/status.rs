//! `mesh-agent status`: the node's workloads, their certificates and the connections open now,
//! read from the local agent's admin API and laid out as tables; `--plaintext` is the migration
//! report: for each workload that still accepts plaintext, who reached it in plaintext, so an
//! operator knows when STRICT is safe.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use comfy_table::{ContentArrangement, Table, presets::UTF8_HORIZONTAL_ONLY};
use serde::Deserialize;
use serde_json::Value;

use super::client;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Which report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// Workloads, certificates, open connections.
    Node,
    /// Plaintext clients of the workloads that still accept plaintext.
    Plaintext,
}

/// Reads the agent's admin API at `admin` and renders `report`.
pub async fn status(admin: SocketAddr, report: Report) -> anyhow::Result<String> {
    let dump = get_json(admin, "/config_dump").await?;
    match report {
        Report::Node => {
            let connections = get_json(admin, "/connections").await?;
            Ok(render_node(&dump, &connections, SystemTime::now()))
        }
        Report::Plaintext => {
            let clients = get_json(admin, "/plaintext_clients").await?;
            Ok(render_plaintext(&dump, &clients, SystemTime::now()))
        }
    }
}

async fn get_json(admin: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let body = client::get_url(&format!("http://{admin}"), path, REQUEST_TIMEOUT)
        .await
        .context("is the agent running, with its admin port there (--admin)?")?;
    serde_json::from_slice(&body).with_context(|| format!("http://{admin}{path} is not JSON"))
}

#[derive(Deserialize)]
struct Workload {
    name: String,
    identity: String,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    mtls: Option<Mtls>,
}

#[derive(Deserialize)]
struct Mtls {
    mode: String,
    scope: String,
    policy: Option<String>,
}

impl Mtls {
    fn describe(&self) -> String {
        match &self.policy {
            Some(policy) => format!("{} ({} {policy})", self.mode, self.scope),
            None => format!("{} ({})", self.mode, self.scope),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Certificate {
    identity: String,
    serial: String,
    not_after: String,
}

#[derive(Deserialize)]
struct Connection {
    direction: String,
    src_addr: Option<String>,
    src_workload: Option<String>,
    dst_addr: Option<String>,
    dst_workload: Option<String>,
    dst_service: Option<String>,
    security: String,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: u64,
}

#[derive(Deserialize)]
struct PlaintextClient {
    workload: String,
    client: String,
    client_workload: Option<String>,
    connections: u64,
    last_port: u16,
    first_seen: u64,
    last_seen: u64,
}

fn workloads(dump: &Value) -> Vec<Workload> {
    serde_json::from_value(dump["workloads"].clone()).unwrap_or_default()
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_HORIZONTAL_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    table
}

fn render_node(dump: &Value, connections: &Value, now: SystemTime) -> String {
    let mut out = header(dump);
    let certificates: Vec<Certificate> =
        serde_json::from_value(dump["certificates"].clone()).unwrap_or_default();
    let workloads = workloads(dump);
    out.push_str(&format!("\nWorkloads ({})\n", workloads.len()));
    let mut rows = table(&["WORKLOAD", "IDENTITY", "IPS", "MTLS", "CERTIFICATE"]);
    for w in &workloads {
        let cert = certificates
            .iter()
            .find(|c| c.identity == w.identity)
            .map_or_else(
                || "none yet".to_owned(),
                |c| {
                    format!(
                        "serial {}, {}",
                        short_serial(&c.serial),
                        expiry(&c.not_after, now)
                    )
                },
            );
        let mtls = w.mtls.as_ref().map_or_else(String::new, Mtls::describe);
        rows.add_row(vec![
            w.name.clone(),
            w.identity.clone(),
            w.ips.join(" "),
            mtls,
            cert,
        ]);
    }
    out.push_str(&format!("{rows}\n"));
    let open: Vec<Connection> = serde_json::from_value(connections.clone()).unwrap_or_default();
    out.push_str(&format!("\nOpen connections ({})\n", open.len()));
    if open.is_empty() {
        return out;
    }
    let mut rows = table(&[
        "DIRECTION",
        "SOURCE",
        "DESTINATION",
        "SECURITY",
        "SENT",
        "RECEIVED",
        "AGE",
    ]);
    for c in &open {
        let source = end(c.src_workload.as_deref(), c.src_addr.as_deref());
        let mut destination = end(c.dst_workload.as_deref(), c.dst_addr.as_deref());
        if let Some(service) = &c.dst_service {
            destination = format!("{destination} via {service}");
        }
        rows.add_row(vec![
            c.direction.clone(),
            source,
            destination,
            security_badge(&c.security).to_owned(),
            bytes(c.bytes_sent),
            bytes(c.bytes_received),
            duration(Duration::from_millis(c.duration_ms)),
        ]);
    }
    out.push_str(&format!("{rows}\n"));
    out
}

fn render_plaintext(dump: &Value, report: &Value, now: SystemTime) -> String {
    let mut out = header(dump);
    let since = report["since"].as_u64().unwrap_or(0);
    let clients: Vec<PlaintextClient> =
        serde_json::from_value(report["clients"].clone()).unwrap_or_default();
    let workloads = workloads(dump);
    let (strict, open): (Vec<_>, Vec<_>) = workloads
        .iter()
        .partition(|w| w.mtls.as_ref().is_some_and(|m| m.mode == "STRICT"));
    out.push_str(&format!(
        "\nPlaintext clients of the workloads that still accept plaintext, as this agent saw them \
         since it started ({}):\n",
        ago(since, now)
    ));
    let mut rows = table(&[
        "WORKLOAD",
        "MTLS",
        "CLIENT",
        "CONNECTIONS",
        "LAST PORT",
        "FIRST SEEN",
        "LAST SEEN",
        "IF STRICT",
    ]);
    for w in &open {
        let mtls = w.mtls.as_ref().map_or_else(String::new, Mtls::describe);
        let mine: Vec<_> = clients.iter().filter(|c| c.workload == w.name).collect();
        if mine.is_empty() {
            rows.add_row(vec![
                w.name.clone(),
                mtls,
                "none seen".to_owned(),
                "0".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                "safe: no plaintext client seen".to_owned(),
            ]);
            continue;
        }
        for c in mine {
            let client = match &c.client_workload {
                Some(name) => format!("{} ({name})", c.client),
                None => format!("{} (outside the mesh)", c.client),
            };
            rows.add_row(vec![
                w.name.clone(),
                mtls.clone(),
                client,
                c.connections.to_string(),
                c.last_port.to_string(),
                ago(c.first_seen, now),
                ago(c.last_seen, now),
                "this client would be refused".to_owned(),
            ]);
        }
    }
    out.push_str(&format!("{rows}\n"));
    if !strict.is_empty() {
        let names: Vec<_> = strict.iter().map(|w| w.name.as_str()).collect();
        out.push_str(&format!("\nAlready STRICT: {}\n", names.join(", ")));
    }
    out
}

fn header(dump: &Value) -> String {
    let node = dump["node"].as_str().unwrap_or("?");
    let trust_domain = dump["trustDomain"].as_str().unwrap_or("?");
    let ready = dump["readiness"]["ready"].as_bool().unwrap_or(false);
    let mut out = format!(
        "Node {node}, trust domain {trust_domain}: {}\n",
        if ready { "ready" } else { "NOT READY" }
    );
    for reason in dump["readiness"]["notReady"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(reason) = reason.as_str() {
            out.push_str(&format!("  {reason}\n"));
        }
    }
    out
}

fn end(workload: Option<&str>, addr: Option<&str>) -> String {
    match (workload, addr) {
        (Some(w), Some(a)) => format!("{w} {a}"),
        (Some(w), None) => w.to_owned(),
        (None, Some(a)) => a.to_owned(),
        (None, None) => "unknown".to_owned(),
    }
}

/// The words say it; the symbol catches the eye.
fn security_badge(security: &str) -> &'static str {
    match security {
        "mutual_tls" => "🔒 mTLS",
        "same_node" => "🔗 same node (no TLS, kernel-verified)",
        "none" => "⚠ plaintext",
        _ => "?",
    }
}

fn short_serial(serial: &str) -> String {
    let parts: Vec<_> = serial.split(':').collect();
    if parts.len() <= 4 {
        return serial.to_owned();
    }
    format!("{}…", parts[..4].join(":"))
}

fn expiry(not_after: &str, now: SystemTime) -> String {
    match humantime::parse_rfc3339(not_after) {
        Ok(at) => match at.duration_since(now) {
            Ok(left) => format!("expires in {}", duration(left)),
            Err(past) => format!("EXPIRED {} ago", duration(past.duration())),
        },
        Err(_) => format!("expires {not_after}"),
    }
}

fn ago(unix_seconds: u64, now: SystemTime) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(unix_seconds);
    match now.duration_since(at) {
        Ok(elapsed) => format!("{} ago", duration(elapsed)),
        Err(_) => "just now".to_owned(),
    }
}

fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dump() -> Value {
        json!({
            "node": "node-b",
            "trustDomain": "cluster.local",
            "readiness": {"ready": true, "notReady": []},
            "workloads": [
                {"name": "default/web", "identity": "spiffe://cluster.local/ns/default/sa/web",
                 "ips": ["10.0.2.2"], "mtls": {"mode": "PERMISSIVE", "scope": "default", "policy": null}},
                {"name": "default/db", "identity": "spiffe://cluster.local/ns/default/sa/db",
                 "ips": ["10.0.2.3"], "mtls": {"mode": "PERMISSIVE", "scope": "namespace", "policy": "default/ns"}},
                {"name": "default/api", "identity": "spiffe://cluster.local/ns/default/sa/api",
                 "ips": ["10.0.2.4"], "mtls": {"mode": "STRICT", "scope": "workload", "policy": "default/api"}},
            ],
            "certificates": [
                {"identity": "spiffe://cluster.local/ns/default/sa/web", "serial": "1a:2b:3c:4d:5e:6f",
                 "notAfter": "2026-12-03T09:00:00Z"},
            ],
        })
    }

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn the_node_report_lists_workloads_certificates_and_open_connections() {
        let connections = json!([{
            "direction": "inbound", "src_addr": "10.0.1.2:40000", "src_workload": "default/client",
            "src_identity": "spiffe://cluster.local/ns/default/sa/client",
            "dst_addr": "10.0.2.2:8080", "dst_workload": "default/web", "dst_service": null,
            "security": "mutual_tls", "bytes_sent": 12_345, "bytes_received": 999,
            "opened_at": 0, "duration_ms": 65_000,
        }]);
        let text = render_node(&dump(), &connections, at("2026-12-02T09:00:00Z"));
        for want in [
            "Node node-b, trust domain cluster.local: ready",
            "Workloads (3)",
            "default/web",
            "PERMISSIVE (namespace default/ns)",
            "serial 1a:2b:3c:4d…, expires in 1d 0h",
            "none yet",
            "Open connections (1)",
            "default/client 10.0.1.2:40000",
            "🔒 mTLS",
            "12.3 KB",
            "999 B",
            "1m 5s",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn the_plaintext_report_says_which_workloads_strict_would_break() {
        let now = at("2026-12-02T09:00:00Z");
        let since = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 3600;
        let report = json!({"since": since, "clients": [{
            "workload": "default/web", "client": "10.0.1.3", "client_workload": null,
            "connections": 3, "last_port": 8080, "first_seen": since + 60, "last_seen": since + 3595,
        }]});
        let text = render_plaintext(&dump(), &report, now);
        for want in [
            "since it started (1h 0m ago)",
            "10.0.1.3 (outside the mesh)",
            "this client would be refused",
            "59m 0s ago",
            "5s ago",
            "safe: no plaintext client seen",
            "Already STRICT: default/api",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let web_rows = text.lines().filter(|l| l.contains("default/web")).count();
        assert_eq!(web_rows, 1, "{text}");
    }
}
