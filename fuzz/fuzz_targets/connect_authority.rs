//! The destination of an inbound HBONE `CONNECT`: `connect_destination`, which the inbound
//! listener runs on every stream a peer opens, on the request as h2 hands it over (the
//! `:authority` made into a `Uri` with `Authority::from_maybe_shared`, as h2's server does).
//!
//! Checked against an oracle written here from RFC 3986 and RFC 9113, not from the code: only
//! the method `CONNECT` (case-sensitive), and an authority that is exactly `IPv4address:port` or
//! `[IPv6address]:port` (no user info, no host name, no zone ID, a port of 1 or more digits up to
//! 65535), gives a destination, and it must be the address written.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use http::uri::{Authority, Parts};
use http::{Method, Request, Uri};
use libfuzzer_sys::{Corpus, fuzz_target};
use mesh_agent::proxy::inbound::connect_destination;

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((&selector, rest)) = data.split_first() else {
        return Corpus::Reject;
    };
    // The method: mostly CONNECT, or GET, or one spelt by the input (up to the first space).
    let (method, authority) = match selector % 4 {
        0 | 1 => (b"CONNECT".as_slice(), rest),
        2 => (b"GET".as_slice(), rest),
        _ => match rest.iter().position(|&b| b == b' ') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => return Corpus::Reject,
        },
    };
    let Ok(method) = Method::from_bytes(method) else {
        return Corpus::Reject; // h2 refuses the stream before the agent sees it
    };
    let Ok(parsed) = Authority::from_maybe_shared(Bytes::copy_from_slice(authority)) else {
        return Corpus::Reject; // likewise
    };
    let mut parts = Parts::default();
    parts.authority = Some(parsed);
    let uri = Uri::from_parts(parts).expect("an authority alone is a URI");
    let request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(())
        .expect("a valid request");

    let got = connect_destination(&request);
    let want = oracle(method.as_str(), authority);
    match (&got, &want) {
        (Ok(got), Ok(want)) => assert_eq!(
            got,
            want,
            "{method} {:?}",
            String::from_utf8_lossy(authority)
        ),
        (Err(got), Err(want)) => assert_eq!(
            got.kind(),
            *want,
            "{method} {:?}: {got}",
            String::from_utf8_lossy(authority)
        ),
        _ => panic!(
            "{method} {:?}: the agent says {got:?}, the RFCs say {want:?}",
            String::from_utf8_lossy(authority)
        ),
    }
    Corpus::Keep
});

/// What RFC 9113 (§8.5: CONNECT, whose `:authority` is the host and port to connect to) and
/// RFC 3986 (§3.2: the authority's grammar) allow, restricted to what HBONE can use: an IP
/// literal (a name is never resolved) and a port. The error is the rejection's kind.
fn oracle(method: &str, authority: &[u8]) -> Result<SocketAddr, &'static str> {
    if method != "CONNECT" {
        return Err("not_connect");
    }
    let bad = Err("bad_authority");
    let Some(colon) = authority.iter().rposition(|&b| b == b':') else {
        return bad;
    };
    let (host, port) = (&authority[..colon], &authority[colon + 1..]);
    let Some(port) = port_number(port) else {
        return bad;
    };
    let ip = match host {
        [b'[', inner @ .., b']'] => match ipv6(inner) {
            Some(ip) => IpAddr::V6(ip),
            None => return bad,
        },
        _ => match ipv4(host) {
            Some(ip) => IpAddr::V4(ip),
            None => return bad,
        },
    };
    Ok(SocketAddr::new(ip, port))
}

/// `port = *DIGIT`, at least one (an empty port names no port), read in decimal.
fn port_number(text: &[u8]) -> Option<u16> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut value: u32 = 0;
    for &digit in text {
        value = value * 10 + u32::from(digit - b'0');
        if value > u32::from(u16::MAX) {
            return None;
        }
    }
    u16::try_from(value).ok()
}

/// `IPv4address = dec-octet "." dec-octet "." dec-octet "." dec-octet`, where a dec-octet is
/// 0-255 without leading zeros.
fn ipv4(text: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for octet in &mut octets {
        *octet = dec_octet(parts.next()?)?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

fn dec_octet(text: &[u8]) -> Option<u8> {
    let valid = matches!(text.len(), 1..=3)
        && text.iter().all(u8::is_ascii_digit)
        && (text.len() == 1 || text[0] != b'0');
    if !valid {
        return None;
    }
    let value = text
        .iter()
        .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'));
    u8::try_from(value).ok()
}

/// RFC 3986's `IPv6address`: eight `h16` groups (1-4 hex digits), the last two of which may be
/// an `IPv4address`, with at most one `::` standing for one or more zero groups.
fn ipv6(text: &[u8]) -> Option<Ipv6Addr> {
    let (head, tail) = match find(text, b"::") {
        Some(at) => {
            let tail = &text[at + 2..];
            if find(tail, b"::").is_some() {
                return None;
            }
            (&text[..at], Some(tail))
        }
        None => (text, None),
    };
    let head = groups(head, tail.is_none())?;
    let mut words = [0u16; 8];
    match tail {
        None => {
            if head.len() != 8 {
                return None;
            }
            words.copy_from_slice(&head);
        }
        Some(tail) => {
            let tail = groups(tail, true)?;
            // `::` stands for at least one group.
            if head.len() + tail.len() > 7 {
                return None;
            }
            words[..head.len()].copy_from_slice(&head);
            words[8 - tail.len()..].copy_from_slice(&tail);
        }
    }
    Some(Ipv6Addr::from(words))
}

/// Colon-separated groups (empty text: none); an IPv4 address may end them when `may_end_v4`.
fn groups(text: &[u8], may_end_v4: bool) -> Option<Vec<u16>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    let pieces: Vec<&[u8]> = text.split(|&b| b == b':').collect();
    let mut words = Vec::with_capacity(8);
    for (i, piece) in pieces.iter().enumerate() {
        let last = i == pieces.len() - 1;
        if last && may_end_v4 && piece.contains(&b'.') {
            let v4 = ipv4(piece)?.octets();
            words.push(u16::from_be_bytes([v4[0], v4[1]]));
            words.push(u16::from_be_bytes([v4[2], v4[3]]));
        } else {
            words.push(h16(piece)?);
        }
        if words.len() > 8 {
            return None;
        }
    }
    Some(words)
}

fn h16(text: &[u8]) -> Option<u16> {
    if !matches!(text.len(), 1..=4) || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?;
    u16::from_str_radix(text, 16).ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
