//! Istio's `security.istio.io` resources as users write them, field for field.
//!
//! Unknown fields are errors. Fields Istio has but this mesh cannot enforce at L4 are declared
//! with [`Refused`], so that a policy using them is rejected with the reason, never read as a
//! weaker policy. Values are checked while they are read, so that serde_yaml_ng reports the
//! field path and the line of the bad value; checks that involve several fields are in
//! `compile.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::pattern::{Glob, IpBlock, ServiceAccountRef};

pub(crate) const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
pub(crate) const PEER_AUTHENTICATION: &str = "PeerAuthentication";
pub(crate) const AUTHORIZATION_POLICY: &str = "AuthorizationPolicy";

/// What every document is read as first, whatever it holds: enough to name it in errors and to
/// choose its kind. It never fails on a mapping.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a Kubernetes object: a mapping with apiVersion, kind, metadata and spec")]
pub(crate) struct Header {
    #[serde(rename = "apiVersion")]
    pub(crate) api_version: Option<serde_yaml_ng::Value>,
    pub(crate) kind: Option<serde_yaml_ng::Value>,
    pub(crate) metadata: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PeerAuthenticationDoc {
    #[serde(rename = "apiVersion")]
    _api_version: ApiVersion,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    pub(crate) metadata: Metadata,
    #[serde(default)]
    pub(crate) spec: PeerAuthenticationSpec,
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct AuthorizationPolicyDoc {
    #[serde(rename = "apiVersion")]
    _api_version: ApiVersion,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    pub(crate) metadata: Metadata,
    #[serde(default)]
    pub(crate) spec: AuthorizationPolicySpec,
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

/// `metadata`: the name and namespace matter; the bookkeeping Kubernetes adds (what
/// `kubectl get -o yaml` prints) is accepted and ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Metadata {
    pub(crate) name: Option<String>,
    pub(crate) namespace: Option<String>,
    #[serde(default, rename = "labels")]
    _labels: Option<IgnoredAny>,
    #[serde(default, rename = "annotations")]
    _annotations: Option<IgnoredAny>,
    #[serde(default, rename = "resourceVersion")]
    _resource_version: Option<IgnoredAny>,
    #[serde(default, rename = "uid")]
    _uid: Option<IgnoredAny>,
    #[serde(default, rename = "creationTimestamp")]
    _creation_timestamp: Option<IgnoredAny>,
    #[serde(default, rename = "generation")]
    _generation: Option<IgnoredAny>,
    #[serde(default, rename = "managedFields")]
    _managed_fields: Option<IgnoredAny>,
    #[serde(default, rename = "selfLink")]
    _self_link: Option<IgnoredAny>,
    #[serde(default, rename = "ownerReferences")]
    _owner_references: Option<IgnoredAny>,
    #[serde(default, rename = "finalizers")]
    _finalizers: Option<IgnoredAny>,
    #[serde(default, rename = "generateName")]
    _generate_name: Option<IgnoredAny>,
    #[serde(default, rename = "deletionTimestamp")]
    _deletion_timestamp: Option<IgnoredAny>,
    #[serde(default, rename = "deletionGracePeriodSeconds")]
    _deletion_grace_period_seconds: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct WorkloadSelector {
    #[serde(default)]
    pub(crate) match_labels: UniqueMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PeerAuthenticationSpec {
    pub(crate) selector: Option<WorkloadSelector>,
    pub(crate) mtls: Option<MutualTls>,
    pub(crate) port_level_mtls: Option<UniqueMap<Port, MutualTls>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MutualTls {
    #[serde(default)]
    pub(crate) mode: ModeSetting,
}

/// `spec.mtls.mode` as written: `UNSET` (or absent) inherits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum ModeSetting {
    #[default]
    Unset,
    Strict,
    Permissive,
    Disable,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct AuthorizationPolicySpec {
    pub(crate) selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub(crate) action: ActionSetting,
    pub(crate) rules: Option<Vec<RuleSpec>>,
    #[serde(default, rename = "targetRef")]
    _target_ref: Refused<TargetRefs>,
    #[serde(default, rename = "targetRefs")]
    _target_refs: Refused<TargetRefs>,
    #[serde(default, rename = "provider")]
    _provider: Refused<ExternalProvider>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum ActionSetting {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleSpec {
    pub(crate) from: Option<Vec<FromSpec>>,
    pub(crate) to: Option<Vec<ToSpec>>,
    #[serde(default, rename = "when")]
    _when: Refused<Conditions>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FromSpec {
    pub(crate) source: Option<SourceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ToSpec {
    pub(crate) operation: Option<OperationSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SourceSpec {
    #[serde(default)]
    pub(crate) principals: Vec<Principal>,
    #[serde(default)]
    pub(crate) not_principals: Vec<Principal>,
    #[serde(default)]
    pub(crate) namespaces: Vec<NamespacePattern>,
    #[serde(default)]
    pub(crate) not_namespaces: Vec<NamespacePattern>,
    #[serde(default)]
    pub(crate) service_accounts: Vec<ServiceAccount>,
    #[serde(default)]
    pub(crate) not_service_accounts: Vec<ServiceAccount>,
    #[serde(default)]
    pub(crate) ip_blocks: Vec<IpBlockValue>,
    #[serde(default)]
    pub(crate) not_ip_blocks: Vec<IpBlockValue>,
    #[serde(default, rename = "requestPrincipals")]
    _request_principals: Refused<L7>,
    #[serde(default, rename = "notRequestPrincipals")]
    _not_request_principals: Refused<L7>,
    #[serde(default, rename = "remoteIpBlocks")]
    _remote_ip_blocks: Refused<L7>,
    #[serde(default, rename = "notRemoteIpBlocks")]
    _not_remote_ip_blocks: Refused<L7>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct OperationSpec {
    #[serde(default)]
    pub(crate) ports: Vec<Port>,
    #[serde(default)]
    pub(crate) not_ports: Vec<Port>,
    #[serde(default, rename = "hosts")]
    _hosts: Refused<L7>,
    #[serde(default, rename = "notHosts")]
    _not_hosts: Refused<L7>,
    #[serde(default, rename = "methods")]
    _methods: Refused<L7>,
    #[serde(default, rename = "notMethods")]
    _not_methods: Refused<L7>,
    #[serde(default, rename = "paths")]
    _paths: Refused<L7>,
    #[serde(default, rename = "notPaths")]
    _not_paths: Refused<L7>,
}

// ---- Values checked as they are read ----

/// A visitor for values written as a string; `parse` turns the string into the value or says
/// what is wrong with it.
struct StrVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        (self.parse)(text).map_err(E::custom)
    }
}

fn deserialize_str_with<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    deserializer.deserialize_str(StrVisitor { expecting, parse })
}

#[derive(Debug)]
pub(crate) struct ApiVersion;

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_str_with(deserializer, "an apiVersion", |text| {
            if API_VERSIONS.contains(&text) {
                Ok(ApiVersion)
            } else {
                Err(format!(
                    "unsupported apiVersion {text:?}, expected one of {}",
                    API_VERSIONS.join(", ")
                ))
            }
        })
    }
}

impl<'de> Deserialize<'de> for ModeSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_str_with(deserializer, "an mTLS mode", |text| match text {
            "UNSET" => Ok(ModeSetting::Unset),
            "STRICT" => Ok(ModeSetting::Strict),
            "PERMISSIVE" => Ok(ModeSetting::Permissive),
            "DISABLE" => Ok(ModeSetting::Disable),
            _ => Err(format!(
                "unknown variant {text:?}, expected one of STRICT, PERMISSIVE, DISABLE, UNSET"
            )),
        })
    }
}

impl<'de> Deserialize<'de> for ActionSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_str_with(deserializer, "an action", |text| match text {
            "ALLOW" => Ok(ActionSetting::Allow),
            "DENY" => Ok(ActionSetting::Deny),
            "AUDIT" => Err(
                "action AUDIT is not supported: this mesh has no audit sink for \
                            policies, and refuses the policy rather than ignore it"
                    .to_owned(),
            ),
            "CUSTOM" => Err(
                "action CUSTOM is not supported: it delegates decisions to an \
                             external authorization provider, which this mesh does not have"
                    .to_owned(),
            ),
            _ => Err(format!(
                "unknown variant {text:?}, expected one of ALLOW, DENY \
                 (AUDIT and CUSTOM are not supported)"
            )),
        })
    }
}

/// A `principals` value: `td/ns/<ns>/sa/<sa>` without the `spiffe://` scheme, exact or with one
/// `*` at the start or the end, or `*` alone (any authenticated peer).
#[derive(Debug)]
pub(crate) struct Principal(pub(crate) Glob);

impl<'de> Deserialize<'de> for Principal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_str_with(deserializer, "a principal", |text| {
            check_not_empty(text)?;
            if text.starts_with("spiffe://") {
                return Err(format!(
                    "{text:?}: write principals without the spiffe:// scheme, as Istio does \
                     (e.g. \"cluster.local/ns/default/sa/sleep\")"
                ));
            }
            let inner = text.strip_prefix('*').or_else(|| text.strip_suffix('*'));
            if inner.unwrap_or(text).contains('*') {
                return Err(format!(
                    "{text:?}: a principal may only have one `*`, at its start or its end"
                ));
            }
            Ok(Principal(Glob::new(text)))
        })
    }
}

