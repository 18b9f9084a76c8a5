//! The seed scenario ("Mutual TLS Authentication" with Istio's tutorial application), shared by
//! the `mesh-demo` binary and the `seed` and `kube_seed` integration tests.
//!
//! Namespace `tutorial`: `customer`, `preference`, `recommendation-v1` and `recommendation-v2`;
//! and a `curl` pod that is not in the mesh. Services `preference` and `recommendation`.
//! `preference` answers `preference => <recommendation's answer>`, calling the recommendation
//! Service, which the agent spreads over v1 and v2. The load alternates
//! `curl http://preference:8080` from the curl pod and from the customer pod, as the story's
//! shell loop does, while the [`Step`]s change the policy. What the agents logged on the
//! serving side of every hop becomes a Kiali-like table of [`Edge`]s.
//!
//! The story is played on a [`Stage`]: the harness's file-based cluster ([`Seed`]) or
//! Kubernetes ([`KubeSeed`]), both with the servers and policies of the manifests in
//! `deploy/examples/tutorial/` ([`tutorial`]).

mod files;
mod kubernetes;
pub mod tutorial;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

pub use files::{Seed, build_cluster, pod};
pub use kubernetes::{APP_SELECTOR, KubeSeed, OUTSIDE_NAMESPACE};
use tutorial::Manifest;

use crate::{Cluster, RunOutput};

pub const NAMESPACE: &str = "tutorial";
pub const PORT: u16 = 8080;
/// preference by name from its own namespace, as the story's load script calls it.
pub const PREFERENCE_URL: &str = "http://preference:8080";
/// The PeerAuthentication of steps 2 and 3 (the story's `preference-mutualtls`).
pub const PEER_AUTHENTICATION: &str = "preference-mutualtls";
/// The AuthorizationPolicy of step 3.
pub const AUTHORIZATION_POLICY: &str = "preference-allow-customer";
/// Calls per client in each step.
pub const ROUNDS: usize = 3;
/// Between two calls, as the story's load script sleeps.
pub const PAUSE: Duration = Duration::from_millis(500);
/// curl's exit code for "Recv failure: Connection reset by peer".
pub const EXIT_RESET: i32 = 56;
/// curl's `--max-time` for one call.
pub const CURL_MAX_TIME: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- the stage

/// Where the story is played: how its pods are reached and its policies changed. The rest
/// (steps, load, the agents' view, checks) is the same everywhere.
pub trait Stage {
    /// The nodes: their agents' logs are the story's record.
    fn cluster(&self) -> &Cluster;

    /// preference's URL as `client` calls it: by name, from the client's namespace.
    fn url(&self, client: Client) -> &'static str;

    /// `curl -sS --max-time CURL_MAX_TIME URL` in the client's pod.
    fn curl(&self, client: Client, url: &str) -> Result<RunOutput>;

    /// Makes one policy change and waits until every agent has loaded it.
    fn change(&self, change: &PolicyChange) -> Result<()>;

    /// The workload a pod belongs to, as Kiali names it: on Kubernetes its Deployment, whose
    /// pods have generated names.
    fn workload_of(&self, pod: &str) -> String {
        pod.to_owned()
    }
}

// ---------------------------------------------------------------- the steps

/// The story, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No policy: Istio's default, PERMISSIVE.
    Permissive,
    /// PeerAuthentication STRICT for preference.
    Strict,
    /// Back to PERMISSIVE, and an AuthorizationPolicy that lets only customer in.
    AllowOnlyCustomer,
    /// Both policies deleted.
    CleanUp,
}

/// A change to the policies, made as the story's user makes it.
#[derive(Debug, Clone)]
pub enum PolicyChange {
    /// `kubectl apply -f` of the manifest (file mode: written to the agents' policy directory
    /// as `<name>.yaml`).
    Apply(&'static Manifest),
    /// `kubectl delete KIND NAME` (file mode: `<name>.yaml` removed).
    Delete {
        kind: &'static str,
        name: &'static str,
    },
}

impl PolicyChange {
    /// The deletion of the object `manifest` makes.
    fn delete(manifest: &Manifest) -> PolicyChange {
        PolicyChange::Delete {
            kind: manifest.kind,
            name: manifest.name,
        }
    }

