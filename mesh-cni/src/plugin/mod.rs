//! The CNI plugin: relays ADD, DEL and CHECK of Kubernetes pod sandboxes to the node's agent.
//!
//! Fail closed: an ADD succeeds only once the agent has enrolled the pod or decided it is not in
//! the mesh, so that no pod of the mesh ever runs with its traffic uncaptured. Without an agent
//! on the node, pods do not start there (kubelet retries them) — except hostNetwork pods, such
//! as the agent's own, which never go through CNI.
//!
//! stdout carries the CNI result and nothing else; diagnostics go to stderr, which runtimes
//! keep.

mod env;
mod error;
mod netconf;

use std::{
    io::{self, Read as _, Write as _},
    path::Path,
    process::ExitCode,
};

use mesh_cni::{
    CNI_VERSION, SUPPORTED_CNI_VERSIONS,
    protocol::{self, CallError, Command, Outcome, PodRef, Request},
};
use serde_json::{Value, json};

use self::{
    env::{CniCommand, Lookup, Sandbox},
    error::{CniError, ErrorCode, chain},
    netconf::{NetConf, result_ips},
};

pub fn run() -> ExitCode {
    let env = |name: &str| std::env::var_os(name);
    let command = match CniCommand::from_env(&env) {
        Ok(CniCommand::Version) => {
            let versions =
                json!({"cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_CNI_VERSIONS});
            return emit(&versions);
        }
        Ok(CniCommand::Relay(command)) => command,
        Err(error) => return fail(CNI_VERSION, &error),
    };
    let conf = read_stdin().and_then(|stdin| NetConf::parse(&stdin));
    match command {
        Command::Add => respond(conf, |conf| add(&env, conf).map(Some)),
        Command::Check => respond(conf, |conf| check(&env, conf).map(|()| None)),
        Command::Del => {
            if let Err(error) = conf.and_then(|conf| del(&env, &conf)) {
                eprintln!("mesh-cni: DEL: {}: {}", error.msg, error.details);
            }
            ExitCode::SUCCESS
        }
    }
}

/// Runs an ADD or CHECK and prints its result, if it has one, or its error.
fn respond(
    conf: Result<NetConf, CniError>,
    operation: impl FnOnce(&NetConf) -> Result<Option<Value>, CniError>,
) -> ExitCode {
    let conf = match conf {
        Ok(conf) => conf,
        Err(error) => return fail(CNI_VERSION, &error),
    };
    match operation(&conf) {
        Ok(Some(result)) => emit(&result),
        Ok(None) => ExitCode::SUCCESS,
        Err(error) => fail(&conf.cni_version, &error),
    }
}

/// Returns the previous result once the agent has enrolled the pod, or found it outside the
/// mesh; a sandbox that is not a pod passes through.
fn add(env: Lookup, conf: &NetConf) -> Result<Value, CniError> {
    let prev_result = conf.prev_result()?;
    let sandbox = Sandbox::from_env(env, true)?;
    if let Some(pod) = &sandbox.pod {
        let request = request(Command::Add, &sandbox, pod, result_ips(prev_result)?);
        if let Outcome::Failed { error } = ask_agent(conf, &request)? {
            return Err(CniError::new(
                ErrorCode::TryAgainLater,
                format!(
                    "mesh-agent could not enrol pod {}/{}; see its logs (kubelet retries the pod)",
                    pod.namespace, pod.name
                ),
                error,
            ));
        }
    }
    Ok(conf.output(prev_result))
}

/// Fails when the agent says the pod should be enrolled and is not, or cannot say.
fn check(env: Lookup, conf: &NetConf) -> Result<(), CniError> {
    let prev_result = conf.prev_result()?;
    let sandbox = Sandbox::from_env(env, true)?;
    let Some(pod) = &sandbox.pod else {
        return Ok(());
    };
    let request = request(Command::Check, &sandbox, pod, result_ips(prev_result)?);
    match ask_agent(conf, &request)? {
        Outcome::Failed { error } => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "mesh-agent reports pod {}/{} is not enrolled as it should be",
                pod.namespace, pod.name
            ),
            error,
        )),
        Outcome::Enrolled | Outcome::NotInMesh { .. } => Ok(()),
    }
}

/// Tells the agent the pod is going, so that it lets go of the namespace at once; the agent
/// also notices on its own, so any error here is only logged.
fn del(env: Lookup, conf: &NetConf) -> Result<(), CniError> {
    let sandbox = Sandbox::from_env(env, false)?;
    let Some(pod) = &sandbox.pod else {
        return Ok(());
    };
    let ips = conf
        .prev_result_if_any()
        .map_or(Ok(Vec::new()), result_ips)?;
    let request = request(Command::Del, &sandbox, pod, ips);
    match ask_agent(conf, &request)? {
        Outcome::Failed { error } => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "mesh-agent failed to release pod {}/{}",
                pod.namespace, pod.name
            ),
            error,
        )),
        Outcome::Enrolled | Outcome::NotInMesh { .. } => Ok(()),
    }
}

fn request(
    command: Command,
    sandbox: &Sandbox,
    pod: &PodRef,
    ips: Vec<std::net::IpAddr>,
) -> Request {
    Request {
        command,
        container_id: sandbox.container_id.clone(),
        netns: sandbox.netns.clone(),
        if_name: sandbox.if_name.clone(),
        pod: pod.clone(),
        ips,
    }
}

fn ask_agent(conf: &NetConf, request: &Request) -> Result<Outcome, CniError> {
    protocol::call(&conf.agent_socket, request, conf.timeout())
        .map(|response| response.outcome)
        .map_err(|error| agent_error(&conf.agent_socket, &error))
}

/// Says what to do about each way of not getting an answer; all are worth a retry.
fn agent_error(socket: &Path, error: &CallError) -> CniError {
    let socket = socket.display();
    let msg = match error {
        CallError::Unreachable { .. } => format!(
            "mesh-agent on this node is not running at {socket}: start it (mesh-agent \
             DaemonSet); kubelet retries the pod"
        ),
        CallError::Timeout(_) => format!(
            "mesh-agent at {socket} did not answer in time: check its logs; kubelet retries the pod"
        ),
        CallError::Connection(_) => format!(
            "mesh-agent at {socket} hung up without answering: check its logs; kubelet retries \
             the pod"
        ),
        CallError::Protocol(_) => format!(
            "mesh-agent at {socket} sent an answer mesh-cni does not understand: deploy mesh-cni \
             and mesh-agent of the same version"
        ),
    };
    CniError::new(ErrorCode::TryAgainLater, msg, chain(error))
}

fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut stdin = Vec::new();
    io::stdin().read_to_end(&mut stdin).map_err(|e| {
        CniError::new(
            ErrorCode::Io,
            "cannot read the network config from stdin",
            e.to_string(),
        )
    })?;
    Ok(stdin)
}

fn fail(cni_version: &str, error: &CniError) -> ExitCode {
    emit(&error.to_json(cni_version));
    ExitCode::FAILURE
}

/// Prints a result or error on stdout; a runtime that closed it gets a failure.
fn emit(output: &Value) -> ExitCode {
    match writeln!(io::stdout().lock(), "{output}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-cni: cannot write the result: {e}");
            ExitCode::FAILURE
        }
    }
}
