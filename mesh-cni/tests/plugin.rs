//! Runs the built plugin as a container runtime does (CNI_* environment, config on stdin)
//! against an in-test agent on a unix socket.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    os::unix::net::UnixListener,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use mesh_cni::protocol::{self, MAX_MESSAGE_BYTES, Outcome, Request, Response};
use serde_json::{Value, json};
use tempfile::TempDir;

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
                        K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=9f1c-42";

/// A socket directory; the agent, if any, listens at `socket`.
struct Node {
    _dir: TempDir,
    socket: PathBuf,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    Node { _dir: dir, socket }
}

impl Node {
    /// An agent that answers one request with `outcome` and hands the request over.
    fn agent(&self, outcome: Outcome) -> mpsc::Receiver<Request> {
        let listener = UnixListener::bind(&self.socket).unwrap();
        let (requests, received) = mpsc::channel();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            BufReader::new((&stream).take(MAX_MESSAGE_BYTES as u64 + 1))
                .read_until(b'\n', &mut line)
                .unwrap();
            requests
                .send(protocol::parse_request(&line).unwrap())
                .unwrap();
            stream
                .write_all(&protocol::encode_response(&Response { outcome }))
                .unwrap();
        });
        received
    }

    /// An agent that accepts and never answers.
    fn silent_agent(&self) {
        let listener = UnixListener::bind(&self.socket).unwrap();
        thread::spawn(move || {
            let _connection = listener.accept().unwrap();
            thread::sleep(Duration::from_secs(30));
        });
    }

    fn config(&self, prev_result: Option<Value>) -> Vec<u8> {
        let mut config = json!({
            "cniVersion": "1.0.0", "name": "pods", "type": "mesh-cni",
            "agentSocket": self.socket, "timeoutSeconds": 1,
        });
        if let Some(prev_result) = prev_result {
            config["prevResult"] = prev_result;
        }
        config.to_string().into_bytes()
    }
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [{"address": "10.1.0.5/24", "interface": 0}, {"address": "fd00:1::5/64", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    })
}

fn run(command: &str, cni_args: &str, stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/var/run/netns/cni-1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", cni_args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // VERSION and early errors exit without reading stdin; runtimes ignore that, and so do we.
    let written = child.stdin.take().unwrap().write_all(stdin);
    assert!(
        written.as_ref().is_ok()
            || written
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::BrokenPipe),
        "{written:?}"
    );
    child.wait_with_output().unwrap()
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Asserts exit 1 with a CNI error of `code` on stdout; returns its `msg` and `details`.
fn assert_cni_error(output: &Output, code: u32) -> (String, String) {
    let error = stdout_json(output);
    assert_eq!(output.status.code(), Some(1), "{error}");
    assert_eq!(error["code"], code, "{error}");
    assert_eq!(error["cniVersion"], "1.0.0", "{error}");
    let text = |key: &str| error[key].as_str().unwrap_or_default().to_owned();
    assert!(!text("msg").is_empty(), "{error}");
    (text("msg"), text("details"))
}

#[test]
fn add_enrolled_returns_the_previous_result() {
    let node = node();
    let requests = node.agent(Outcome::Enrolled);
    let output = run("ADD", POD_ARGS, &node.config(Some(prev_result())));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout_json(&output), prev_result());
    let request = requests.recv().unwrap();
    assert_eq!(
        serde_json::to_value(request).unwrap(),
        json!({
            "command": "ADD", "containerId": "c0ffee", "netns": "/var/run/netns/cni-1",
            "ifName": "eth0", "pod": {"namespace": "shop", "name": "web-0", "uid": "9f1c-42"},
            "ips": ["10.1.0.5", "fd00:1::5"],
        })
    );
}

#[test]
fn add_not_in_mesh_returns_the_previous_result() {
    let node = node();
    let _requests = node.agent(Outcome::NotInMesh {
        reason: "no label".into(),
    });
    let output = run("ADD", POD_ARGS, &node.config(Some(prev_result())));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout_json(&output), prev_result());
}

