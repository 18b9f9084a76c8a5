//! The seed scenario ("Mutual TLS Authentication" with Istio's tutorial application), shared by
//! the `mesh-demo` binary and the `seed` integration test.
//!
//! Namespace `tutorial`: `customer` and `recommendation-v1` on node-a, `preference` and
//! `recommendation-v2` on node-b, and a `curl` pod on node-a that is not in the mesh.
//! Services `preference` and `recommendation` (virtual IPs; pods resolve the names to them).
//! `preference` answers `preference => <recommendation's answer>`, calling the recommendation
//! Service, which the agent spreads over v1 and v2 (the curl pod, outside the mesh, reaches
//! preference through the nodes' kube-proxy rules). The load alternates
//! `curl http://preference:8080` from the curl pod and from
//! the customer pod, as the story's shell loop does, while the [`Step`]s change the policy.
//! What the agents logged on the serving side of every hop becomes a Kiali-like table of
//! [`Edge`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::pod::{ChildGuard, run_with_timeout};
use crate::{Cluster, NodeSpec, Pod, PodSpec, ServiceSpec};

pub const NAMESPACE: &str = "tutorial";
pub const PORT: u16 = 8080;
/// What both clients call, by name, as the story's load script does.
pub const PREFERENCE_URL: &str = "http://preference:8080";
/// The PeerAuthentication of steps 2 and 3 (the story's `preference-mutualtls`).
pub const PEER_AUTHENTICATION: &str = "preference-mutualtls";
/// The AuthorizationPolicy of step 3.
pub const AUTHORIZATION_POLICY: &str = "preference-allow-customer";
/// The only principal step 3 lets into preference.
pub const CUSTOMER_PRINCIPAL: &str = "cluster.local/ns/tutorial/sa/customer";
/// Calls per client in each step.
pub const ROUNDS: usize = 3;
/// Between two calls, as the story's load script sleeps.
pub const PAUSE: Duration = Duration::from_millis(500);
/// curl's exit code for "Recv failure: Connection reset by peer".
pub const EXIT_RESET: i32 = 56;

// ---------------------------------------------------------------- the cluster

/// The running scenario: the cluster (agents started) and the application's servers.
pub struct Seed {
    /// Declared first: dropped (killed) before the cluster goes.
    _servers: Vec<ChildGuard>,
    pub cluster: Arc<Cluster>,
}

/// Builds the seed's two nodes and five pods; agents are not started yet.
pub fn build_cluster() -> Result<Cluster> {
    let pod = |name: &str, sa: &str, app: &str| {
        PodSpec::new(name)
            .namespace(NAMESPACE)
            .service_account(sa)
            .label("app", app)
    };
    let service = |name: &str| {
        ServiceSpec::new(name, name)
            .namespace(NAMESPACE)
            .port(PORT, PORT)
    };
    Cluster::builder()
        .service(service("preference"))
        .service(service("recommendation"))
        .node(
            NodeSpec::new("node-a")
                .pod(pod("customer", "customer", "customer"))
                .pod(
                    pod("recommendation-v1", "recommendation", "recommendation")
                        .label("version", "v1"),
                )
                .pod(pod("curl", "default", "curl").enrolled(false)),
        )
        .node(
            NodeSpec::new("node-b")
                .pod(pod("preference", "preference", "preference"))
                .pod(
                    pod("recommendation-v2", "recommendation", "recommendation")
                        .label("version", "v2"),
                ),
        )
        .build()
}

impl Seed {
    /// Builds the cluster and starts it: [`build_cluster`] then [`Seed::start`].
    pub fn new() -> Result<Seed> {
        Seed::start(Arc::new(build_cluster()?))
    }

    /// Starts the agents, then recommendation v1 and v2 and preference.
    pub fn start(cluster: Arc<Cluster>) -> Result<Seed> {
        cluster.start_agents()?;
        let servers = vec![
            start_recommendation(pod(&cluster, "recommendation-v1")?, "v1")?,
            start_recommendation(pod(&cluster, "recommendation-v2")?, "v2")?,
            start_preference(pod(&cluster, "preference")?)?,
        ];
        Ok(Seed {
            _servers: servers,
            cluster,
        })
    }
}

/// A pod of the seed by name, wherever it runs.
pub fn pod<'c>(cluster: &'c Cluster, name: &str) -> Result<&'c Pod> {
    cluster
        .nodes()
        .iter()
        .flat_map(|n| n.pods())
        .find(|p| p.name() == name)
        .with_context(|| format!("no pod {name} in the seed cluster"))
}

// ---------------------------------------------------------------- the application

/// A dual-stack threaded HTTP server on `::`; `reply()` sends a text answer. Server logs go to
/// stderr (the server's log file).
const SERVER_PRELUDE: &str = r#"
import http.server, socket, socketserver, sys

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)  # no reverse lookup of "::"
        self.server_name, self.server_port = "localhost", self.server_address[1]

