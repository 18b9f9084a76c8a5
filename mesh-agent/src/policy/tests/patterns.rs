use super::super::pattern::{Glob, IpBlock, ServiceAccountRef};
use super::ip;

#[test]
fn globs_match_exactly_by_prefix_by_suffix_and_anywhere() {
    let cases = [
        ("web", "web", true),
        ("web", "web2", false),
        ("*", "anything", true),
        ("team-*", "team-a", true),
        ("team-*", "team-", true),
        ("team-*", "teams", false),
        ("*-prod", "web-prod", true),
        ("*-prod", "web-production", false),
        ("a*b*c", "axxbyyc", true),
        ("a*b*c", "acb", false),
        ("ab*ba", "aba", false),
        ("ab*ba", "abba", true),
    ];
    for (pattern, value, expected) in cases {
        assert_eq!(
            Glob::new(pattern).matches(value),
            expected,
            "{pattern:?} against {value:?}"
        );
    }
}

#[test]
fn ip_blocks_match_v4_and_v6_networks_and_single_addresses() {
    let block = |text: &str| text.parse::<IpBlock>().expect(text);
    assert!(block("10.1.0.0/16").contains(ip("10.1.200.3")));
    assert!(!block("10.1.0.0/16").contains(ip("10.2.0.1")));
    assert!(block("10.1.2.3").contains(ip("10.1.2.3")));
    assert!(!block("10.1.2.3").contains(ip("10.1.2.4")));
    assert!(block("0.0.0.0/0").contains(ip("192.0.2.1")));
    assert!(
        block("10.9.9.9/8").contains(ip("10.0.0.1")),
        "host bits are masked"
    );
    assert!(block("fd00:1::/32").contains(ip("fd00:1::2")));
    assert!(!block("fd00:1::/32").contains(ip("fd00:2::2")));
    assert!(block("::/0").contains(ip("2001:db8::1")));
    assert!(
        block("10.1.0.0/16").contains(ip("::ffff:10.1.0.9")),
        "an IPv4-mapped source is its IPv4 address"
    );
    assert!(
        !block("10.0.0.0/8").contains(ip("fd00::1")),
        "no family mixing"
    );
    assert!(!block("::/0").contains(ip("10.0.0.1")), "no family mixing");
}

#[test]
fn ip_blocks_reject_what_is_not_a_network() {
    for text in [
        "10.1.0.0/33",
        "fd00::/129",
        "10.1.0",
        "10.1.0.0/",
        "web",
        "10.0.0.0/-1",
    ] {
        assert!(
            text.parse::<IpBlock>().is_err(),
            "{text:?} should be rejected"
        );
    }
}

#[test]
fn service_accounts_are_namespace_slash_name() {
    let sa: ServiceAccountRef = "tutorial/customer".parse().expect("valid");
    assert_eq!(sa.to_string(), "tutorial/customer");
    for text in ["customer", "tutorial/", "/customer", "a/b/c", "tutorial/*"] {
        assert!(
            text.parse::<ServiceAccountRef>().is_err(),
            "{text:?} should be rejected"
        );
    }
}