    /// The `kubectl` command line that makes the change, with the manifests in `dir`.
    pub fn kubectl_args(&self, dir: &Path) -> Vec<OsString> {
        match self {
            PolicyChange::Apply(manifest) => {
                vec!["apply".into(), "-f".into(), dir.join(manifest.file).into()]
            }
            PolicyChange::Delete { kind, name } => {
                let kind = kind.to_lowercase();
                ["delete", "-n", NAMESPACE, &kind, name]
                    .map(OsString::from)
                    .into()
            }
        }
    }
}

impl Step {
    pub const ALL: [Step; 4] = [
        Step::Permissive,
        Step::Strict,
        Step::AllowOnlyCustomer,
        Step::CleanUp,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Step::Permissive => "Istio's default: no policy, preference is PERMISSIVE",
            Step::Strict => "PeerAuthentication STRICT for preference",
            Step::AllowOnlyCustomer => {
                "Back to PERMISSIVE, plus an AuthorizationPolicy: only customer may call preference"
            }
            Step::CleanUp => "Clean up: both policies deleted",
        }
    }

    /// What the user should see, in a sentence.
    pub fn expectation(self) -> &'static str {
        match self {
            Step::Permissive | Step::CleanUp => {
                "both clients get an answer; the curl pod's traffic is plaintext, customer's is mTLS"
            }
            Step::Strict => {
                "the curl pod is reset (exit code 56): preference accepts mTLS only; customer keeps working"
            }
            Step::AllowOnlyCustomer => {
                "plaintext is accepted again, but the curl pod has no identity the policy allows: reset (56); customer keeps working"
            }
        }
    }

    /// The policy changes that lead into this step.
    pub fn changes(self) -> Vec<PolicyChange> {
        use tutorial::{ALLOW_ONLY_CUSTOMER, PERMISSIVE, STRICT};
        match self {
            Step::Permissive => Vec::new(),
            Step::Strict => vec![PolicyChange::Apply(&STRICT)],
            Step::AllowOnlyCustomer => vec![
                PolicyChange::Apply(&PERMISSIVE),
                PolicyChange::Apply(&ALLOW_ONLY_CUSTOMER),
            ],
            Step::CleanUp => vec![
                PolicyChange::delete(&PERMISSIVE),
                PolicyChange::delete(&ALLOW_ONLY_CUSTOMER),
            ],
        }
    }

    /// The exit code `client`'s curl should end with in this step.
    pub fn expected_exit(self, client: Client) -> i32 {
        match (self, client) {
            (Step::Strict | Step::AllowOnlyCustomer, Client::CurlPod) => EXIT_RESET,
            _ => 0,
        }
    }
}

/// Makes the step's policy changes, each once every agent has loaded the one before.
pub fn apply(stage: &dyn Stage, changes: &[PolicyChange]) -> Result<()> {
    changes.iter().try_for_each(|change| stage.change(change))
}

// ---------------------------------------------------------------- the load

/// Who calls preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Client {
    /// Not in the mesh: plaintext.
    CurlPod,
    /// In the mesh: mTLS.
    Customer,
}

impl Client {
    pub const ALL: [Client; 2] = [Client::CurlPod, Client::Customer];

    /// The client's pod: its name on the file-based cluster, its `app` label on Kubernetes.
    pub fn app(self) -> &'static str {
        match self {
            Client::CurlPod => "curl",
            Client::Customer => "customer",
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} pod", self.app())
    }
}

/// One `curl -s http://preference:8080` and what it gave.
#[derive(Debug, Clone)]
pub struct Call {
    pub client: Client,
    /// None if curl was killed by a signal.
    pub exit_code: Option<i32>,
    /// The answer, trimmed.
    pub body: String,
    /// curl's error message, trimmed (e.g. `curl: (56) Recv failure: Connection reset by peer`).
    pub error: String,
}

