use super::*;

const WEB_IP: &str = "10.2.0.2";

fn web_labels() -> BTreeMap<String, String> {
    labels(&[("app", "web")])
}

/// Authorizes a connection to `web` (namespace tutorial, app=web) on `port`.
fn decide(set: &PolicySet, source: Option<&SpiffeId>, source_ip: &str, port: u16) -> Decision {
    decide_for(set, "tutorial", &web_labels(), source, source_ip, port)
}

fn decide_for(
    set: &PolicySet,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    source: Option<&SpiffeId>,
    source_ip: &str,
    port: u16,
) -> Decision {
    let conn = ConnectionAttrs {
        source,
        source_ip: ip(source_ip),
        destination_port: port,
    };
    set.authorize(&WorkloadRef { namespace, labels }, &conn)
}

/// An ALLOW policy for app=web in tutorial with one rule.
fn allow_web(name: &str, rule: &str) -> String {
    let rule: String = rule.lines().map(|line| format!("  {line}\n")).collect();
    authz_policy(
        "tutorial",
        name,
        &format!("selector:\n  matchLabels:\n    app: web\naction: ALLOW\nrules:\n-\n{rule}"),
    )
}

fn allowed(decision: &Decision) -> bool {
    decision.is_allowed()
}

#[test]
fn without_policies_everything_is_allowed() {
    let set = PolicySet::empty(ROOT);
    assert_eq!(
        decide(&set, None, "10.9.9.9", 8080),
        Decision::Allow { by: None }
    );
}

#[test]
fn principals_allow_exactly_the_named_identity() {
    let set = set(&[allow_web(
        "allow-customer",
        "from:\n- source:\n    principals: [\"cluster.local/ns/tutorial/sa/customer\"]",
    )]);
    let customer = spiffe("tutorial", "customer");
    let other = spiffe("tutorial", "preference");
    assert_eq!(
        decide(&set, Some(&customer), "10.1.0.2", 8080),
        Decision::Allow {
            by: Some("tutorial/allow-customer".to_owned())
        }
    );
    let denied = decide(&set, Some(&other), "10.1.0.2", 8080);
    assert_eq!(
        denied,
        Decision::Deny {
            by: DenyReason::NoAllowMatch(vec!["tutorial/allow-customer".to_owned()])
        }
    );
    assert_eq!(
        denied.to_string(),
        "no ALLOW policy matched (tutorial/allow-customer)"
    );
    assert!(!allowed(&decide(&set, None, "10.1.0.2", 8080)), "plaintext");
}

#[test]
fn principal_wildcards_match_any_prefix_or_suffix_but_never_plaintext() {
    let cases = [
        ("*", spiffe("other", "anyone"), true),
        ("cluster.local/ns/tutorial/*", spiffe("tutorial", "x"), true),
        (
            "cluster.local/ns/tutorial/*",
            spiffe("tutorial2", "x"),
            false,
        ),
        ("*/sa/customer", spiffe("anywhere", "customer"), true),
        ("*/sa/customer", spiffe("anywhere", "customer2"), false),
    ];
    for (pattern, identity, expected) in cases {
        let set = set(&[allow_web(
            "p",
            &format!("from:\n- source:\n    principals: [\"{pattern}\"]"),
        )]);
        assert_eq!(
            allowed(&decide(&set, Some(&identity), "10.1.0.2", 8080)),
            expected,
            "{pattern} against {identity}"
        );
        assert!(
            !allowed(&decide(&set, None, "10.1.0.2", 8080)),
            "plaintext never matches principals {pattern}"
        );
    }
}

#[test]
fn not_principals_match_plaintext_as_in_istio() {
    let set = set(&[allow_web(
        "not-curl",
        "from:\n- source:\n    notPrincipals: [\"cluster.local/ns/tutorial/sa/curl\"]",
    )]);
    assert!(!allowed(&decide(
        &set,
        Some(&spiffe("tutorial", "curl")),
        "10.1.0.2",
        80
    )));
    assert!(allowed(&decide(
        &set,
        Some(&spiffe("tutorial", "customer")),
        "10.1.0.2",
        80
    )));
    assert!(allowed(&decide(&set, None, "10.1.0.2", 80)));
}

#[test]
fn namespaces_and_not_namespaces_with_wildcards() {
    let set = set(&[allow_web(
        "teams",
        "from:\n- source:\n    namespaces: [\"team-*\", tutorial]\n    notNamespaces: [team-blocked]",
    )]);
    let from = |namespace: &str| decide(&set, Some(&spiffe(namespace, "sa")), "10.1.0.2", 80);
    assert!(allowed(&from("tutorial")));
    assert!(allowed(&from("team-a")));
    assert!(!allowed(&from("team-blocked")), "notNamespaces");
    assert!(!allowed(&from("prod")));
    assert!(
        !allowed(&decide(&set, None, "10.1.0.2", 80)),
        "plaintext has no namespace"
    );

    let not_only = self::set(&[allow_web(
        "not-prod",
        "from:\n- source:\n    notNamespaces: [prod]",
    )]);
    assert!(
        allowed(&decide(&not_only, None, "10.1.0.2", 80)),
        "plaintext is not in prod"
    );
    assert!(!allowed(&decide(
        &not_only,
        Some(&spiffe("prod", "sa")),
        "10.1.0.2",
        80
    )));
}

