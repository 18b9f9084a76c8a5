//! The values policies match connections against: identity patterns with `*` wildcards, service
//! accounts, and IP blocks.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A string pattern in which `*` stands for any run of characters (including none).
///
/// Istio writes principals as `*`, `prefix*` or `*suffix` and namespaces with `*` anywhere; which
/// shapes are accepted is checked where the values are read (`schema.rs`), so one matcher serves
/// both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob(String);

impl Glob {
    pub(crate) fn new(pattern: impl Into<String>) -> Self {
        Self(pattern.into())
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        glob_matches(&self.0, value)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Matches `value` against `pattern`: the text before the first `*` is a prefix, the text after
/// the last `*` a suffix, and the pieces in between must appear in order, without overlapping.
fn glob_matches(pattern: &str, value: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = value.strip_prefix(first) else {
        return false;
    };
    let mut pieces: Vec<&str> = pieces.collect();
    let Some(last) = pieces.pop() else {
        // No `*` at all: an exact match.
        return rest.is_empty();
    };
    for middle in pieces {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// `namespace/name` of a Kubernetes service account, as Istio's `source.serviceAccounts` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceAccountRef {
    pub(crate) namespace: String,
    pub(crate) name: String,
}

impl FromStr for ServiceAccountRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let shape_error = || {
            format!("{text:?} is not a service account: write it as <namespace>/<service-account>")
        };
        if text.contains('*') {
            return Err(format!(
                "{text:?}: wildcards are not supported in serviceAccounts; use principals or \
                 namespaces for patterns"
            ));
        }
        let (namespace, name) = text.split_once('/').ok_or_else(shape_error)?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(shape_error());
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `fd00::/8`) or a single address (`10.1.2.3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpBlock {
    network: IpAddr,
    prefix_len: u8,
}

impl IpBlock {
    /// Whether `ip` is in this block. An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, as a dual-stack
    /// socket reports IPv4 peers) is compared as the IPv4 address it is.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len));
                let mask = mask.unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len));
                let mask = mask.unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpBlock {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let not_a_block = || {
            format!(
                "{text:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8, fd00::/8, 10.1.2.3)"
            )
        };
        let Some((address, prefix)) = text.split_once('/') else {
            let address = text.parse::<IpAddr>().map_err(|_| not_a_block())?;
            let address = address.to_canonical();
            return Ok(Self {
                network: address,
                prefix_len: max_prefix_len(address),
            });
        };
        let address = address.parse::<IpAddr>().map_err(|_| not_a_block())?;
        let prefix_len = prefix.parse::<u8>().map_err(|_| not_a_block())?;
        if prefix_len > max_prefix_len(address) {
            return Err(format!(
                "{text:?}: the prefix length /{prefix_len} is longer than the address (at most /{})",
                max_prefix_len(address)
            ));
        }
        Ok(Self {
            network: address,
            prefix_len,
        })
    }
}

fn max_prefix_len(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}