/// A `namespaces` value: a namespace name, where `*` stands for any run of characters.
#[derive(Debug)]
pub(crate) struct NamespacePattern(pub(crate) Glob);

impl<'de> Deserialize<'de> for NamespacePattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_str_with(deserializer, "a namespace", |text| {
            check_not_empty(text)?;
            Ok(NamespacePattern(Glob::new(text)))
        })
    }
}

#[derive(Debug)]
pub(crate) struct ServiceAccount(pub(crate) ServiceAccountRef);

impl<'de> Deserialize<'de> for ServiceAccount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_str_with(deserializer, "a service account", |text| {
            check_not_empty(text)?;
            text.parse().map(ServiceAccount)
        })
    }
}

#[derive(Debug)]
pub(crate) struct IpBlockValue(pub(crate) IpBlock);

impl<'de> Deserialize<'de> for IpBlockValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_str_with(deserializer, "an IP address or CIDR block", |text| {
            check_not_empty(text)?;
            text.parse().map(IpBlockValue)
        })
    }
}

fn check_not_empty(text: &str) -> Result<(), String> {
    if text.is_empty() {
        Err("empty value is not allowed".to_owned())
    } else {
        Ok(())
    }
}

/// A TCP port, 1 to 65535, written as Istio does (`"8080"`) or as a number (`8080`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Port(pub(crate) u16);

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PortVisitor)
    }
}

