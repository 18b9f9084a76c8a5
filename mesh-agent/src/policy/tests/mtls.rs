use super::*;

const PORT: u16 = 8080;

fn web_labels() -> BTreeMap<String, String> {
    labels(&[("app", "web"), ("version", "v1")])
}

fn resolve(
    set: &PolicySet,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> MtlsResolution {
    set.resolve_mtls(&WorkloadRef { namespace, labels }, port)
}

fn mode(
    set: &PolicySet,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> MtlsMode {
    set.mtls_mode(&WorkloadRef { namespace, labels }, port)
}

fn mesh(mode: &str) -> String {
    peer_auth(ROOT, "default", &format!("mtls:\n  mode: {mode}"))
}

fn namespace_wide(namespace: &str, mode: &str) -> String {
    peer_auth(namespace, "default", &format!("mtls:\n  mode: {mode}"))
}

fn for_web(namespace: &str, name: &str, rest: &str) -> String {
    peer_auth(
        namespace,
        name,
        &format!("selector:\n  matchLabels:\n    app: web\n{rest}"),
    )
}

#[test]
fn without_any_policy_every_port_is_permissive() {
    let set = PolicySet::empty(ROOT);
    let resolution = resolve(&set, "tutorial", &web_labels(), PORT);
    assert_eq!(resolution.mode, MtlsMode::Permissive);
    assert_eq!(resolution.scope, MtlsScope::Default);
    assert_eq!(resolution.policy, None);
}

#[test]
fn a_mesh_wide_policy_applies_to_every_namespace() {
    let set = set(&[mesh("STRICT")]);
    for namespace in ["tutorial", "other", ROOT] {
        let resolution = resolve(&set, namespace, &web_labels(), PORT);
        assert_eq!(resolution.mode, MtlsMode::Strict, "{namespace}");
        assert_eq!(resolution.scope, MtlsScope::Mesh);
        assert_eq!(resolution.policy.as_deref(), Some("istio-system/default"));
    }
}

#[test]
fn a_policy_without_selector_outside_the_root_namespace_covers_its_namespace_only() {
    let set = set(&[namespace_wide("tutorial", "STRICT")]);
    assert_eq!(
        mode(&set, "tutorial", &web_labels(), PORT),
        MtlsMode::Strict
    );
    assert_eq!(
        mode(&set, "other", &web_labels(), PORT),
        MtlsMode::Permissive
    );
}

#[test]
fn the_root_namespace_is_configurable() {
    let text = file(&[peer_auth("mesh-root", "default", "mtls: {mode: STRICT}")]);
    let set = PolicySet::from_yaml(&text, Path::new("p.yaml"), "mesh-root").expect("valid");
    assert_eq!(set.root_namespace(), "mesh-root");
    assert_eq!(
        mode(&set, "tutorial", &web_labels(), PORT),
        MtlsMode::Strict
    );
    let default_root = PolicySet::from_yaml(&text, Path::new("p.yaml"), ROOT).expect("valid");
    assert_eq!(
        mode(&default_root, "tutorial", &web_labels(), PORT),
        MtlsMode::Permissive
    );
}

#[test]
fn namespace_beats_mesh_and_workload_beats_namespace() {
    let set = set(&[
        mesh("STRICT"),
        namespace_wide("tutorial", "PERMISSIVE"),
        for_web("tutorial", "web-strict", "mtls:\n  mode: STRICT"),
    ]);
    let web = resolve(&set, "tutorial", &web_labels(), PORT);
    assert_eq!(web.mode, MtlsMode::Strict);
    assert_eq!(web.scope, MtlsScope::Workload);
    assert_eq!(web.policy.as_deref(), Some("tutorial/web-strict"));

    let other = resolve(&set, "tutorial", &labels(&[("app", "db")]), PORT);
    assert_eq!(other.mode, MtlsMode::Permissive);
    assert_eq!(other.scope, MtlsScope::Namespace);

    let elsewhere = resolve(&set, "prod", &web_labels(), PORT);
    assert_eq!(
        elsewhere.mode,
        MtlsMode::Strict,
        "the selector is for tutorial only"
    );
    assert_eq!(elsewhere.scope, MtlsScope::Mesh);
}

#[test]
fn a_selector_must_match_every_label() {
    let set = set(&[peer_auth(
        "tutorial",
        "v2-only",
        "selector:\n  matchLabels: {app: web, version: v2}\nmtls: {mode: STRICT}",
    )]);
    assert_eq!(
        mode(&set, "tutorial", &web_labels(), PORT),
        MtlsMode::Permissive
    );
    let v2 = labels(&[("app", "web"), ("version", "v2"), ("extra", "x")]);
    assert_eq!(mode(&set, "tutorial", &v2, PORT), MtlsMode::Strict);
}

#[test]
fn unset_inherits_from_the_next_broader_level() {
    let set = set(&[
        mesh("STRICT"),
        namespace_wide("tutorial", "UNSET"),
        for_web("tutorial", "web", "mtls:\n  mode: UNSET"),
    ]);
    let web = resolve(&set, "tutorial", &web_labels(), PORT);
    assert_eq!(web.mode, MtlsMode::Strict);
    assert_eq!(web.scope, MtlsScope::Mesh);

    let without_mtls = set_of_workload_without_mode();
    assert_eq!(
        mode(&without_mtls, "tutorial", &web_labels(), PORT),
        MtlsMode::Disable
    );
}

/// A namespace DISABLE, and a workload policy with no `mtls` at all (UNSET).
fn set_of_workload_without_mode() -> PolicySet {
    set(&[
        namespace_wide("tutorial", "DISABLE"),
        for_web("tutorial", "web", ""),
    ])
}

#[test]
fn unset_everywhere_is_permissive() {
    let set = set(&[mesh("UNSET"), peer_auth("tutorial", "empty", "{}")]);
    let resolution = resolve(&set, "tutorial", &web_labels(), PORT);
    assert_eq!(resolution.mode, MtlsMode::Permissive);
    assert_eq!(resolution.scope, MtlsScope::Default);
}

#[test]
fn disable_is_a_mode_of_its_own() {
    let set = set(&[namespace_wide("legacy", "DISABLE")]);
    let mode = mode(&set, "legacy", &web_labels(), PORT);
    assert_eq!(mode, MtlsMode::Disable);
    assert!(mode.accepts_plaintext());
    assert!(!MtlsMode::Strict.accepts_plaintext());
    assert_eq!(MtlsMode::Strict.to_string(), "STRICT");
}

#[test]
fn port_level_mtls_overrides_the_workload_mode_for_its_port() {
    let set = set(&[for_web(
        "tutorial",
        "web",
        "mtls:\n  mode: STRICT\nportLevelMtls:\n  8080:\n    mode: PERMISSIVE\n  \"9000\":\n    mode: DISABLE",
    )]);
    let on_8080 = resolve(&set, "tutorial", &web_labels(), 8080);
    assert_eq!(on_8080.mode, MtlsMode::Permissive);
    assert_eq!(on_8080.scope, MtlsScope::Port);
    assert_eq!(
        mode(&set, "tutorial", &web_labels(), 9000),
        MtlsMode::Disable
    );
    assert_eq!(
        mode(&set, "tutorial", &web_labels(), 9090),
        MtlsMode::Strict
    );
}

#[test]
fn an_unset_port_inherits_the_workload_mode_and_beyond() {
    let set = set(&[
        namespace_wide("tutorial", "STRICT"),
        for_web(
            "tutorial",
            "web",
            "portLevelMtls:\n  8080: {mode: UNSET}\n  9090: {mode: PERMISSIVE}",
        ),
    ]);
    let on_8080 = resolve(&set, "tutorial", &web_labels(), 8080);
    assert_eq!(on_8080.mode, MtlsMode::Strict);
    assert_eq!(on_8080.scope, MtlsScope::Namespace);
    assert_eq!(
        mode(&set, "tutorial", &web_labels(), 9090),
        MtlsMode::Permissive
    );
}

#[test]
fn port_level_mtls_needs_a_selector() {
    for selector in ["", "selector: {}\n", "selector:\n  matchLabels: {}\n"] {
        let text = namespace_wide_with_ports(selector);
        let err = error(&text);
        assert!(
            err.contains("spec.portLevelMtls: port-level mTLS needs a workload selector"),
            "{err}"
        );
    }
}

fn namespace_wide_with_ports(selector: &str) -> String {
    peer_auth(
        "tutorial",
        "ports",
        &format!("{selector}mtls: {{mode: STRICT}}\nportLevelMtls:\n  8080: {{mode: PERMISSIVE}}"),
    )
}

#[test]
fn port_level_mtls_ports_are_checked() {
    let cases = [
        ("0", "port 0 is out of range"),
        ("70000", "port 70000 is out of range"),
        ("\"http\"", "\"http\" is not a port number"),
    ];
    for (port, expected) in cases {
        let text = for_web(
            "tutorial",
            "web",
            &format!("portLevelMtls:\n  {port}: {{mode: STRICT}}"),
        );
        let err = error(&text);
        assert!(
            err.contains("spec.portLevelMtls") && err.contains(expected),
            "{err}"
        );
    }
    let duplicate = for_web(
        "tutorial",
        "web",
        "portLevelMtls:\n  8080: {mode: STRICT}\n  \"8080\": {mode: DISABLE}",
    );
    assert!(error(&duplicate).contains("duplicate key 8080"));
    let empty = for_web("tutorial", "web", "portLevelMtls: {}");
    assert!(error(&empty).contains("spec.portLevelMtls: must list at least one port"));
}

#[test]
fn competing_namespace_wide_policies_use_the_first_and_say_so() {
    let set = set(&[
        peer_auth("tutorial", "first", "mtls: {mode: STRICT}"),
        peer_auth("tutorial", "second", "mtls: {mode: DISABLE}"),
        peer_auth(ROOT, "mesh-a", "mtls: {mode: PERMISSIVE}"),
        peer_auth(ROOT, "mesh-b", "mtls: {mode: STRICT}"),
    ]);
    let resolution = resolve(&set, "tutorial", &web_labels(), PORT);
    assert_eq!(resolution.mode, MtlsMode::Strict);
    assert_eq!(resolution.policy.as_deref(), Some("tutorial/first"));
    assert_eq!(
        mode(&set, "other", &web_labels(), PORT),
        MtlsMode::Permissive
    );
    let warnings = set.warnings().join("\n");
    assert_eq!(set.warnings().len(), 2, "{warnings}");
    assert!(
        warnings.contains(
            "namespace-wide PeerAuthentications of tutorial compete: tutorial/first, \
             tutorial/second; using tutorial/first"
        ),
        "{warnings}"
    );
    assert!(warnings.contains("mesh-wide"), "{warnings}");
}

#[test]
fn competing_workload_policies_use_the_first_and_report_the_conflict() {
    let set = set(&[
        for_web("tutorial", "web-strict", "mtls: {mode: STRICT}"),
        peer_auth(
            "tutorial",
            "v1-disable",
            "selector:\n  matchLabels: {version: v1}\nmtls: {mode: DISABLE}",
        ),
    ]);
    let resolution = resolve(&set, "tutorial", &web_labels(), PORT);
    assert_eq!(resolution.mode, MtlsMode::Strict);
    assert_eq!(resolution.policy.as_deref(), Some("tutorial/web-strict"));
    assert_eq!(resolution.conflicts.len(), 1);
    assert!(resolution.conflicts[0].contains("tutorial/web-strict, tutorial/v1-disable"));
    assert!(
        set.warnings().is_empty(),
        "depends on the workload: not a load warning"
    );

    let only_v1 = resolve(&set, "tutorial", &labels(&[("version", "v1")]), PORT);
    assert_eq!(only_v1.mode, MtlsMode::Disable);
    assert!(only_v1.conflicts.is_empty());
}

#[test]
fn a_root_namespace_policy_with_selector_selects_in_every_namespace() {
    let set = set(&[
        namespace_wide("tutorial", "PERMISSIVE"),
        for_web(ROOT, "all-webs", "mtls: {mode: STRICT}"),
    ]);
    let resolution = resolve(&set, "tutorial", &web_labels(), PORT);
    assert_eq!(resolution.mode, MtlsMode::Strict);
    assert_eq!(resolution.scope, MtlsScope::Workload);
    assert_eq!(
        mode(&set, "tutorial", &labels(&[("app", "db")]), PORT),
        MtlsMode::Permissive
    );
}