#[test]
fn add_fails_when_the_agent_fails() {
    let node = node();
    let _requests = node.agent(Outcome::Failed {
        error: "cgroup not found".into(),
    });
    let output = run("ADD", POD_ARGS, &node.config(Some(prev_result())));
    let (msg, details) = assert_cni_error(&output, 11);
    assert!(msg.contains("shop/web-0"), "{msg}");
    assert_eq!(details, "cgroup not found");
}

#[test]
fn add_fails_closed_without_an_agent() {
    let node = node();
    let output = run("ADD", POD_ARGS, &node.config(Some(prev_result())));
    let (msg, _) = assert_cni_error(&output, 11);
    assert!(msg.contains("not running"), "{msg}");
    assert!(msg.contains(&node.socket.display().to_string()), "{msg}");
}

#[test]
fn add_fails_when_the_agent_does_not_answer() {
    let node = node();
    node.silent_agent();
    let output = run("ADD", POD_ARGS, &node.config(Some(prev_result())));
    let (msg, _) = assert_cni_error(&output, 11);
    assert!(msg.contains("did not answer"), "{msg}");
}

#[test]
fn add_without_prev_result_is_an_invalid_config() {
    let node = node();
    let output = run("ADD", POD_ARGS, &node.config(None));
    let (msg, _) = assert_cni_error(&output, 7);
    assert!(msg.contains("prevResult"), "{msg}");
}

#[test]
fn add_of_a_non_kubernetes_sandbox_passes_through() {
    let node = node();
    let output = run("ADD", "IgnoreUnknown=1", &node.config(Some(prev_result())));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout_json(&output), prev_result());
}

#[test]
fn garbage_config_is_a_decode_error() {
    let output = run("ADD", POD_ARGS, b"\x00not json at all");
    let (msg, _) = assert_cni_error(&output, 6);
    assert!(msg.contains("not JSON"), "{msg}");
}

#[test]
fn del_without_an_agent_succeeds() {
    let node = node();
    let output = run("DEL", POD_ARGS, &node.config(Some(prev_result())));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
}

#[test]
fn del_with_garbage_config_succeeds() {
    let output = run("DEL", POD_ARGS, b"{");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
}

#[test]
fn del_notifies_the_agent() {
    let node = node();
    let requests = node.agent(Outcome::Enrolled);
    let output = run("DEL", POD_ARGS, &node.config(None));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let request = requests.recv().unwrap();
    assert_eq!(request.command, protocol::Command::Del);
    assert!(request.ips.is_empty());
}

#[test]
fn check_fails_when_the_agent_fails() {
    let node = node();
    let _requests = node.agent(Outcome::Failed {
        error: "not enrolled".into(),
    });
    let output = run("CHECK", POD_ARGS, &node.config(Some(prev_result())));
    assert_cni_error(&output, 11);
}

#[test]
fn check_passes_when_enrolled() {
    let node = node();
    let requests = node.agent(Outcome::Enrolled);
    let output = run("CHECK", POD_ARGS, &node.config(Some(prev_result())));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    assert_eq!(requests.recv().unwrap().command, protocol::Command::Check);
}

#[test]
fn version() {
    let output = run("VERSION", "", br#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(
        stdout_json(&output),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    );
}

#[test]
fn unknown_command_is_an_invalid_environment() {
    let (msg, _) = assert_cni_error(&run("GC", POD_ARGS, b"{}"), 4);
    assert!(msg.contains("GC"), "{msg}");
}

#[test]
fn unsupported_version_is_incompatible() {
    let node = node();
    let mut config: Value = serde_json::from_slice(&node.config(Some(prev_result()))).unwrap();
    config["cniVersion"] = "0.2.0".into();
    let output = run("ADD", POD_ARGS, config.to_string().as_bytes());
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout_json(&output)["code"], 1);
}
