//! The network config the runtime passes on stdin, and the previous plugin's result in it.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use mesh_cni::{DEFAULT_TIMEOUT_SECONDS, SUPPORTED_CNI_VERSIONS};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{CniError, ErrorCode};

/// The plugin's entry of the conflist, as the runtime hands it over (with `name` and
/// `cniVersion` of the list, and `prevResult`). Other keys are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub agent_socket: PathBuf,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
    prev_result: Option<Map<String, Value>>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

impl NetConf {
    /// Tells bytes that are not JSON (a decode error) from JSON that is not a valid config.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let json: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "the network config on stdin is not JSON",
                e.to_string(),
            )
        })?;
        let conf: Self = serde_json::from_value(json)
            .map_err(|e| invalid_config("invalid mesh-cni network config", e.to_string()))?;
        if !SUPPORTED_CNI_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "mesh-cni does not support cniVersion {:?}",
                    conf.cni_version
                ),
                format!("supported: {}", SUPPORTED_CNI_VERSIONS.join(", ")),
            ));
        }
        if conf.timeout_seconds == 0 {
            return Err(invalid_config("timeoutSeconds must be positive", ""));
        }
        Ok(conf)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }

    /// The main plugin's result: mesh-cni is chained, it never sets up an interface itself.
    pub fn prev_result(&self) -> Result<&Map<String, Value>, CniError> {
        self.prev_result.as_ref().ok_or_else(|| {
            invalid_config(
                "mesh-cni got no prevResult",
                "it is a chained plugin: list it after the network plugin in a .conflist",
            )
        })
    }

    /// The previous result, if any, for a DEL (which may come without one).
    pub fn prev_result_if_any(&self) -> Option<&Map<String, Value>> {
        self.prev_result.as_ref()
    }

    /// What the plugin outputs: the previous result, unchanged, in the config's version.
    pub fn output(&self, prev_result: &Map<String, Value>) -> Value {
        let mut output = prev_result.clone();
        output.insert("cniVersion".into(), self.cni_version.clone().into());
        Value::Object(output)
    }
}

/// The pod's addresses: `ips[].address`, CIDR strings such as `10.1.0.5/24`.
pub fn result_ips(prev_result: &Map<String, Value>) -> Result<Vec<IpAddr>, CniError> {
    let Some(ips) = prev_result.get("ips") else {
        return Ok(Vec::new());
    };
    let ips = ips
        .as_array()
        .ok_or_else(|| invalid_config("prevResult.ips is not a list", ips.to_string()))?;
    ips.iter().map(result_ip).collect()
}

fn result_ip(ip: &Value) -> Result<IpAddr, CniError> {
    ip.get("address")
        .and_then(Value::as_str)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|address| address.parse().ok())
        .ok_or_else(|| invalid_config("prevResult.ips[] has no valid address", ip.to_string()))
}

fn invalid_config(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidNetworkConfig, msg, details)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(json: Value) -> Result<NetConf, CniError> {
        NetConf::parse(json.to_string().as_bytes())
    }

    fn conf(prev_result: Value) -> NetConf {
        parse(json!({
            "cniVersion": "1.0.0", "name": "pods", "type": "mesh-cni",
            "agentSocket": "/run/mesh/cni.sock", "prevResult": prev_result,
        }))
        .unwrap()
    }

    #[test]
    fn defaults_and_fields() {
        let conf = conf(json!({"ips": []}));
        assert_eq!(conf.agent_socket, PathBuf::from("/run/mesh/cni.sock"));
        assert_eq!(conf.timeout(), Duration::from_secs(30));
        assert!(conf.prev_result().is_ok());
    }

    #[test]
    fn error_codes() {
        let code = |json: Value| parse(json).unwrap_err().code;
        assert_eq!(
            NetConf::parse(b"{oops").unwrap_err().code,
            ErrorCode::Decode
        );
        assert_eq!(
            code(json!({"cniVersion": "1.0.0"})),
            ErrorCode::InvalidNetworkConfig
        );
        assert_eq!(
            code(json!({"cniVersion": "0.2.0", "agentSocket": "/s"})),
            ErrorCode::IncompatibleVersion
        );
        assert_eq!(
            code(json!({"cniVersion": "1.0.0", "agentSocket": "/s", "timeoutSeconds": 0})),
            ErrorCode::InvalidNetworkConfig
        );
        assert_eq!(
            code(json!({"cniVersion": "1.0.0", "agentSocket": "/s", "prevResult": []})),
            ErrorCode::InvalidNetworkConfig
        );
        let no_prev = parse(json!({"cniVersion": "0.3.1", "agentSocket": "/s"})).unwrap();
        assert_eq!(
            no_prev.prev_result().unwrap_err().code,
            ErrorCode::InvalidNetworkConfig
        );
    }

    #[test]
    fn ips_from_the_previous_result() {
        let conf = conf(json!({
            "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.1.0.5/24", "interface": 0}, {"address": "fd00:1::5/64"}],
        }));
        let ips = result_ips(conf.prev_result().unwrap()).unwrap();
        assert_eq!(
            ips,
            [
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00:1::5".parse().unwrap()
            ]
        );
        assert!(result_ips(&Map::new()).unwrap().is_empty());
        for bad in [
            json!({"ips": {}}),
            json!({"ips": [{"address": "10.1.0/24"}]}),
            json!({"ips": [{}]}),
        ] {
            let conf = self::conf(bad);
            let error = result_ips(conf.prev_result().unwrap()).unwrap_err();
            assert_eq!(error.code, ErrorCode::InvalidNetworkConfig);
        }
    }

    #[test]
    fn output_is_the_previous_result_in_the_config_version() {
        let conf = conf(json!({"cniVersion": "0.4.0", "ips": [], "dns": {}}));
        assert_eq!(
            conf.output(conf.prev_result().unwrap()),
            json!({"cniVersion": "1.0.0", "ips": [], "dns": {}})
        );
    }
}
