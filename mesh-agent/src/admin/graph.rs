//! `mesh-agent graph`: the service graph from Prometheus, as Kiali draws it for its security
//! view: workloads as nodes, an edge per source, destination and security, with connection and
//! byte rates; a lock for mutual TLS, an open mark for plaintext, a red mark for denied
//! connections and a badge of its own for same-node ones. Written as Graphviz DOT, and as SVG or
//! PNG through `dot` when it is installed.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::client;

/// The labels Kiali groups the TCP metrics by for its workload graph.
const EDGE_LABELS: &str = "source_workload_namespace, source_workload, destination_workload_namespace, destination_workload, connection_security_policy";

/// What to draw, and from where.
pub struct GraphRequest {
    /// Prometheus's base URL, e.g. `http://prometheus:9090`.
    pub prometheus: String,
    /// The rate window, in PromQL's syntax (`1m`, `5m`).
    pub window: String,
    pub out: PathBuf,
}

/// One edge: traffic from `source` to `destination` secured as `security`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    /// `mutual_tls`, `same_node` or `unknown` (plaintext), as the metrics say.
    pub security: String,
    /// Connections opened in the window.
    pub connections: f64,
    /// Bytes per second, both directions.
    pub bytes_per_second: f64,
    /// Connections closed as denied in the window.
    pub denied: f64,
}

/// Queries Prometheus, writes the graph to `request.out` (DOT, or SVG/PNG by its extension),
/// and returns the edges drawn.
pub async fn draw(request: &GraphRequest) -> anyhow::Result<Vec<Edge>> {
    let edges = edges(&request.prometheus, &request.window).await?;
    let dot = to_dot(&edges, &request.window);
    write_graph(&dot, &request.out)?;
    Ok(edges)
}

/// The edges, from the destination reporter: only it knows how the connection reached the
/// workload (Kiali reads `connection_security_policy` the same way).
pub async fn edges(prometheus: &str, window: &str) -> anyhow::Result<Vec<Edge>> {
    let opened = format!(
        "sum by ({EDGE_LABELS}) (increase(istio_tcp_connections_opened_total{{reporter=\"destination\"}}[{window}]))"
    );
    let bytes = format!(
        "sum by ({EDGE_LABELS}) (rate(istio_tcp_sent_bytes_total{{reporter=\"destination\"}}[{window}]) + rate(istio_tcp_received_bytes_total{{reporter=\"destination\"}}[{window}]))"
    );
    let denied = format!(
        "sum by ({EDGE_LABELS}) (increase(istio_tcp_connections_closed_total{{reporter=\"destination\",response_flags=\"DENY\"}}[{window}]))"
    );
    let mut by_key: BTreeMap<(String, String, String), Edge> = BTreeMap::new();
    for (query, set) in [
        (
            &opened,
            (|e: &mut Edge, v| e.connections = v) as fn(&mut Edge, f64),
        ),
        (&bytes, |e: &mut Edge, v| e.bytes_per_second = v),
        (&denied, |e: &mut Edge, v| e.denied = v),
    ] {
        for (key, value) in query_vector(prometheus, query).await? {
            let edge = by_key.entry(key.clone()).or_insert_with(|| Edge {
                source: key.0.clone(),
                destination: key.1.clone(),
                security: key.2.clone(),
                ..Edge::default()
            });
            set(edge, value);
        }
    }
    Ok(by_key
        .into_values()
        .filter(|e| e.connections > 0.0 || e.bytes_per_second > 0.0 || e.denied > 0.0)
        .collect())
}

async fn query_vector(
    prometheus: &str,
    promql: &str,
) -> anyhow::Result<Vec<((String, String, String), f64)>> {
    let path = format!(
        "/api/v1/query?query={}",
        percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC)
    );
    let body = client::get_url(prometheus, &path, Duration::from_secs(10))
        .await
        .with_context(|| format!("querying Prometheus at {prometheus}"))?;
    let answer: Value = serde_json::from_slice(&body).context("Prometheus's answer is not JSON")?;
    if answer["status"] != "success" {
        bail!("Prometheus refused {promql}: {answer}");
    }
    let name = |metric: &Value, ns: &str, wl: &str| -> String {
        let (ns, wl) = (
            metric[ns].as_str().unwrap_or("unknown"),
            metric[wl].as_str().unwrap_or("unknown"),
        );
        if wl == "unknown" {
            "unknown".to_owned()
        } else {
            format!("{ns}/{wl}")
        }
    };
    Ok(answer["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|sample| {
            let metric = &sample["metric"];
            let value: f64 = sample["value"][1].as_str()?.parse().ok()?;
            let key = (
                name(metric, "source_workload_namespace", "source_workload"),
                name(
                    metric,
                    "destination_workload_namespace",
                    "destination_workload",
                ),
                metric["connection_security_policy"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
            );
            Some((key, value))
        })
        .collect())
}

