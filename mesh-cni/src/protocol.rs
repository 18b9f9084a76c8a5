//! What the plugin and the node's agent say to each other.
//!
//! A unix stream socket; the plugin writes one JSON request line, the agent answers with one JSON
//! response line, then both close. One exchange per connection keeps both ends trivial: no
//! framing beyond `\n`, no state to resynchronise after an error.
//!
//! The plugin side is blocking ([`call`]): it is exec'd once per pod and must not pay for an async
//! runtime. The agent side is async, so this module gives it only the sync pieces
//! ([`parse_request`], [`encode_response`], [`MAX_MESSAGE_BYTES`]) and leaves the I/O to it.

use std::{
    io::{self, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The longest line either side accepts, newline included. Far above a real message (a few
/// hundred bytes) and low enough that a confused peer cannot make the other buffer without
/// bound. The agent should read at most this many bytes plus one, up to the first `\n`, and
/// hand them to [`parse_request`], which rejects an over-long line.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The CNI operation the plugin relays. VERSION never reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
}

/// The pod a sandbox belongs to, from the runtime's `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`; older runtimes do not pass it.
    pub uid: Option<String>,
}

/// One plugin invocation, as the agent needs it to find and enrol the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub command: Command,
    /// `CNI_CONTAINERID`: the sandbox (pause) container.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace; empty on a DEL after it is gone.
    pub netns: String,
    /// `CNI_IFNAME`: the pod's interface the main plugin set up.
    pub if_name: String,
    pub pod: PodRef,
    /// The pod's addresses, from the previous plugin's result.
    pub ips: Vec<IpAddr>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What the agent did with the pod; on the wire `{"outcome":"enrolled"}`,
/// `{"outcome":"notInMesh","reason":..}` or `{"outcome":"failed","error":..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum Outcome {
    /// Traffic of the pod is captured (ADD), or the agent serves it as it should (CHECK).
    Enrolled,
    /// The pod is not in the mesh (not labelled, opted out, hostNetwork, gone on DEL).
    NotInMesh { reason: String },
    /// The pod should be in the mesh and the agent could not make it so.
    Failed { error: String },
}

/// A line that is not a message of this protocol.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
}

/// Why [`call`] got no answer. The plugin tells an absent agent from a stuck or confused one.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing accepts connections at the socket: the agent is not running on this node.
    #[error("cannot connect to {}", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer within {}s", .0.as_secs_f32())]
    Timeout(Duration),
    /// The agent accepted, then the connection broke or closed before it answered.
    #[error("connection lost before an answer")]
    Connection(#[source] io::Error),
    #[error("invalid answer")]
    Protocol(#[from] MessageError),
}

/// Sends `request` to the agent listening at `socket` and waits at most `timeout`, in all, for
/// its answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
    if timeout.is_zero() {
        // Sockets refuse a zero timeout (it would mean "none"); no time left is a timeout.
        return Err(CallError::Timeout(timeout));
    }
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket).map_err(|source| CallError::Unreachable {
        socket: socket.to_owned(),
        source,
    })?;
    let io_error = |error| exchange_error(error, timeout);
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    stream.write_all(&encode_line(request)).map_err(io_error)?;
    let line = read_line(&mut stream, deadline).map_err(io_error)?;
    if line.is_empty() {
        return Err(CallError::Connection(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        )));
    }
    Ok(parse_line(&line)?)
}

/// Decodes the plugin's request line (trailing newline allowed).
pub fn parse_request(line: &[u8]) -> Result<Request, MessageError> {
    parse_line(line)
}

/// Encodes the agent's answer as one line, ready to write.
pub fn encode_response(response: &Response) -> Vec<u8> {
    encode_line(response)
}

fn parse_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, MessageError> {
    if line.len() > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLarge(line.len()));
    }
    Ok(serde_json::from_slice(line)?)
}

fn encode_line<T: Serialize>(message: &T) -> Vec<u8> {
    // Our messages are structs of strings, addresses and enums: serializing cannot fail.
    let mut line = serde_json::to_vec(message).expect("protocol messages always serialize");
    line.push(b'\n');
    line
}

/// Reads up to the first `\n` (or EOF), giving up at `deadline`. A line over the limit is
/// returned as is, one byte too long, for [`parse_line`] to reject.
fn read_line(stream: &mut UnixStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    while !line.contains(&b'\n') && line.len() <= MAX_MESSAGE_BYTES {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(remaining))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(line)
}

/// Socket timeouts surface as `WouldBlock` (or `TimedOut`, from [`read_line`]'s own deadline).
fn exchange_error(error: io::Error, timeout: Duration) -> CallError {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CallError::Timeout(timeout),
        _ => CallError::Connection(error),
    }
}

#[cfg(test)]
mod tests {
    use std::{io::BufRead as _, io::BufReader, os::unix::net::UnixListener, thread};

    use serde_json::json;

    use super::*;