struct PortVisitor;

impl Visitor<'_> for PortVisitor {
    type Value = Port;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number (1-65535), as a string or a number")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Port, E> {
        match u16::try_from(value) {
            Ok(port) if port != 0 => Ok(Port(port)),
            _ => Err(E::custom(format!(
                "port {value} is out of range: ports are 1 to 65535"
            ))),
        }
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Port, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(E::custom(format!(
                "port {value} is out of range: ports are 1 to 65535"
            ))),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Port, E> {
        match text.trim().parse::<u64>() {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(E::custom(format!("{text:?} is not a port number"))),
        }
    }
}

/// A mapping whose keys must be unique: YAML allows a key twice and the last would silently win.
#[derive(Debug)]
pub(crate) struct UniqueMap<K, V>(pub(crate) BTreeMap<K, V>);

impl<K, V> Default for UniqueMap<K, V> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<'de, K, V> Deserialize<'de> for UniqueMap<K, V>
where
    K: Deserialize<'de> + Ord + fmt::Display,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(UniqueMapVisitor(PhantomData))
    }
}

struct UniqueMapVisitor<K, V>(PhantomData<(K, V)>);

impl<'de, K, V> Visitor<'de> for UniqueMapVisitor<K, V>
where
    K: Deserialize<'de> + Ord + fmt::Display,
    V: Deserialize<'de>,
{
    type Value = UniqueMap<K, V>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = BTreeMap::new();
        while let Some(key) = access.next_key::<K>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key}")));
            }
            let value = access.next_value()?;
            map.insert(key, value);
        }
        Ok(UniqueMap(map))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(UniqueMap::default())
    }
}

// ---- Fields refused with their reason ----

/// Why a field is refused; the message becomes the error, after the field's path.
pub(crate) trait RefusalReason {
    const MESSAGE: &'static str;
}

#[derive(Debug)]
pub(crate) struct L7;

impl RefusalReason for L7 {
    const MESSAGE: &'static str = "this field needs L7 (HTTP) processing, which this mesh does \
        not do: it enforces policies at L4 only. The policy is refused rather than enforced \
        without it; remove the field, or express the rule with principals, namespaces, \
        ipBlocks and ports";
}

#[derive(Debug)]
pub(crate) struct Conditions;

impl RefusalReason for Conditions {
    const MESSAGE: &'static str = "`when` conditions need L7 (HTTP) processing, which this mesh \
        does not do: it enforces policies at L4 only. The policy is refused rather than \
        enforced without them; express the rule with from.source and to.operation instead";
}

#[derive(Debug)]
pub(crate) struct TargetRefs;

impl RefusalReason for TargetRefs {
    const MESSAGE: &'static str = "targetRef/targetRefs attach policies to gateways and \
        waypoints (L7), which this mesh does not have; select workloads with \
        selector.matchLabels instead";
}

#[derive(Debug)]
pub(crate) struct ExternalProvider;

impl RefusalReason for ExternalProvider {
    const MESSAGE: &'static str = "provider belongs to the CUSTOM action (external \
        authorization), which this mesh does not support";
}

/// A field this mesh refuses whatever its value (even empty or null): absent is the only
/// acceptable state.
pub(crate) struct Refused<R>(PhantomData<R>);

impl<R> Default for Refused<R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<R> fmt::Debug for Refused<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Refused")
    }
}

impl<'de, R: RefusalReason> Deserialize<'de> for Refused<R> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Fail from inside the deserializer, so that the error carries the field's path and line.
        deserializer.deserialize_any(RefusingVisitor::<R>(PhantomData))
    }
}

struct RefusingVisitor<R>(PhantomData<R>);

impl<R: RefusalReason> RefusingVisitor<R> {
    fn refuse<T, E: de::Error>() -> Result<T, E> {
        Err(E::custom(R::MESSAGE))
    }
}

impl<'de, R: RefusalReason> Visitor<'de> for RefusingVisitor<R> {
    type Value = Refused<R>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(R::MESSAGE)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Self::refuse()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Self::refuse()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Self::refuse()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Self::refuse()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Self::refuse()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Self::refuse()
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Self::refuse()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Self::refuse()
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Self::refuse()
    }
}