#[test]
fn service_accounts_match_namespace_and_name() {
    let set = set(&[allow_web(
        "sa",
        "from:\n- source:\n    serviceAccounts: [tutorial/customer]\n    notServiceAccounts: [tutorial/curl]",
    )]);
    assert!(allowed(&decide(
        &set,
        Some(&spiffe("tutorial", "customer")),
        "10.1.0.2",
        80
    )));
    assert!(!allowed(&decide(
        &set,
        Some(&spiffe("other", "customer")),
        "10.1.0.2",
        80
    )));
    assert!(!allowed(&decide(&set, None, "10.1.0.2", 80)));
}

#[test]
fn ip_blocks_match_the_source_address_v4_and_v6() {
    let set = set(&[allow_web(
        "nets",
        "from:\n- source:\n    ipBlocks: [\"10.1.0.0/16\", \"192.0.2.7\", \"fd00:1::/32\"]\n    notIpBlocks: [\"10.1.66.0/24\"]",
    )]);
    let from = |source_ip: &str| allowed(&decide(&set, None, source_ip, 80));
    assert!(from("10.1.0.2"));
    assert!(from("192.0.2.7"));
    assert!(!from("192.0.2.8"));
    assert!(from("fd00:1::2"));
    assert!(!from("fd00:2::2"));
    assert!(!from("10.1.66.5"), "notIpBlocks");
    assert!(from("::ffff:10.1.0.2"), "IPv4-mapped sources are IPv4");
}

#[test]
fn ports_and_not_ports_accept_strings_and_numbers() {
    let set = set(&[allow_web(
        "ports",
        "to:\n- operation:\n    ports: [\"8080\", 9090, \"7000\"]\n    notPorts: [\"7000\"]",
    )]);
    assert!(allowed(&decide(&set, None, "10.1.0.2", 8080)));
    assert!(allowed(&decide(&set, None, "10.1.0.2", 9090)));
    assert!(
        !allowed(&decide(&set, None, "10.1.0.2", 7000)),
        "notPorts wins"
    );
    assert!(!allowed(&decide(&set, None, "10.1.0.2", 22)));
}

#[test]
fn from_entries_are_ored_to_entries_are_ored_and_from_and_to_are_anded() {
    let set = set(&[allow_web(
        "combo",
        "from:\n- source:\n    principals: [\"cluster.local/ns/tutorial/sa/customer\"]\n\
         - source:\n    ipBlocks: [\"10.9.0.0/16\"]\n\
         to:\n- operation:\n    ports: [\"8080\"]\n- operation:\n    ports: [\"9090\"]",
    )]);
    let customer = spiffe("tutorial", "customer");
    assert!(allowed(&decide(&set, Some(&customer), "10.1.0.2", 8080)));
    assert!(allowed(&decide(&set, Some(&customer), "10.1.0.2", 9090)));
    assert!(
        allowed(&decide(&set, None, "10.9.1.1", 9090)),
        "second source"
    );
    assert!(
        !allowed(&decide(&set, Some(&customer), "10.1.0.2", 7000)),
        "to must match too"
    );
    assert!(
        !allowed(&decide(&set, None, "10.1.0.2", 8080)),
        "from must match too"
    );
}

#[test]
fn fields_of_one_source_are_anded() {
    let set = set(&[allow_web(
        "both",
        "from:\n- source:\n    namespaces: [tutorial]\n    ipBlocks: [\"10.1.0.0/16\"]",
    )]);
    let customer = spiffe("tutorial", "customer");
    assert!(allowed(&decide(&set, Some(&customer), "10.1.0.2", 80)));
    assert!(!allowed(&decide(&set, Some(&customer), "10.2.0.2", 80)));
    assert!(!allowed(&decide(
        &set,
        Some(&spiffe("prod", "x")),
        "10.1.0.2",
        80
    )));
}

#[test]
fn several_rules_are_ored() {
    let set = set(&[authz_policy(
        "tutorial",
        "two-rules",
        "rules:\n- from:\n  - source:\n      namespaces: [a]\n- to:\n  - operation:\n      ports: [\"9090\"]",
    )]);
    assert!(allowed(&decide(
        &set,
        Some(&spiffe("a", "x")),
        "10.1.0.2",
        80
    )));
    assert!(allowed(&decide(&set, None, "10.1.0.2", 9090)));
    assert!(!allowed(&decide(&set, None, "10.1.0.2", 80)));
}

#[test]
fn deny_wins_over_allow() {
    let set = set(&[
        authz_policy("tutorial", "allow-all", "rules:\n- {}"),
        authz_policy(
            "tutorial",
            "deny-curl",
            "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [curl-ns]",
        ),
    ]);
    let denied = decide(&set, Some(&spiffe("curl-ns", "curl")), "10.1.0.2", 80);
    assert_eq!(
        denied,
        Decision::Deny {
            by: DenyReason::Policy("tutorial/deny-curl".to_owned())
        }
    );
    assert_eq!(
        denied.to_string(),
        "denied by AuthorizationPolicy tutorial/deny-curl"
    );
    let allowed = decide(&set, Some(&spiffe("tutorial", "customer")), "10.1.0.2", 80);
    assert_eq!(
        allowed.to_string(),
        "allowed by AuthorizationPolicy tutorial/allow-all"
    );
}