impl Call {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Alternates the curl pod and the customer pod, `rounds` times each, `pause` between calls;
/// `on_call` sees every call as it completes (and may stop the load with an error).
pub fn load(
    stage: &dyn Stage,
    rounds: usize,
    pause: Duration,
    mut on_call: impl FnMut(&Call) -> Result<()>,
) -> Result<Vec<Call>> {
    let mut calls = Vec::new();
    for _ in 0..rounds {
        for client in Client::ALL {
            let call = curl_preference(stage, client)?;
            on_call(&call)?;
            calls.push(call);
            thread::sleep(pause);
        }
    }
    Ok(calls)
}

/// `curl -sS --max-time 10 <preference>` in the client's pod.
pub fn curl_preference(stage: &dyn Stage, client: Client) -> Result<Call> {
    let out = stage
        .curl(client, stage.url(client))
        .with_context(|| format!("curl in the {client}"))?;
    Ok(Call {
        client,
        exit_code: out.code(),
        body: out.stdout_str().trim().to_owned(),
        error: out.stderr_str().trim().to_owned(),
    })
}

// ---------------------------------------------------------------- the agents' view

/// Where the agents' logs stood at one moment: per node, the number of JSON lines.
#[derive(Debug, Clone)]
pub struct LogMark(BTreeMap<String, usize>);

/// Marks the current end of every agent's log; [`events_since`] reads from there.
pub fn mark_logs(cluster: &Cluster) -> Result<LogMark> {
    let mut mark = BTreeMap::new();
    for node in cluster.nodes() {
        mark.insert(
            node.name().to_owned(),
            cluster.agent_logs(node.name())?.len(),
        );
    }
    Ok(LogMark(mark))
}

/// What the serving agent did with one inbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Delivered to the workload and closed (inbound `connection closed` without `rejection`
    /// or `error`).
    Delivered,
    /// Refused by an AuthorizationPolicy (inbound `connection closed` with `rejection`
    /// `policy_denied`; the policy in `denied_by`).
    Denied,
    /// Refused before policy: plaintext under STRICT (inbound `connection closed` with
    /// `rejection` `plaintext_strict`, or any other `rejection` but `policy_denied`), a
    /// TLS-level refusal of the HBONE port (`inbound connection rejected`), or one bad HBONE
    /// stream (`inbound stream rejected`).
    Rejected,
    /// Delivered, then broken (inbound `connection closed` with `error`, no `rejection`).
    Failed,
}

/// How a connection was secured, as Kiali's security badge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Security {
    MutualTls,
    /// Between two workloads of one node, no TLS, the caller proven by the kernel: Kiali
    /// draws no lock (it is not `mutual_tls`); the demo gives it its own badge.
    SameNode,
    Plaintext,
    Unknown,
}

impl Security {
    fn from_log(value: &Value) -> Security {
        match value.as_str() {
            Some("mutual_tls") => Security::MutualTls,
            Some("same_node") => Security::SameNode,
            Some("none") => Security::Plaintext,
            _ => Security::Unknown,
        }
    }

    /// Whether the mesh authenticated the caller (what STRICT asks for).
    pub fn is_mesh(self) -> bool {
        matches!(self, Security::MutualTls | Security::SameNode)
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Security::MutualTls => "🔒 mTLS",
            Security::SameNode => "🔗 same node (kernel-verified, no TLS)",
            Security::Plaintext => "plaintext",
            Security::Unknown => "?",
        })
    }
}

/// One inbound log line of a serving agent.
#[derive(Debug, Clone)]
pub struct Event {
    /// The node whose agent logged it (the destination's node).
    pub node: String,
    pub outcome: Outcome,
    /// Destination workload, `namespace/name`, as the agent names it: the pod.
    pub workload: String,
    /// The destination as Kiali names it, without its namespace ([`Stage::workload_of`]).
    pub destination: String,
    /// The caller's SPIFFE ID, or `unknown`.
    pub peer_identity: String,
    pub src_addr: String,
    pub security: Security,
    /// Why it was refused: the denying policy, the rejection code, or the error.
    pub reason: Option<String>,
    /// The whole line.
    pub line: Value,
}

impl Event {
    fn parse(stage: &dyn Stage, node: &str, line: &Value) -> Option<Event> {
        let text = |key: &str| line[key].as_str().map(str::to_owned);
        // The unified `connection closed` line names the destination `dst_workload` and the
        // caller `src_identity` (absent for a plaintext caller); the TLS-level
        // `inbound connection rejected` and `inbound stream rejected` lines keep `workload`
        // and `peer_identity`.
        let (outcome, reason, workload_key, identity_key) = match line["message"].as_str()? {
            "connection closed" if line["direction"] == "inbound" => {
                let (outcome, reason) = match line["rejection"].as_str() {
                    Some("policy_denied") => (Outcome::Denied, text("denied_by")),
                    Some(code) => (Outcome::Rejected, Some(code.to_owned())),
                    None if line.get("error").is_some() => (Outcome::Failed, text("error")),
                    None => (Outcome::Delivered, None),
                };
                (outcome, reason, "dst_workload", "src_identity")
            }
            "inbound connection rejected" | "inbound stream rejected" => (
                Outcome::Rejected,
                text("rejection"),
                "workload",
                "peer_identity",
            ),
            _ => return None,
        };
        let workload = text(workload_key)?;
        let pod = workload.rsplit('/').next().unwrap_or(&workload);
        Some(Event {
            node: node.to_owned(),
            outcome,
            destination: stage.workload_of(pod),
            workload,
            peer_identity: text(identity_key).unwrap_or_else(|| "unknown".into()),
            src_addr: text("src_addr").unwrap_or_default(),
            security: Security::from_log(&line["security"]),
            reason,
            line: line.clone(),
        })
    }