def reply(handler, status, text):
    body = text.encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
"#;

/// `recommendation VERSION POD PORT`: answers `recommendation v1 from recommendation-v1`.
const RECOMMENDATION: &str = r#"
version, pod, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        reply(self, 200, f"recommendation {version} from {pod}\n")

Server(("::", port), Handler).serve_forever()
"#;

/// `preference PORT URL...`: calls the URLs in turn (here one: the recommendation Service) and
/// answers `preference => <answer>`.
const PREFERENCE: &str = r#"
import itertools, threading, urllib.request
port, upstreams = int(sys.argv[1]), itertools.cycle(sys.argv[2:])
lock = threading.Lock()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            url = next(upstreams)
        try:
            with opener.open(url, timeout=5) as answer:
                reply(self, 200, f"preference => {answer.read().decode().strip()}\n")
        except Exception as e:
            reply(self, 503, f"preference => error calling {url}: {e}\n")

Server(("::", port), Handler).serve_forever()
"#;

fn start_recommendation(pod: &Pod, version: &str) -> Result<ChildGuard> {
    let script = format!("{SERVER_PRELUDE}{RECOMMENDATION}");
    start_python(pod, &script, &[version, pod.name(), &PORT.to_string()])
}

/// preference calls the `recommendation` Service; the agent spreads the calls over v1 and v2.
fn start_preference(pod: &Pod) -> Result<ChildGuard> {
    let script = format!("{SERVER_PRELUDE}{PREFERENCE}");
    let recommendation = format!("http://recommendation:{PORT}/");
    start_python(pod, &script, &[&PORT.to_string(), &recommendation])
}

/// Runs `python3 -c script args...` in the pod (output to a log file in the cluster's scratch
/// directory) and waits until it listens on [`PORT`].
fn start_python(pod: &Pod, script: &str, args: &[&str]) -> Result<ChildGuard> {
    let log_path = pod.workdir.join(format!("{}.log", pod.name()));
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut cmd = pod.command("/usr/bin/python3", ["-c", script].iter().chain(args))?;
    cmd.env("PYTHONUNBUFFERED", "1")
        .stdout(log.try_clone()?)
        .stderr(log);
    let name = format!("{} server", pod.name());
    let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
    let mut guard = ChildGuard { child, name };
    pod.wait_for_port(&mut guard, PORT)
        .with_context(|| crate::pod::tail_of(&log_path))?;
    Ok(guard)
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

/// A change to the agents' policy directory.
#[derive(Debug, Clone)]
pub enum PolicyChange {
    Apply { name: String, yaml: String },
    Delete { name: String },
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
        let apply = |name: &str, yaml: String| PolicyChange::Apply {
            name: name.into(),
            yaml,
        };
        let delete = |name: &str| PolicyChange::Delete { name: name.into() };
        match self {
            Step::Permissive => Vec::new(),
            Step::Strict => vec![apply(PEER_AUTHENTICATION, peer_authentication("STRICT"))],
            Step::AllowOnlyCustomer => vec![
                apply(PEER_AUTHENTICATION, peer_authentication("PERMISSIVE")),
                apply(AUTHORIZATION_POLICY, allow_only_customer()),
            ],
            Step::CleanUp => vec![delete(PEER_AUTHENTICATION), delete(AUTHORIZATION_POLICY)],
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

/// Applies the step's policy changes and waits until every agent reloaded.
pub fn apply(cluster: &Cluster, changes: &[PolicyChange]) -> Result<()> {
    for change in changes {
        match change {
            PolicyChange::Apply { name, yaml } => cluster.apply_policy(name, yaml)?,
            PolicyChange::Delete { name } => cluster.delete_policy(name)?,
        }
    }
    Ok(())
}

/// The story's `preference-mutualtls`, as `security.istio.io/v1` writes it today.
pub fn peer_authentication(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: {PEER_AUTHENTICATION}
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels:
      app: preference
  mtls:
    mode: {mode}
"
    )
}

/// ALLOW for preference, with customer's identity as the only principal.
pub fn allow_only_customer() -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {AUTHORIZATION_POLICY}
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels:
      app: preference
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"{CUSTOMER_PRINCIPAL}\"]
"
    )
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

    pub fn pod_name(self) -> &'static str {
        match self {
            Client::CurlPod => "curl",
            Client::Customer => "customer",
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} pod", self.pod_name())
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
    cluster: &Cluster,
    rounds: usize,
    pause: Duration,
    mut on_call: impl FnMut(&Call) -> Result<()>,
) -> Result<Vec<Call>> {
    let mut calls = Vec::new();
    for _ in 0..rounds {
        for client in Client::ALL {
            let call = curl_preference(cluster, client)?;
            on_call(&call)?;
            calls.push(call);
            thread::sleep(pause);
        }
    }
    Ok(calls)
}

