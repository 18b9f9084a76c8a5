use std::fs;

use super::*;

fn web() -> BTreeMap<String, String> {
    labels(&[("app", "web")])
}

fn mode_in(set: &PolicySet, namespace: &str) -> MtlsMode {
    set.mtls_mode(
        &WorkloadRef {
            namespace,
            labels: &web(),
        },
        8080,
    )
}

#[test]
fn multi_document_files_skip_empty_documents_but_count_them() {
    // A comment before the first `---` is not a document; the one between two `---` is.
    let text = format!(
        "# policies for the tutorial\n---\n{}---\n# nothing here\n---\n{}---\n",
        peer_auth("tutorial", "strict", "mtls: {mode: STRICT}"),
        authz_policy("tutorial", "allow-all", "rules: [{}]"),
    );
    let set = parse(&text).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(set.peer_authentication_count(), 1);
    assert_eq!(set.authorization_policy_count(), 1);

    let broken = text.replace("rules: [{}]", "rules: [{}]\n  bogus: 1");
    let err = error(&broken);
    assert!(
        err.contains("document 3 (AuthorizationPolicy tutorial/allow-all)"),
        "{err}"
    );
}

#[test]
fn empty_files_and_directories_are_empty_sets() {
    assert_eq!(parse("").expect("empty").peer_authentication_count(), 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let set = PolicySet::load(dir.path(), ROOT).expect("empty directory");
    assert_eq!(
        set.peer_authentication_count() + set.authorization_policy_count(),
        0
    );
    assert!(set.files().is_empty());
}

#[test]
fn a_directory_is_its_yaml_files_sorted_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write");
    write(
        "b.yml",
        &peer_auth("tutorial", "second", "mtls: {mode: DISABLE}"),
    );
    write(
        "a.yaml",
        &peer_auth("tutorial", "first", "mtls: {mode: STRICT}"),
    );
    write(
        "c.yaml",
        &authz_policy("tutorial", "allow-all", "rules: [{}]"),
    );
    write("notes.txt", "not yaml: [");
    write(".hidden.yaml", "not yaml: [");
    fs::create_dir(dir.path().join("sub.yaml")).expect("mkdir");
    fs::write(dir.path().join("sub.yaml/x.yaml"), "not yaml: [").expect("write");

    let set = PolicySet::load(dir.path(), ROOT).unwrap_or_else(|err| panic!("{err}"));
    let names: Vec<_> = set
        .files()
        .iter()
        .filter_map(|f| f.file_name()?.to_str().map(str::to_owned))
        .collect();
    assert_eq!(names, ["a.yaml", "b.yml", "c.yaml"]);
    assert_eq!(
        mode_in(&set, "tutorial"),
        MtlsMode::Strict,
        "a.yaml comes first"
    );
    assert_eq!(set.warnings().len(), 1, "{:?}", set.warnings());
}

#[test]
fn one_bad_file_rejects_the_whole_directory_and_every_bad_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write");
    write(
        "good.yaml",
        &peer_auth(ROOT, "default", "mtls: {mode: STRICT}"),
    );
    write(
        "bad1.yaml",
        &peer_auth("tutorial", "x", "mtls: {mode: STRIKT}"),
    );
    write("bad2.yaml", &authz_policy("tutorial", "y", "action: AUDIT"));
    let err = PolicySet::load(dir.path(), ROOT).expect_err("bad files");
    let PolicyError::Invalid { problems } = &err else {
        panic!("expected Invalid, got {err}");
    };
    let files: Vec<_> = problems.iter().map(|p| p.file.clone()).collect();
    assert_eq!(
        files,
        [dir.path().join("bad1.yaml"), dir.path().join("bad2.yaml")]
    );
    let text = err.to_string();
    assert!(text.contains("bad1.yaml: document 1 (PeerAuthentication tutorial/x): spec.mtls.mode"));
    assert!(text.contains("bad2.yaml: document 1 (AuthorizationPolicy tutorial/y): spec.action"));
}

#[test]
fn duplicates_across_files_name_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = authz_policy("tutorial", "same", "{}");
    fs::write(dir.path().join("a.yaml"), &policy).expect("write");
    fs::write(dir.path().join("b.yaml"), &policy).expect("write");
    let err = PolicySet::load(dir.path(), ROOT)
        .expect_err("duplicate")
        .to_string();
    assert!(err.contains("b.yaml: document 1"), "{err}");
    assert!(err.contains("a.yaml, document 1"), "{err}");
}

#[test]
fn a_single_file_is_read_whatever_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.conf");
    fs::write(&path, peer_auth(ROOT, "default", "mtls: {mode: STRICT}")).expect("write");
    let set = PolicySet::load(&path, ROOT).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(mode_in(&set, "anywhere"), MtlsMode::Strict);
    assert_eq!(set.files(), [path]);
}

#[test]
fn symbolic_links_are_followed_as_in_configmap_volumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("..2024_01_01");
    fs::create_dir(&data).expect("mkdir");
    fs::write(
        data.join("mesh.yaml"),
        peer_auth(ROOT, "default", "mtls: {mode: STRICT}"),
    )
    .expect("write");
    std::os::unix::fs::symlink("..2024_01_01", dir.path().join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/mesh.yaml", dir.path().join("mesh.yaml")).expect("symlink");
    let set = PolicySet::load(dir.path(), ROOT).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(set.files().len(), 1);
    assert_eq!(mode_in(&set, "tutorial"), MtlsMode::Strict);
}