    /// The calling workload as Kiali names it: from the verified identity
    /// (`spiffe://…/ns/tutorial/sa/customer` is `customer`), `unknown` without one.
    pub fn source(&self) -> String {
        match self.peer_identity.rsplit_once("/sa/") {
            Some((_, sa)) => sa.to_owned(),
            None => "unknown".to_owned(),
        }
    }
}

/// Every inbound event the agents logged since `mark`.
pub fn events_since(stage: &dyn Stage, mark: &LogMark) -> Result<Vec<Event>> {
    let mut events = Vec::new();
    for (node, &from) in &mark.0 {
        let lines = stage.cluster().agent_logs(node)?;
        events.extend(
            lines
                .iter()
                .skip(from)
                .filter_map(|l| Event::parse(stage, node, l)),
        );
    }
    Ok(events)
}

/// Waits until the agents logged at least `expected` inbound events since `mark` (up to
/// `timeout`), then a little longer for stragglers; returns them.
pub fn wait_for_events(
    stage: &dyn Stage,
    mark: &LogMark,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Event>> {
    let deadline = Instant::now() + timeout;
    while events_since(stage, mark)?.len() < expected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300));
    events_since(stage, mark)
}

/// How many inbound events the calls cause: an answered call passed preference and one
/// recommendation; a refused one only reached preference's agent.
pub fn expected_events(calls: &[Call]) -> usize {
    calls
        .iter()
        .map(|c| if c.succeeded() { 2 } else { 1 })
        .sum()
}

/// One arrow of the graph: connections from `source` to `destination` secured as `security`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub security: Security,
    /// Delivered to the destination.
    pub connections: usize,
    /// Denied, rejected or broken.
    pub refused: usize,
    /// Why they were refused (policies, rejection codes, errors).
    pub reasons: BTreeSet<String>,
}

impl fmt::Display for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} ({}): {} delivered, {} refused",
            self.source, self.destination, self.security, self.connections, self.refused
        )
    }
}

/// The edges on one line each, for messages.
fn list(edges: &[Edge]) -> String {
    if edges.is_empty() {
        return "no inbound connection at all".to_owned();
    }
    let lines: Vec<String> = edges.iter().map(|e| format!("  {e}")).collect();
    lines.join("\n")
}

/// Groups the events by (destination, source, security), in that order.
pub fn edges(events: &[Event]) -> Vec<Edge> {
    let mut by_key: BTreeMap<(String, String, Security), Edge> = BTreeMap::new();
    for e in events {
        let key = (e.destination.clone(), e.source(), e.security);
        let edge = by_key.entry(key).or_insert_with(|| Edge {
            source: e.source(),
            destination: e.destination.clone(),
            security: e.security,
            connections: 0,
            refused: 0,
            reasons: BTreeSet::new(),
        });
        match e.outcome {
            Outcome::Delivered => edge.connections += 1,
            _ => edge.refused += 1,
        }
        edge.reasons.extend(e.reason.clone());
    }
    by_key.into_values().collect()
}

/// Everything one step produced.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: Step,
    pub calls: Vec<Call>,
    pub events: Vec<Event>,
    pub edges: Vec<Edge>,
}

/// Runs the load for a step (its policies already applied) and gathers the agents' view.
pub fn run_step(
    stage: &dyn Stage,
    step: Step,
    rounds: usize,
    pause: Duration,
    on_call: impl FnMut(&Call) -> Result<()>,
) -> Result<StepReport> {
    let mark = mark_logs(stage.cluster())?;
    let calls = load(stage, rounds, pause, on_call)?;
    let events = wait_for_events(
        stage,
        &mark,
        expected_events(&calls),
        Duration::from_secs(10),
    )?;
    let edges = edges(&events);
    Ok(StepReport {
        step,
        calls,
        events,
        edges,
    })
}

// ---------------------------------------------------------------- checks

/// Every call of `client` ended with `code`.
pub fn expect_exit(calls: &[Call], client: Client, code: i32) -> Result<()> {
    let mine: Vec<&Call> = calls.iter().filter(|c| c.client == client).collect();
    ensure!(!mine.is_empty(), "no call from the {client}");
    for c in mine {
        ensure!(
            c.exit_code == Some(code),
            "the {client} wanted exit {code}, got {:?}: {}{}",
            c.exit_code,
            c.body,
            c.error
        );
    }
    Ok(())
}

