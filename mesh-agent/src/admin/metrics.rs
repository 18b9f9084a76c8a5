//! The agent's metrics, under Istio's names so Kiali and Istio dashboards work unchanged.
//!
//! See docs/observability.md for the meaning of every metric and label.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The value printed for a label whose value is not known (an empty string prints it too).
pub const UNKNOWN: &str = "unknown";

/// Defines a closed set of label values: an enum, its text and its label encoding.
macro_rules! label_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant,)+ }

        impl $name {
            /// The label value, as exposed.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text,)+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// Which end of the connection the metric is reported for (Istio's `reporter`).
    pub enum Reporter {
        /// Reported by the agent on the source workload's node (outbound).
        Source => "source",
        /// Reported by the agent on the destination workload's node (inbound).
        Destination => "destination",
    }
}

label_enum! {
    /// Envoy-style response flags (`response_flags`), as Kiali interprets them.
    pub enum ResponseFlags {
        /// Nothing went wrong: `-`.
        None => "-",
        /// `UF`: the connection to the destination (the far agent or the app) failed.
        UpstreamConnectFailure => "UF",
        /// `UC`: the destination side closed or reset the connection abnormally.
        UpstreamTermination => "UC",
        /// `DC`: the source side closed or reset the connection abnormally.
        DownstreamTermination => "DC",
        /// `DENY`: refused by authorization policy (the value ztunnel uses).
        Denied => "DENY",
        /// `UH`: a Service without a ready endpoint on the port.
        NoHealthyUpstream => "UH",
        /// `UO`: refused because the workload is at its limit (fair sharing, as Envoy's
        /// circuit breakers record an overflow).
        Overflow => "UO",
    }
}

impl Default for ResponseFlags {
    fn default() -> Self {
        Self::None
    }
}

label_enum! {
    /// `connection_security_policy`: Kiali draws its padlock for `mutual_tls`.
    pub enum SecurityPolicy {
        /// Mutual TLS between the two agents.
        MutualTls => "mutual_tls",
        /// Both ends on one node, the source proven by the kernel (the listener that captured
        /// it), no TLS: the bytes never left the node. Not `mutual_tls`, so Kiali draws no lock.
        SameNode => "same_node",
        /// Plaintext or not known; Istio prints `unknown` for plaintext too.
        Unknown => "unknown",
    }
}

label_enum! {
    /// `result` of `mesh_agent_policy_reloads_total`.
    pub enum ReloadResult {
        /// The new policy set is in force.
        Loaded => "loaded",
        /// It was refused; the last good one stays in force.
        Rejected => "rejected",
    }
}

label_enum! {
    /// `result` of `mesh_agent_certificate_renewals_total`.
    pub enum RenewalResult {
        /// A new certificate was issued and installed.
        Success => "success",
        /// Issuing or installing the certificate failed; the old one stays in use.
        Failure => "failure",
    }
}

/// The labels of the four `istio_tcp_*` metrics, in Istio's order and with Istio's names.
///
/// Empty strings are exposed as `unknown`, like fields left at their default.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    /// Name of the source workload (e.g. the Deployment), not the pod.
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// SPIFFE ID of the source, as proven by its certificate (e.g. `spiffe://td/ns/a/sa/b`).
    pub source_principal: String,
    /// The source's `app` (or `app.kubernetes.io/name`) label.
    pub source_app: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    /// SPIFFE ID of the destination.
    pub destination_principal: String,
    /// Host name of the destination service, e.g. `web.default.svc.cluster.local`.
    pub destination_service: String,
    /// Always `tcp` for this agent.
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

impl ConnectionLabels {
    /// Labels for `reporter`, every other value `unknown` (protocol `tcp`, flags `-`).
    pub fn new(reporter: Reporter) -> Self {
        let unknown = || UNKNOWN.to_string();
        Self {
            reporter,
            source_workload: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            destination_workload: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_service: unknown(),
            request_protocol: "tcp".to_string(),
            response_flags: ResponseFlags::None,
            connection_security_policy: SecurityPolicy::Unknown,
        }
    }

