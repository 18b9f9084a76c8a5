//! The runtime's `CNI_*` environment variables.
//!
//! Read through a lookup function rather than the process environment, so that tests need not
//! mutate the environment of the test process.

use std::ffi::OsString;

use mesh_cni::protocol::{Command, PodRef};

use super::error::{CniError, ErrorCode};

/// Looks an environment variable up (`std::env::var_os` in the binary).
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    /// Answered by the plugin itself.
    Version,
    /// ADD, DEL or CHECK: relayed to the agent.
    Relay(Command),
}

impl CniCommand {
    pub fn from_env(env: Lookup) -> Result<Self, CniError> {
        match required(env, "CNI_COMMAND")?.as_str() {
            "ADD" => Ok(Self::Relay(Command::Add)),
            "DEL" => Ok(Self::Relay(Command::Del)),
            "CHECK" => Ok(Self::Relay(Command::Check)),
            "VERSION" => Ok(Self::Version),
            other => Err(invalid_env(
                format!("unknown CNI_COMMAND {other:?}"),
                "mesh-cni implements ADD, DEL, CHECK and VERSION (CNI spec 1.0.0)",
            )),
        }
    }
}

/// The sandbox an ADD, DEL or CHECK is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub container_id: String,
    /// Empty on a DEL whose namespace is already gone.
    pub netns: String,
    pub if_name: String,
    /// `None` when the runtime passed no Kubernetes pod (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`):
    /// the sandbox is not a pod, so the mesh has nothing to do with it.
    pub pod: Option<PodRef>,
}

impl Sandbox {
    /// `netns_required`: the spec lets DEL come without `CNI_NETNS`.
    pub fn from_env(env: Lookup, netns_required: bool) -> Result<Self, CniError> {
        let container_id = required(env, "CNI_CONTAINERID")?;
        let netns = if netns_required {
            required(env, "CNI_NETNS")?
        } else {
            optional(env, "CNI_NETNS")?.unwrap_or_default()
        };
        let args = optional(env, "CNI_ARGS")?.unwrap_or_default();
        Ok(Self {
            container_id,
            netns,
            if_name: required(env, "CNI_IFNAME")?,
            pod: pod_ref(&parse_args(&args)?),
        })
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn parse_args(args: &str) -> Result<Vec<(&str, &str)>, CniError> {
    args.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=').ok_or_else(|| {
                invalid_env(
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                    format!("CNI_ARGS={args:?}"),
                )
            })
        })
        .collect()
}

/// The pod from the keys kubelet's runtime sets. `K8S_POD_INFRA_CONTAINER_ID` is not needed:
/// it names the sandbox container, which `CNI_CONTAINERID` already does.
fn pod_ref(args: &[(&str, &str)]) -> Option<PodRef> {
    let get = |key: &str| {
        args.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
            .filter(|v| !v.is_empty())
    };
    Some(PodRef {
        namespace: get("K8S_POD_NAMESPACE")?,
        name: get("K8S_POD_NAME")?,
        uid: get("K8S_POD_UID"),
    })
}

fn required(env: Lookup, name: &str) -> Result<String, CniError> {
    optional(env, name)?
        .filter(|value| !value.is_empty())
        .ok_or_else(|| invalid_env(format!("{name} is not set"), "the runtime must set it"))
}

fn optional(env: Lookup, name: &str) -> Result<Option<String>, CniError> {
    env(name)
        .map(|value| {
            value
                .into_string()
                .map_err(|value| invalid_env(format!("{name} is not UTF-8"), format!("{value:?}")))
        })
        .transpose()
}

fn invalid_env(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidEnvironment, msg, details)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, os::unix::ffi::OsStringExt as _};

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    const SANDBOX: [(&str, &str); 3] = [
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
    ];

    fn with_args(args: &str) -> Result<Sandbox, CniError> {
        let mut vars = SANDBOX.to_vec();
        vars.push(("CNI_ARGS", args));
        Sandbox::from_env(&env(&vars), true)
    }

    #[test]
    fn commands() {
        for (name, command) in [
            ("ADD", CniCommand::Relay(Command::Add)),
            ("DEL", CniCommand::Relay(Command::Del)),
            ("CHECK", CniCommand::Relay(Command::Check)),
            ("VERSION", CniCommand::Version),
        ] {
            assert_eq!(
                CniCommand::from_env(&env(&[("CNI_COMMAND", name)])),
                Ok(command)
            );
        }
        for vars in [&[("CNI_COMMAND", "GC")][..], &[]] {
            let error = CniCommand::from_env(&env(vars)).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidEnvironment);
        }
    }

    #[test]
    fn kubernetes_pod_from_cni_args() {
        let sandbox = with_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1234-5678",
        )
        .unwrap();
        assert_eq!(
            sandbox,
            Sandbox {
                container_id: "c0ffee".into(),
                netns: "/var/run/netns/cni-1".into(),
                if_name: "eth0".into(),
                pod: Some(PodRef {
                    namespace: "shop".into(),
                    name: "web-0".into(),
                    uid: Some("1234-5678".into()),
                }),
            }
        );
    }

    #[test]
    fn not_a_pod_without_both_names() {
        for args in [
            "",
            "K8S_POD_NAME=web-0",
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=",
            ";;",
        ] {
            assert_eq!(with_args(args).unwrap().pod, None, "{args:?}");
        }
        let vars = SANDBOX.to_vec();
        assert_eq!(Sandbox::from_env(&env(&vars), true).unwrap().pod, None);
    }

    #[test]
    fn malformed_cni_args() {
        let error = with_args("K8S_POD_NAME=web-0;garbage").unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidEnvironment);
    }

    #[test]
    fn netns_is_optional_for_del_only() {
        let vars = [("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")];
        assert_eq!(Sandbox::from_env(&env(&vars), false).unwrap().netns, "");
        let error = Sandbox::from_env(&env(&vars), true).unwrap_err();
        assert!(error.msg.contains("CNI_NETNS"), "{error:?}");
    }

    #[test]
    fn non_utf8_variable() {
        let bad = OsString::from_vec(vec![0xff]);
        let lookup = move |name: &str| (name == "CNI_COMMAND").then(|| bad.clone());
        let error = CniCommand::from_env(&lookup).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidEnvironment);
    }
}