#[test]
fn a_deny_policy_alone_allows_the_rest() {
    let set = set(&[authz_policy(
        "tutorial",
        "deny-plaintext",
        "action: DENY\nrules:\n- from:\n  - source:\n      notPrincipals: [\"*\"]",
    )]);
    assert!(!allowed(&decide(&set, None, "10.1.0.2", 80)));
    let decision = decide(&set, Some(&spiffe("x", "y")), "10.1.0.2", 80);
    assert_eq!(decision, Decision::Allow { by: None });
    assert_eq!(decision.to_string(), "allowed (no ALLOW policy applies)");
}

#[test]
fn any_allow_policy_denies_what_none_allows_and_lists_them() {
    let set = set(&[
        allow_web("a", "from:\n- source:\n    namespaces: [a]"),
        allow_web("b", "from:\n- source:\n    namespaces: [b]"),
    ]);
    assert!(allowed(&decide(
        &set,
        Some(&spiffe("b", "x")),
        "10.1.0.2",
        80
    )));
    let denied = decide(&set, Some(&spiffe("c", "x")), "10.1.0.2", 80);
    assert_eq!(
        denied.to_string(),
        "no ALLOW policy matched (tutorial/a, tutorial/b)"
    );
    // A workload the selector does not match has no ALLOW policy: allowed.
    let db = decide_for(
        &set,
        "tutorial",
        &labels(&[("app", "db")]),
        None,
        WEB_IP,
        80,
    );
    assert_eq!(db, Decision::Allow { by: None });
}

#[test]
fn an_allow_policy_without_rules_allows_nothing() {
    for spec in [
        "{}",
        "action: ALLOW",
        "rules: []",
        "selector:\n  matchLabels: {app: web}",
    ] {
        let set = set(&[authz_policy("tutorial", "allow-nothing", spec)]);
        let decision = decide(&set, Some(&spiffe("tutorial", "x")), "10.1.0.2", 80);
        assert_eq!(
            decision,
            Decision::Deny {
                by: DenyReason::NoAllowMatch(vec!["tutorial/allow-nothing".to_owned()])
            },
            "{spec}"
        );
    }
}

#[test]
fn an_empty_rule_matches_everything() {
    let set = set(&[authz_policy("tutorial", "allow-all", "rules:\n- {}")]);
    assert!(allowed(&decide(&set, None, "10.1.0.2", 1)));
    let deny_all = self::set(&[authz_policy(
        "tutorial",
        "deny-all",
        "action: DENY\nrules: [{}]",
    )]);
    assert!(!allowed(&decide(
        &deny_all,
        Some(&spiffe("a", "b")),
        "10.1.0.2",
        1
    )));
}

#[test]
fn policies_apply_to_their_namespace_or_from_the_root_namespace_to_all() {
    let set = set(&[
        authz_policy("prod", "prod-nothing", "{}"),
        authz_policy(
            ROOT,
            "mesh-deny-evil",
            "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [evil]",
        ),
        authz_policy(
            ROOT,
            "webs-only-8080",
            "selector:\n  matchLabels: {app: web}\naction: DENY\nrules:\n- to:\n  - operation:\n      notPorts: [\"8080\"]",
        ),
    ]);
    let evil = spiffe("evil", "x");
    let good = spiffe("good", "x");
    assert!(
        !allowed(&decide(&set, Some(&evil), "10.1.0.2", 8080)),
        "root, no selector"
    );
    assert!(
        allowed(&decide(&set, Some(&good), "10.1.0.2", 8080)),
        "prod's policy is prod's"
    );
    assert!(
        !allowed(&decide(&set, Some(&good), "10.1.0.2", 9090)),
        "root selector, any ns"
    );
    let db = labels(&[("app", "db")]);
    assert!(allowed(&decide_for(
        &set,
        "other",
        &db,
        Some(&good),
        WEB_IP,
        9090
    )));
    assert!(!allowed(&decide_for(
        &set,
        "prod",
        &db,
        Some(&good),
        WEB_IP,
        9090
    )));
}

#[test]
fn workload_refs_come_from_cluster_workloads() {
    let workload: crate::workload::Workload = serde_yaml_ng::from_str(
        "name: web\nnamespace: tutorial\nlabels: {app: web}\nips: [10.2.0.2]\nnetns: /n\ncgroup: /c",
    )
    .expect("valid workload");
    let set = set(&[allow_web(
        "nothing-from-x",
        "from:\n- source:\n    namespaces: [x]",
    )]);
    let conn = ConnectionAttrs {
        source: None,
        source_ip: ip("10.1.0.2"),
        destination_port: 80,
    };
    assert!(
        !set.authorize(&WorkloadRef::from(&workload), &conn)
            .is_allowed()
    );
}