    fn request() -> Request {
        Request {
            command: Command::Add,
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/cni-1".into(),
            if_name: "eth0".into(),
            pod: PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: Some("0d9c-11".into()),
            },
            ips: vec!["10.1.0.5".parse().unwrap(), "fd00:1::5".parse().unwrap()],
        }
    }

    #[test]
    fn request_wire_format_is_camel_case() {
        let wire: serde_json::Value = serde_json::from_slice(&encode_line(&request())).unwrap();
        assert_eq!(
            wire,
            json!({
                "command": "ADD", "containerId": "c0ffee", "netns": "/var/run/netns/cni-1",
                "ifName": "eth0", "pod": {"namespace": "default", "name": "web-0", "uid": "0d9c-11"},
                "ips": ["10.1.0.5", "fd00:1::5"],
            })
        );
    }

    #[test]
    fn request_round_trips() {
        let line = encode_line(&request());
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(parse_request(&line).unwrap(), request());
    }

    #[test]
    fn request_without_uid_parses() {
        let line = br#"{"command":"DEL","containerId":"c","netns":"","ifName":"eth0",
            "pod":{"namespace":"n","name":"p"},"ips":[]}"#;
        let parsed = parse_request(line).unwrap();
        assert_eq!(parsed.command, Command::Del);
        assert_eq!(parsed.pod.uid, None);
    }

    #[test]
    fn responses_round_trip_with_the_outcome_tag() {
        let cases = [
            (Outcome::Enrolled, json!({"outcome": "enrolled"})),
            (
                Outcome::NotInMesh {
                    reason: "no label".into(),
                },
                json!({"outcome": "notInMesh", "reason": "no label"}),
            ),
            (
                Outcome::Failed {
                    error: "boom".into(),
                },
                json!({"outcome": "failed", "error": "boom"}),
            ),
        ];
        for (outcome, wire) in cases {
            let response = Response { outcome };
            let line = encode_response(&response);
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&line).unwrap(),
                wire
            );
            assert_eq!(parse_line::<Response>(&line).unwrap(), response);
        }
    }

    #[test]
    fn garbage_is_rejected() {
        for line in [
            &b"not json\n"[..],
            b"",
            b"{}",
            br#"{"command":"RESTART","containerId":"c","netns":"","ifName":"e","pod":{"namespace":"n","name":"p"},"ips":[]}"#,
            br#"{"command":"ADD","containerId":"c","netns":"","ifName":"e","pod":{"namespace":"n","name":"p"},"ips":["10.0.0.300"]}"#,
            &[0xff, 0xfe, b'\n'],
        ] {
            assert!(matches!(parse_request(line), Err(MessageError::Json(_))), "{line:?}");
        }
        assert!(parse_line::<Response>(br#"{"outcome":"maybe"}"#).is_err());
        assert!(parse_line::<Response>(br#"{"outcome":"failed"}"#).is_err());
    }

    #[test]
    fn oversized_line_is_rejected() {
        let line = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            parse_request(&line),
            Err(MessageError::TooLarge(n)) if n == MAX_MESSAGE_BYTES + 1
        ));
    }

    /// An agent that reads one request line, then lets `answer` write whatever it likes.
    fn agent(
        answer: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            BufReader::new(&stream)
                .read_until(b'\n', &mut line)
                .unwrap();
            parse_request(&line).unwrap();
            answer(&mut stream);
        });
        (dir, socket)
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn call_returns_the_answer() {
        let (_dir, socket) = agent(|stream| {
            let response = Response {
                outcome: Outcome::Enrolled,
            };
            stream.write_all(&encode_response(&response)).unwrap();
        });
        let response = call(&socket, &request(), TIMEOUT).unwrap();
        assert_eq!(response.outcome, Outcome::Enrolled);
    }

    #[test]
    fn call_without_agent_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let error = call(&dir.path().join("none.sock"), &request(), TIMEOUT).unwrap_err();
        assert!(matches!(error, CallError::Unreachable { .. }), "{error:?}");
    }

    #[test]
    fn call_times_out_on_a_silent_agent() {
        let (_dir, socket) = agent(|_| thread::sleep(Duration::from_secs(2)));
        let error = call(&socket, &request(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(error, CallError::Timeout(_)), "{error:?}");
    }

    #[test]
    fn call_rejects_a_garbage_answer() {
        let (_dir, socket) = agent(|stream| stream.write_all(b"<html>\n").unwrap());
        let error = call(&socket, &request(), TIMEOUT).unwrap_err();
        assert!(matches!(error, CallError::Protocol(_)), "{error:?}");
    }

    #[test]
    fn call_rejects_an_endless_answer() {
        let (_dir, socket) = agent(|stream| {
            let _ = stream.write_all(&vec![b'x'; 2 * MAX_MESSAGE_BYTES]);
        });
        let error = call(&socket, &request(), TIMEOUT).unwrap_err();
        assert!(
            matches!(error, CallError::Protocol(MessageError::TooLarge(_))),
            "{error:?}"
        );
    }

    #[test]
    fn call_reports_a_hang_up() {
        let (_dir, socket) = agent(|_| {});
        let error = call(&socket, &request(), TIMEOUT).unwrap_err();
        assert!(matches!(error, CallError::Connection(_)), "{error:?}");
    }
}