/// How each kind of edge is drawn: a mark, a word, a colour, a line style.
fn look(edge: &Edge) -> (&'static str, &'static str, &'static str, &'static str) {
    match edge.security.as_str() {
        "mutual_tls" => ("🔒", "mTLS", "#2e7d32", "solid"),
        "same_node" => (
            "🔗",
            "same node, kernel-verified, no TLS",
            "#1565c0",
            "solid",
        ),
        _ => ("🔓", "plaintext", "#ef6c00", "dashed"),
    }
}

/// The graph in Graphviz DOT.
pub fn to_dot(edges: &[Edge], window: &str) -> String {
    let mut dot = String::from(
        "digraph mesh {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f5f5f5\", fontname=\"sans-serif\"];\n  edge [fontname=\"sans-serif\", fontsize=10];\n",
    );
    let _ = writeln!(
        dot,
        "  label=\"mesh traffic, last {window} (Prometheus, reporter=destination)\";\n  labelloc=t;"
    );
    let mut nodes: Vec<&str> = edges
        .iter()
        .flat_map(|e| [e.source.as_str(), e.destination.as_str()])
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    for node in nodes {
        let label = if node == "unknown" {
            "unknown\\n(outside the mesh)"
        } else {
            node
        };
        let _ = writeln!(dot, "  {} [label={}];", quote(node), quote_escaped(label));
    }
    for edge in edges {
        let (mark, word, colour, style) = look(edge);
        let mut label = format!(
            "{mark} {word}\\n{:.0} conn, {}/s",
            edge.connections,
            bytes(edge.bytes_per_second)
        );
        let colour = if edge.denied > 0.0 {
            let _ = write!(label, "\\n✖ {:.0} denied", edge.denied);
            "#c62828"
        } else {
            colour
        };
        let _ = writeln!(
            dot,
            "  {} -> {} [label={}, color={}, fontcolor={}, style={style}, penwidth=2];",
            quote(&edge.source),
            quote(&edge.destination),
            quote_escaped(&label),
            quote(colour),
            quote(colour),
        );
    }
    dot.push_str("}\n");
    dot
}

/// Writes DOT as it is, or renders SVG or PNG through Graphviz's `dot`.
fn write_graph(dot: &str, out: &Path) -> anyhow::Result<()> {
    let format = match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => "svg",
        Some("png") => "png",
        _ => {
            return std::fs::write(out, dot).with_context(|| format!("writing {}", out.display()));
        }
    };
    let source = out.with_extension("dot");
    std::fs::write(&source, dot).with_context(|| format!("writing {}", source.display()))?;
    let rendered = Command::new("dot")
        .arg(format!("-T{format}"))
        .arg("-o")
        .arg(out)
        .arg(&source)
        .output()
        .context("running Graphviz's `dot` (install graphviz, or write a .dot file)")?;
    if !rendered.status.success() {
        bail!(
            "dot -T{format} failed: {}",
            String::from_utf8_lossy(&rendered.stderr).trim()
        );
    }
    Ok(())
}

fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// For labels that already hold DOT's `\n` line breaks.
fn quote_escaped(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\\\""))
}

fn bytes(per_second: f64) -> String {
    match per_second {
        v if v >= 1e9 => format!("{:.1} GB", v / 1e9),
        v if v >= 1e6 => format!("{:.1} MB", v / 1e6),
        v if v >= 1e3 => format!("{:.1} KB", v / 1e3),
        v => format!("{v:.0} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(source: &str, security: &str, denied: f64) -> Edge {
        Edge {
            source: source.to_owned(),
            destination: "default/web".to_owned(),
            security: security.to_owned(),
            connections: 3.0,
            bytes_per_second: 2_500.0,
            denied,
        }
    }

    #[test]
    fn edges_carry_their_marks() {
        let dot = to_dot(
            &[
                edge("default/client", "mutual_tls", 0.0),
                edge("unknown", "unknown", 0.0),
                edge("team/other", "mutual_tls", 2.0),
                edge("default/batch", "same_node", 0.0),
            ],
            "1m",
        );
        assert!(dot.contains(r##""default/client" -> "default/web" [label="🔒 mTLS\n3 conn, 2.5 KB/s", color="#2e7d32""##), "{dot}");
        assert!(
            dot.contains(r#""unknown" -> "default/web" [label="🔓 plaintext"#),
            "{dot}"
        );
        assert!(dot.contains(r##"✖ 2 denied", color="#c62828""##), "{dot}");
        assert!(dot.contains("🔗 same node"), "{dot}");
        assert!(
            dot.contains(r#""unknown" [label="unknown\n(outside the mesh)"]"#),
            "{dot}"
        );
        assert!(dot.starts_with("digraph mesh {") && dot.ends_with("}\n"));
    }
}