    /// The free-form fields, which may be empty.
    fn strings_mut(&mut self) -> [&mut String; 9] {
        [
            &mut self.source_workload,
            &mut self.source_workload_namespace,
            &mut self.source_principal,
            &mut self.source_app,
            &mut self.destination_workload,
            &mut self.destination_workload_namespace,
            &mut self.destination_principal,
            &mut self.destination_service,
            &mut self.request_protocol,
        ]
    }

    /// These labels with every empty value replaced by `unknown`, so that `""` and `unknown`
    /// are one series (two series printing identically would be rejected by scrapers).
    /// Borrows when nothing is empty, the usual case.
    fn normalized(&self) -> Cow<'_, Self> {
        let any_empty = [
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.source_app,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_service,
            &self.request_protocol,
        ]
        .iter()
        .any(|value| value.is_empty());
        if !any_empty {
            return Cow::Borrowed(self);
        }
        let mut owned = self.clone();
        for value in owned.strings_mut() {
            if value.is_empty() {
                value.push_str(UNKNOWN);
            }
        }
        Cow::Owned(owned)
    }
}

/// The default is the [`Reporter::Destination`] view with every value `unknown`.
impl Default for ConnectionLabels {
    fn default() -> Self {
        Self::new(Reporter::Destination)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: RenewalResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabel {
    result: ReloadResult,
}

/// All metrics of one agent. Cheap to clone; clones share the same counters.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent_bytes: Family<ConnectionLabels, Counter>,
    received_bytes: Family<ConnectionLabels, Counter>,
    workloads: Gauge,
    unserved: Gauge,
    attachments: Gauge,
    hbone_connections: Gauge,
    policy_reloads: Family<ReloadLabel, Counter>,
    inbound_rejections: Family<ReasonLabel, Counter>,
    certificate_renewals: Family<ResultLabel, Counter>,
    certificate_expiry: Family<IdentityLabel, Gauge>,
    watch_events: Family<KindLabel, Counter>,
    state_builds: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // prometheus-client appends `_total` to counters: these become `istio_tcp_*_total`.
        let opened = Family::default();
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            opened.clone(),
        );
        let closed = Family::default();
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            closed.clone(),
        );
        let sent_bytes = Family::default();
        registry.register(
            "istio_tcp_sent_bytes",
            "The total bytes sent by the destination to the source (response direction)",
            sent_bytes.clone(),
        );
        let received_bytes = Family::default();
        registry.register(
            "istio_tcp_received_bytes",
            "The total bytes received by the destination from the source (request direction)",
            received_bytes.clone(),
        );
        let workloads = Gauge::default();
        registry.register(
            "mesh_agent_workloads",
            "The number of workloads enrolled on this node",
            workloads.clone(),
        );
        let unserved = Gauge::default();
        registry.register(
            "mesh_agent_workloads_unserved",
            "The number of workloads of this node the agent does not serve now (their IPs stay guarded)",
            unserved.clone(),
        );
        let attachments = Gauge::default();
        registry.register(
            "mesh_agent_ebpf_attachments",
            "The number of eBPF program attachments pinned for this node",
            attachments.clone(),
        );
        let hbone_connections = Gauge::default();
        registry.register(
            "mesh_agent_hbone_connections",
            "The number of pooled outbound HBONE (mutual TLS) connections to other agents",
            hbone_connections.clone(),
        );
        let policy_reloads = Family::default();
        registry.register(
            "mesh_agent_policy_reloads",
            "The total number of policy changes read, by result",
            policy_reloads.clone(),
        );
        let inbound_rejections = Family::default();
        registry.register(
            "mesh_agent_inbound_rejections",
            "The total number of inbound connections refused, by reason",
            inbound_rejections.clone(),
        );
        let certificate_renewals = Family::default();
        registry.register(
            "mesh_agent_certificate_renewals",
            "The total number of workload certificate renewals, by result",
            certificate_renewals.clone(),
        );
        let certificate_expiry = Family::default();
        registry.register(
            "mesh_agent_certificate_expiry_seconds",
            "When the current certificate of each workload identity on this node expires (Unix time)",
            certificate_expiry.clone(),
        );
        let watch_events = Family::default();
        registry.register(
            "mesh_agent_kubernetes_watch_events",
            "The total number of Kubernetes watch events handled, by kind",
            watch_events.clone(),
        );
        let state_builds = Counter::default();
        registry.register(
            "mesh_agent_state_builds",
            "The total number of new states built from a source and published",
            state_builds.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                opened,
                closed,
                sent_bytes,
                received_bytes,
                workloads,
                unserved,
                attachments,
                hbone_connections,
                policy_reloads,
                inbound_rejections,
                certificate_renewals,
                certificate_expiry,
                watch_events,
                state_builds,
            }),
        }
    }

    /// Counts one connection opened.
    pub fn connection_opened(&self, labels: &ConnectionLabels) {
        self.inner.opened.get_or_create(&labels.normalized()).inc();
    }

    /// Adds bytes moved on an open connection. `sent` is the destination-to-source (response)
    /// direction, `received` the source-to-destination (request) direction, whichever the
    /// reporter: see docs/observability.md.
    pub fn add_bytes(&self, labels: &ConnectionLabels, sent: u64, received: u64) {
        let labels = labels.normalized();
        if sent > 0 {
            self.inner.sent_bytes.get_or_create(&labels).inc_by(sent);
        }
        if received > 0 {
            self.inner
                .received_bytes
                .get_or_create(&labels)
                .inc_by(received);
        }
    }

    /// Counts one connection closed and adds the bytes not yet given to [`Self::add_bytes`]
    /// (same directions as there). `labels.response_flags` says how it ended.
    pub fn connection_closed(&self, labels: &ConnectionLabels, sent: u64, received: u64) {
        let labels = labels.normalized();
        self.inner.closed.get_or_create(&labels).inc();
        // Make sure the byte series exist even for a connection that moved nothing.
        self.inner.sent_bytes.get_or_create(&labels).inc_by(sent);
        self.inner
            .received_bytes
            .get_or_create(&labels)
            .inc_by(received);
    }

    /// Sets the number of workloads enrolled on this node.
    pub fn set_workloads(&self, count: usize) {
        self.inner
            .workloads
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Sets the number of workloads of this node not served now.
    pub fn set_unserved(&self, count: usize) {
        self.inner
            .unserved
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Sets the number of eBPF attachments pinned for the node.
    pub fn set_attachments(&self, count: usize) {
        self.inner
            .attachments
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Sets the number of pooled outbound HBONE connections.
    pub fn set_hbone_connections(&self, count: usize) {
        self.inner
            .hbone_connections
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts one policy change read, with how it went.
    pub fn policy_reload(&self, result: ReloadResult) {
        self.inner
            .policy_reloads
            .get_or_create(&ReloadLabel { result })
            .inc();
    }

    /// Counts one inbound connection (or HBONE stream) refused. `reason` is the stable code the
    /// agent also logs as `rejection` (`not_tls`, `unknown_ca`, ...: docs/agent.md); being
    /// `'static`, the set of values stays bounded.
    pub fn inbound_rejected(&self, reason: &'static str) {
        self.inner
            .inbound_rejections
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one Kubernetes watch event of `kind` (`Pod`, `Service`...).
    pub fn watch_event(&self, kind: &'static str) {
        self.inner
            .watch_events
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// Counts one state built and published.
    pub fn state_built(&self) {
        self.inner.state_builds.inc();
    }

    /// The current certificate of `identity` expires at `not_after`.
    pub fn certificate_expiry(&self, identity: &str, not_after: std::time::SystemTime) {
        let seconds = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.inner
            .certificate_expiry
            .get_or_create(&IdentityLabel {
                identity: identity.to_owned(),
            })
            .set(seconds);
    }

    /// `identity` left the node: its certificate is gone.
    pub fn certificate_dropped(&self, identity: &str) {
        self.inner.certificate_expiry.remove(&IdentityLabel {
            identity: identity.to_owned(),
        });
    }

    /// Counts one certificate request (first issuance or renewal).
    pub fn certificate_renewal(&self, result: RenewalResult) {
        self.inner
            .certificate_renewals
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The OpenMetrics 1.0 text exposition (ends with `# EOF`), served as
    /// [`OPENMETRICS_CONTENT_TYPE`]. Counter families are named without `_total` in `# TYPE`
    /// and `# HELP`, their samples with it, as OpenMetrics requires.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String only fails if an encoder itself fails, which ours do not.
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
        {
            tracing::error!(%error, "encoding metrics failed");
        }
        text
    }

    /// The Prometheus text format 0.0.4, served as [`PROMETHEUS_CONTENT_TYPE`] to scrapers that
    /// do not ask for OpenMetrics (and what `promtool check metrics` validates): the same
    /// samples, with counters' `# TYPE` and `# HELP` naming the `_total` series, and no `# EOF`.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }
}

/// Content type of [`Metrics::encode`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`Metrics::encode_prometheus`].
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites the metadata lines of prometheus-client's OpenMetrics output for the Prometheus
/// text format; sample lines are the same in both.
fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // `# HELP` comes before `# TYPE`, which says whether the family is a counter.
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some((help_name, help)) = pending_help.take() {
                let _ = writeln!(out, "# HELP {help_name}{suffix} {help}");
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
            continue;
        }
        if let Some((name, help)) = pending_help.take() {
            let _ = writeln!(out, "# HELP {name} {help}");
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> ConnectionLabels {
        ConnectionLabels {
            source_workload: "sleep".into(),
            source_workload_namespace: "foo".into(),
            source_principal: "spiffe://cluster.local/ns/foo/sa/sleep".into(),
            source_app: "sleep".into(),
            destination_workload: "httpbin".into(),
            destination_workload_namespace: "bar".into(),
            destination_principal: "spiffe://cluster.local/ns/bar/sa/httpbin".into(),
            destination_service: "httpbin.bar.svc.cluster.local".into(),
            connection_security_policy: SecurityPolicy::MutualTls,
            ..ConnectionLabels::new(Reporter::Destination)
        }
    }

    /// The sample line of `name` whose labels contain `needle`, parsed value included.
    fn sample(text: &str, name: &str, needle: &str) -> Option<u64> {
        text.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(needle))
            .find_map(|line| line.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn exposition_has_istio_names_and_all_labels() {
        let metrics = Metrics::new();
        let l = labels();
        metrics.connection_opened(&l);
        metrics.connection_closed(&l, 10, 20);
        let text = metrics.encode();
        let expected_labels = concat!(
            r#"{reporter="destination",source_workload="sleep",source_workload_namespace="foo","#,
            r#"source_principal="spiffe://cluster.local/ns/foo/sa/sleep",source_app="sleep","#,
            r#"destination_workload="httpbin",destination_workload_namespace="bar","#,
            r#"destination_principal="spiffe://cluster.local/ns/bar/sa/httpbin","#,
            r#"destination_service="httpbin.bar.svc.cluster.local",request_protocol="tcp","#,
            r#"response_flags="-",connection_security_policy="mutual_tls"}"#,
        );
        for (name, value) in [
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_sent_bytes_total", 10),
            ("istio_tcp_received_bytes_total", 20),
        ] {
            let line = format!("{name}{expected_labels} {value}\n");
            assert!(text.contains(&line), "missing {line:?} in:\n{text}");
        }
        assert!(text.contains("# TYPE istio_tcp_connections_opened counter\n"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn unknown_and_empty_values_print_unknown_once() {
        let metrics = Metrics::new();
        let default = ConnectionLabels::new(Reporter::Source);
        let empty = ConnectionLabels {
            source_workload: String::new(),
            destination_service: String::new(),
            ..ConnectionLabels::new(Reporter::Source)
        };
        metrics.connection_opened(&default);
        metrics.connection_opened(&empty);
        let text = metrics.encode();
        let lines: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains(r#"reporter="source",source_workload="unknown","#));
        assert!(lines[0].contains(r#"destination_service="unknown",request_protocol="tcp","#));
        assert!(lines[0].contains(r#"connection_security_policy="unknown"} 2"#));
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        let l = ConnectionLabels {
            source_workload: "a\"b\\c\nd".into(),
            ..Default::default()
        };
        metrics.connection_opened(&l);
        let text = metrics.encode();
        assert!(text.contains(r#"source_workload="a\"b\\c\nd""#), "{text}");
        // Every sample stays on one line, ending with its value.
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.ends_with(" 1") || l.ends_with(" 0")),
            "{text}"
        );
    }

    #[test]
    fn counters_add_up_per_series() {
        let metrics = Metrics::new();
        let ok = labels();
        let failed = ConnectionLabels {
            response_flags: ResponseFlags::UpstreamConnectFailure,
            ..labels()
        };
        let source = ConnectionLabels {
            reporter: Reporter::Source,
            ..labels()
        };
        for _ in 0..3 {
            metrics.connection_opened(&ok);
            metrics.add_bytes(&ok, 100, 1);
            metrics.connection_closed(&ok, 5, 7);
        }
        metrics.connection_opened(&source);
        metrics.connection_closed(&failed, 0, 0);
        let text = metrics.encode();
        let ok_flag = r#"reporter="destination","#;
        let fine = r#"response_flags="-""#;
        assert_eq!(
            sample(&text, "istio_tcp_connections_opened_total", ok_flag),
            Some(3)
        );
        assert_eq!(
            sample(
                &text,
                "istio_tcp_connections_opened_total",
                r#"reporter="source""#
            ),
            Some(1)
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", fine),
            Some(3)
        );
        assert_eq!(
            sample(
                &text,
                "istio_tcp_connections_closed_total",
                r#"response_flags="UF""#
            ),
            Some(1)
        );
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", fine), Some(315));
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total", fine),
            Some(24)
        );
        assert_eq!(
            sample(
                &text,
                "istio_tcp_sent_bytes_total",
                r#"response_flags="UF""#
            ),
            Some(0)
        );
    }

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let metrics = Metrics::new();
        metrics.connection_opened(&labels());
        metrics.add_bytes(&labels(), 0, 5);
        metrics.set_workloads(1);
        let text = metrics.encode_prometheus();
        for line in [
            "# HELP istio_tcp_connections_opened_total The total number of TCP connections opened.\n",
            "# TYPE istio_tcp_connections_opened_total counter\nistio_tcp_connections_opened_total{",
            "# TYPE istio_tcp_received_bytes_total counter\n",
            "# HELP mesh_agent_workloads The number",
            "# TYPE mesh_agent_workloads gauge\nmesh_agent_workloads 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
        // Same samples as the OpenMetrics text.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(samples(&text), samples(&metrics.encode()));
    }

    #[test]
    fn agent_metrics() {
        let metrics = Metrics::new();
        metrics.set_workloads(4);
        metrics.inbound_rejected("not_tls");
        metrics.inbound_rejected("not_tls");
        metrics.inbound_rejected("unknown_ca");
        metrics.certificate_renewal(RenewalResult::Success);
        let clone = metrics.clone();
        clone.certificate_renewal(RenewalResult::Failure);
        let text = metrics.encode();
        for line in [
            "# TYPE mesh_agent_workloads gauge\nmesh_agent_workloads 4\n",
            "mesh_agent_inbound_rejections_total{reason=\"not_tls\"} 2\n",
            "mesh_agent_inbound_rejections_total{reason=\"unknown_ca\"} 1\n",
            "mesh_agent_certificate_renewals_total{result=\"success\"} 1\n",
            "mesh_agent_certificate_renewals_total{result=\"failure\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
