use super::*;

fn problems(text: &str, name: &str) -> Vec<PolicyProblem> {
    match PolicySet::from_yaml(text, Path::new(name), ROOT) {
        Err(PolicyError::Invalid { problems }) => problems,
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(_) => panic!("policy should be rejected:\n{text}"),
    }
}

fn authz_with(rule: &str) -> String {
    let rule: String = rule.lines().map(|line| format!("  {line}\n")).collect();
    authz_policy("tutorial", "p", &format!("rules:\n-\n{rule}"))
}

#[test]
fn a_bad_mode_names_the_file_the_document_the_field_and_the_line() {
    let text = file(&[
        peer_auth(ROOT, "default", "mtls:\n  mode: PERMISSIVE"),
        peer_auth("tutorial", "default", "mtls:\n  mode: STRICTT"),
    ]);
    let err = PolicySet::from_yaml(&text, Path::new("policies/strict.yaml"), ROOT)
        .expect_err("invalid mode")
        .to_string();
    assert_eq!(
        err,
        "policies/strict.yaml: document 2 (PeerAuthentication tutorial/default): \
         spec.mtls.mode: unknown variant \"STRICTT\", expected one of STRICT, PERMISSIVE, \
         DISABLE, UNSET at line 17 column 11"
    );
    let problem = &problems(&text, "policies/strict.yaml")[0];
    assert_eq!(problem.file, Path::new("policies/strict.yaml"));
    assert_eq!(
        problem.document,
        Some(DocumentLabel {
            index: 2,
            kind: Some("PeerAuthentication".to_owned()),
            namespace: Some("tutorial".to_owned()),
            name: Some("default".to_owned()),
        })
    );
    assert_eq!(
        problem.location,
        Some(Location {
            line: 17,
            column: 11
        })
    );
}

#[test]
fn unknown_fields_are_errors_with_their_path() {
    let cases = [
        (
            peer_auth("tutorial", "p", "mtlss: {mode: STRICT}"),
            "spec: unknown field `mtlss`",
        ),
        (
            peer_auth("tutorial", "p", "mtls: {mode: STRICT, port: 1}"),
            "spec.mtls: unknown field `port`",
        ),
        (
            authz_with("from:\n- source:\n    principal: [x]"),
            "spec.rules[0].from[0].source: unknown field `principal`",
        ),
        (
            authz_policy("tutorial", "p", "selector:\n  labels: {app: web}"),
            "spec.selector: unknown field `labels`",
        ),
    ];
    for (text, expected) in cases {
        let err = error(&text);
        assert!(err.contains(expected), "{err}\nshould contain: {expected}");
        assert!(err.contains(" at line "), "{err}");
    }
    let top_level = peer_auth("tutorial", "p", "{}") + "extra: 1\n";
    assert!(error(&top_level).contains("unknown field `extra`"));
    let metadata =
        peer_auth("tutorial", "p", "{}").replace("metadata:\n", "metadata:\n  color: red\n");
    assert!(error(&metadata).contains("metadata: unknown field `color`"));
}

#[test]
fn kubernetes_bookkeeping_is_ignored() {
    let text = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  \
        name: default\n  namespace: tutorial\n  labels: {team: a}\n  annotations: {note: x}\n  \
        resourceVersion: \"123\"\n  uid: 0b7c\n  creationTimestamp: \"2024-05-23T00:22:29Z\"\n  \
        generation: 2\n  managedFields: []\nspec:\n  mtls: {mode: STRICT}\nstatus: {}\n";
    let set = parse(text).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(set.peer_authentication_count(), 1);
}

#[test]
fn unknown_kinds_are_named() {
    let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x, namespace: y}\n";
    let err = error(text);
    assert!(
        err.contains(
            "document 1 (VirtualService y/x): kind: unknown kind \"VirtualService\" \
             (networking.istio.io/v1)"
        ),
        "{err}"
    );
    let seed_policy = "apiVersion: authentication.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: p, namespace: t}\nspec: {}\n";
    assert!(error(seed_policy).contains("write a PeerAuthentication instead"));
    let rule = "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {name: d, namespace: t}\n";
    assert!(error(rule).contains("no DestinationRule is needed"));
    assert!(error("apiVersion: v1\nmetadata: {name: x}\n").contains("kind: missing"));
}