/// Every answered call says `preference => recommendation vN from recommendation-vN`.
pub fn expect_bodies(calls: &[Call]) -> Result<()> {
    let good = [
        "preference => recommendation v1 from recommendation-v1",
        "preference => recommendation v2 from recommendation-v2",
    ];
    for c in calls.iter().filter(|c| c.succeeded()) {
        ensure!(
            good.contains(&c.body.as_str()),
            "the {} got an unexpected answer: {:?}",
            c.client,
            c.body
        );
    }
    Ok(())
}

/// The edge `source -> destination` carried delivered connections, all secured as `security`.
pub fn expect_edge(
    edges: &[Edge],
    source: &str,
    destination: &str,
    security: Security,
) -> Result<()> {
    let found = delivered_edges(edges, source, destination)?;
    for e in found {
        ensure!(
            e.security == security,
            "{source} -> {destination} was {}, want {security}",
            e.security
        );
    }
    Ok(())
}

/// The edges `source` → `destination` that delivered connections; an error if none did.
fn delivered_edges<'e>(
    edges: &'e [Edge],
    source: &str,
    destination: &str,
) -> Result<Vec<&'e Edge>> {
    let found: Vec<&Edge> = edges
        .iter()
        .filter(|e| e.source == source && e.destination == destination && e.connections > 0)
        .collect();
    ensure!(
        !found.is_empty(),
        "no delivered connection {source} -> {destination}; the agents saw:\n{}",
        list(edges)
    );
    Ok(found)
}

/// Connections `source` → `destination` were delivered, every one authenticated by the mesh:
/// mutual TLS across nodes, or the kernel-verified same-node path.
pub fn expect_mesh_edge(edges: &[Edge], source: &str, destination: &str) -> Result<()> {
    let found = delivered_edges(edges, source, destination)?;
    for e in found {
        ensure!(
            e.security.is_mesh(),
            "{source} -> {destination} was {}, want {} or {}",
            e.security,
            Security::MutualTls,
            Security::SameNode
        );
    }
    Ok(())
}

/// Nothing from `source` reached `destination`, and something was refused.
pub fn expect_refused(edges: &[Edge], source: &str, destination: &str) -> Result<()> {
    let mine = || {
        edges
            .iter()
            .filter(|e| e.source == source && e.destination == destination)
    };
    let delivered: usize = mine().map(|e| e.connections).sum();
    let refused: usize = mine().map(|e| e.refused).sum();
    ensure!(
        delivered == 0,
        "{delivered} connections {source} -> {destination} got through"
    );
    ensure!(
        refused > 0,
        "the agents logged no refusal of {source} -> {destination}"
    );
    Ok(())
}

/// A refusal of `destination` names `reason` (a policy `tutorial/<name>` or a rejection code);
/// returns that event.
pub fn expect_refusal_reason<'e>(
    events: &'e [Event],
    destination: &str,
    reason: &str,
) -> Result<&'e Event> {
    events
        .iter()
        .find(|e| {
            e.destination == destination
                && e.outcome != Outcome::Delivered
                && e.reason.as_deref().is_some_and(|r| r.contains(reason))
        })
        .with_context(|| format!("no refusal of {destination} names {reason:?}"))
}

/// Every hop preference made to recommendation v1 and v2 was authenticated by the mesh.
pub fn expect_backend_hops(edges: &[Edge]) -> Result<()> {
    for v in ["recommendation-v1", "recommendation-v2"] {
        expect_mesh_edge(edges, "preference", v)?;
    }
    Ok(())
}

/// The story's expectations for one step; the error lists every one that failed.
pub fn check(report: &StepReport) -> Result<()> {
    let mut problems = Vec::new();
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            problems.push(format!("{e:#}"));
        }
    };
    for client in Client::ALL {
        note(expect_exit(
            &report.calls,
            client,
            report.step.expected_exit(client),
        ));
    }
    note(expect_bodies(&report.calls));
    note(expect_mesh_edge(&report.edges, "customer", "preference"));
    note(expect_backend_hops(&report.edges));
    match report.step {
        Step::Permissive | Step::CleanUp => {
            note(expect_edge(
                &report.edges,
                "unknown",
                "preference",
                Security::Plaintext,
            ));
        }
        Step::Strict => {
            note(expect_refused(&report.edges, "unknown", "preference"));
            note(expect_refusal_reason(&report.events, "preference", "plaintext_strict").map(drop));
        }
        Step::AllowOnlyCustomer => {
            note(expect_refused(&report.edges, "unknown", "preference"));
            let policy = format!("{NAMESPACE}/{AUTHORIZATION_POLICY}");
            note(expect_refusal_reason(&report.events, "preference", &policy).map(drop));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}