/// `curl -sS --max-time 10 http://preference:8080` in the client's pod.
pub fn curl_preference(cluster: &Cluster, client: Client) -> Result<Call> {
    let pod = pod(cluster, client.pod_name())?;
    let mut cmd = pod.command("curl", ["-sS", "--max-time", "10", PREFERENCE_URL])?;
    for proxy in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(proxy);
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(15))
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
    /// Delivered to the workload and closed (`inbound connection closed` without `error`).
    Delivered,
    /// Refused by an AuthorizationPolicy (`inbound connection denied`).
    Denied,
    /// Refused before policy, e.g. plaintext under STRICT (`inbound connection rejected`, or
    /// `inbound stream rejected` for one HBONE stream).
    Rejected,
    /// Delivered, then broken (`inbound connection closed` with `error`).
    Failed,
}

/// How a connection was secured, as Kiali's security badge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Security {
    MutualTls,
    Plaintext,
    Unknown,
}

impl Security {
    fn from_log(value: &Value) -> Security {
        match value.as_str() {
            Some("mutual_tls") => Security::MutualTls,
            Some("none") => Security::Plaintext,
            _ => Security::Unknown,
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Security::MutualTls => "🔒 mTLS",
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
    /// Destination workload, `namespace/name`.
    pub workload: String,
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
    fn parse(node: &str, line: &Value) -> Option<Event> {
        let outcome = match line["message"].as_str()? {
            "inbound connection closed" if line.get("error").is_some() => Outcome::Failed,
            "inbound connection closed" => Outcome::Delivered,
            "inbound connection denied" => Outcome::Denied,
            "inbound connection rejected" | "inbound stream rejected" => Outcome::Rejected,
            _ => return None,
        };
        let text = |key: &str| line[key].as_str().map(str::to_owned);
        let reason = match outcome {
            Outcome::Delivered => None,
            Outcome::Denied => text("policy"),
            Outcome::Rejected => text("rejection"),
            Outcome::Failed => text("error"),
        };
        Some(Event {
            node: node.to_owned(),
            outcome,
            workload: text("workload")?,
            peer_identity: text("peer_identity").unwrap_or_else(|| "unknown".into()),
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

    /// The destination workload's name, without its namespace.
    pub fn destination(&self) -> String {
        let name = self.workload.rsplit('/').next().unwrap_or(&self.workload);
        name.to_owned()
    }
}

/// Every inbound event the agents logged since `mark`.
pub fn events_since(cluster: &Cluster, mark: &LogMark) -> Result<Vec<Event>> {
    let mut events = Vec::new();
    for (node, &from) in &mark.0 {
        let lines = cluster.agent_logs(node)?;
        events.extend(
            lines
                .iter()
                .skip(from)
                .filter_map(|l| Event::parse(node, l)),
        );
    }
    Ok(events)
}

/// Waits until the agents logged at least `expected` inbound events since `mark` (up to
/// `timeout`), then a little longer for stragglers; returns them.
pub fn wait_for_events(
    cluster: &Cluster,
    mark: &LogMark,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Event>> {
    let deadline = Instant::now() + timeout;
    while events_since(cluster, mark)?.len() < expected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300));
    events_since(cluster, mark)
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
        let key = (e.destination(), e.source(), e.security);
        let edge = by_key.entry(key).or_insert_with(|| Edge {
            source: e.source(),
            destination: e.destination(),
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
    cluster: &Cluster,
    step: Step,
    rounds: usize,
    pause: Duration,
    on_call: impl FnMut(&Call) -> Result<()>,
) -> Result<StepReport> {
    let mark = mark_logs(cluster)?;
    let calls = load(cluster, rounds, pause, on_call)?;
    let events = wait_for_events(
        cluster,
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
    let found: Vec<&Edge> = edges
        .iter()
        .filter(|e| e.source == source && e.destination == destination && e.connections > 0)
        .collect();
    ensure!(
        !found.is_empty(),
        "no delivered connection {source} -> {destination}; the agents saw:\n{}",
        list(edges)
    );
    for e in found {
        ensure!(
            e.security == security,
            "{source} -> {destination} was {}, want {security}",
            e.security
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
            e.destination() == destination
                && e.outcome != Outcome::Delivered
                && e.reason.as_deref().is_some_and(|r| r.contains(reason))
        })
        .with_context(|| format!("no refusal of {destination} names {reason:?}"))
}

/// Every hop preference made to recommendation v1 and v2 was mTLS.
pub fn expect_backend_hops(edges: &[Edge]) -> Result<()> {
    for v in ["recommendation-v1", "recommendation-v2"] {
        expect_edge(edges, "preference", v, Security::MutualTls)?;
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
    note(expect_edge(
        &report.edges,
        "customer",
        "preference",
        Security::MutualTls,
    ));
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