#[test]
fn the_api_version_is_checked() {
    let text =
        peer_auth("tutorial", "p", "{}").replace("security.istio.io/v1", "security.istio.io/v2");
    let err = error(&text);
    assert!(
        err.contains("apiVersion: unsupported apiVersion \"security.istio.io/v2\""),
        "{err}"
    );
    let beta = peer_auth("tutorial", "p", "{}")
        .replace("security.istio.io/v1", "security.istio.io/v1beta1");
    assert!(parse(&beta).is_ok());
}

#[test]
fn metadata_needs_a_valid_name_and_namespace() {
    let without_namespace = peer_auth("tutorial", "p", "{}").replace("  namespace: tutorial\n", "");
    let err = error(&without_namespace);
    assert!(
        err.contains("document 1 (PeerAuthentication p): metadata.namespace: missing: this agent has no default namespace"),
        "{err}"
    );
    let without_name = peer_auth("tutorial", "p", "{}").replace("  name: p\n", "");
    assert!(error(&without_name).contains("metadata.name: missing"));
    let bad_namespace = peer_auth("Tutorial", "p", "{}");
    assert!(
        error(&bad_namespace).contains("metadata.namespace: \"Tutorial\" is not a valid namespace")
    );
}

#[test]
fn l7_fields_are_refused_with_the_reason() {
    let operation_fields = [
        "hosts",
        "notHosts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    ];
    for field in operation_fields {
        let text = authz_with(&format!("to:\n- operation:\n    {field}: [GET]"));
        let err = error(&text);
        assert!(
            err.contains(&format!(
                "spec.rules[0].to[0].operation.{field}: this field needs L7"
            )),
            "{err}"
        );
        assert!(err.contains("enforces policies at L4 only"), "{err}");
    }
    let source_fields = [
        "requestPrincipals",
        "notRequestPrincipals",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
    ];
    for field in source_fields {
        let text = authz_with(&format!("from:\n- source:\n    {field}: [\"*\"]"));
        let err = error(&text);
        assert!(
            err.contains(&format!(
                "spec.rules[0].from[0].source.{field}: this field needs L7"
            )),
            "{err}"
        );
    }
    let when = authz_with("when:\n- key: request.headers[version]\n  values: [v1]");
    assert!(error(&when).contains("spec.rules[0].when: `when` conditions need L7"));
}

#[test]
fn l7_fields_are_refused_even_when_empty() {
    for value in ["[]", "~", ""] {
        let text = authz_with(&format!(
            "to:\n- operation:\n    ports: [\"80\"]\n    methods: {value}"
        ));
        assert!(
            error(&text).contains("operation.methods: this field needs L7"),
            "{value:?}"
        );
    }
}

#[test]
fn audit_custom_and_gateway_attachments_are_refused() {
    let audit = authz_policy("tutorial", "p", "action: AUDIT\nrules: [{}]");
    assert!(error(&audit).contains("spec.action: action AUDIT is not supported"));
    let custom = authz_policy(
        "tutorial",
        "p",
        "action: CUSTOM\nprovider: {name: ext}\nrules: [{}]",
    );
    assert!(error(&custom).contains("spec.action: action CUSTOM is not supported"));
    let typo = authz_policy("tutorial", "p", "action: REJECT");
    assert!(error(&typo).contains("unknown variant \"REJECT\", expected one of ALLOW, DENY"));
    let target = authz_policy("tutorial", "p", "targetRefs:\n- {kind: Gateway, name: g}");
    assert!(error(&target).contains("spec.targetRefs: targetRef/targetRefs attach policies"));
    let provider = authz_policy("tutorial", "p", "provider: {name: ext}");
    assert!(error(&provider).contains("spec.provider: provider belongs to the CUSTOM action"));
}

#[test]
fn bad_values_name_their_field_and_line() {
    let cases = [
        (
            "from:\n- source:\n    ipBlocks: [\"10.0.0.0/33\"]",
            "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\": the prefix length /33",
        ),
        (
            "from:\n- source:\n    notIpBlocks: [somewhere]",
            "source.notIpBlocks[0]: \"somewhere\" is not an IP address or CIDR block",
        ),
        (
            "to:\n- operation:\n    ports: [\"http\"]",
            "operation.ports[0]: \"http\" is not a port number",
        ),
        (
            "to:\n- operation:\n    notPorts: [65536]",
            "operation.notPorts[0]: port 65536 is out of range",
        ),
        (
            "from:\n- source:\n    principals: [\"\"]",
            "source.principals[0]: empty value is not allowed",
        ),
        (
            "from:\n- source:\n    principals: [\"spiffe://cluster.local/ns/a/sa/b\"]",
            "write principals without the spiffe:// scheme",
        ),
        (
            "from:\n- source:\n    principals: [\"cluster.local/*/sa/b\"]",
            "a principal may only have one `*`, at its start or its end",
        ),
        (
            "from:\n- source:\n    serviceAccounts: [customer]",
            "source.serviceAccounts[0]: \"customer\" is not a service account",
        ),
    ];
    for (rule, expected) in cases {
        let err = error(&authz_with(rule));
        assert!(err.contains(expected), "{err}\nshould contain: {expected}");
        assert!(err.contains(" at line "), "{err}");
    }
}

#[test]
fn istio_structural_rules_are_enforced() {
    let cases = [
        (
            authz_with("from: []"),
            "spec.rules[0].from: must not be empty",
        ),
        (authz_with("to: []"), "spec.rules[0].to: must not be empty"),
        (
            authz_with("from:\n- {}"),
            "spec.rules[0].from[0].source: missing",
        ),
        (
            authz_with("from:\n- source: {}"),
            "spec.rules[0].from[0].source: must set at least one of",
        ),
        (
            authz_with("to:\n- operation: {}"),
            "spec.rules[0].to[0].operation: must set ports or notPorts",
        ),
        (
            authz_with("from:\n- source:\n    namespaces: [a]\n    serviceAccounts: [a/b]"),
            "serviceAccounts and notServiceAccounts cannot be combined with principals or namespaces",
        ),
        (
            authz_policy("tutorial", "deny", "action: DENY"),
            "spec.rules: a DENY policy without rules never matches",
        ),
        (
            authz_policy("tutorial", "deny", "action: DENY\nrules: []"),
            "spec.rules: a DENY policy without rules never matches",
        ),
        (
            authz_policy("tutorial", "p", "selector:\n  matchLabels: {app: \"web*\"}"),
            "wildcards are not supported in selectors",
        ),
    ];
    for (text, expected) in cases {
        let err = error(&text);
        assert!(err.contains(expected), "{err}\nshould contain: {expected}");
    }
}

#[test]
fn yaml_syntax_errors_name_the_document_and_line() {
    let text = format!("{}---\nkind: [\n", peer_auth("tutorial", "p", "{}"));
    let problem = &problems(&text, "broken.yaml")[0];
    assert_eq!(problem.document.as_ref().map(|d| d.index), Some(2));
    assert!(problem.location.is_some(), "{problem}");
    assert!(
        problem.to_string().starts_with("broken.yaml: document 2: "),
        "{problem}"
    );
}

#[test]
fn a_document_must_be_a_mapping() {
    let err = error("- just\n- a list\n");
    assert!(err.starts_with("policy.yaml: document 1: "), "{err}");
}

#[test]
fn the_same_policy_twice_is_an_error() {
    let text = file(&[
        peer_auth("tutorial", "default", "mtls: {mode: STRICT}"),
        authz_policy("tutorial", "default", "{}"),
        peer_auth("tutorial", "default", "mtls: {mode: DISABLE}"),
    ]);
    let err = error(&text);
    assert!(
        err.contains(
            "document 3 (PeerAuthentication tutorial/default): metadata.name: \
             PeerAuthentication tutorial/default is defined twice; the first is in policy.yaml, \
             document 1"
        ),
        "{err}"
    );
}

#[test]
fn a_missing_path_is_a_read_error() {
    let err = PolicySet::load(Path::new("/nonexistent/policies"), ROOT).expect_err("missing");
    match &err {
        PolicyError::Read { path, source } => {
            assert_eq!(path, Path::new("/nonexistent/policies"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Read, got {other}"),
    }
    assert!(
        err.to_string()
            .starts_with("cannot read policy /nonexistent/policies: ")
    );
}
