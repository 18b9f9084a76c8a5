use std::fs;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;

const POLL: Duration = Duration::from_millis(20);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

fn mesh_mode(set: &PolicySet) -> MtlsMode {
    let labels = BTreeMap::new();
    set.mtls_mode(
        &WorkloadRef {
            namespace: "tutorial",
            labels: &labels,
        },
        8080,
    )
}

fn mesh_policy(mode: &str) -> String {
    peer_auth(ROOT, "default", &format!("mtls: {{mode: {mode}}}"))
}

async fn next_set(receiver: &mut watch::Receiver<Arc<PolicySet>>) -> Arc<PolicySet> {
    tokio::time::timeout(CHANGE_TIMEOUT, receiver.changed())
        .await
        .expect("a new policy set in time")
        .expect("the watcher is running");
    receiver.borrow_and_update().clone()
}

/// Long enough for many polls: a change the watcher would publish would be published by then.
async fn several_polls() {
    tokio::time::sleep(POLL * 15).await;
}

#[tokio::test]
async fn a_bad_change_keeps_the_last_good_set_and_a_fix_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    fs::write(&path, mesh_policy("STRICT")).expect("write");
    let shutdown = CancellationToken::new();
    let mut receiver =
        PolicyWatcher::spawn(dir.path(), ROOT, POLL, shutdown.clone()).expect("good at start");
    let first = receiver.borrow_and_update().clone();
    assert_eq!(mesh_mode(&first), MtlsMode::Strict);

    fs::write(&path, mesh_policy("STRICTT")).expect("write");
    several_polls().await;
    assert!(
        !receiver.has_changed().expect("running"),
        "a bad set is not published"
    );
    assert!(Arc::ptr_eq(&first, &receiver.borrow()));

    fs::write(&path, mesh_policy("PERMISSIVE")).expect("write");
    let fixed = next_set(&mut receiver).await;
    assert_eq!(mesh_mode(&fixed), MtlsMode::Permissive);

    let more_policy = peer_auth("tutorial", "more", "mtls: {mode: DISABLE}");
    fs::write(dir.path().join("more.yml"), more_policy).expect("write");
    let more = next_set(&mut receiver).await;
    assert_eq!(more.files().len(), 2, "a new file in the directory is seen");
    assert_eq!(mesh_mode(&more), MtlsMode::Disable);
    shutdown.cancel();
}

#[tokio::test]
async fn a_vanished_file_keeps_the_last_good_set_until_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.yaml");
    fs::write(&path, mesh_policy("STRICT")).expect("write");
    let shutdown = CancellationToken::new();
    let mut receiver =
        PolicyWatcher::spawn(&path, ROOT, POLL, shutdown.clone()).expect("good at start");

    fs::remove_file(&path).expect("remove");
    several_polls().await;
    assert!(!receiver.has_changed().expect("running"));
    assert_eq!(mesh_mode(&receiver.borrow()), MtlsMode::Strict);

    fs::write(&path, mesh_policy("DISABLE")).expect("write");
    let back = next_set(&mut receiver).await;
    assert_eq!(mesh_mode(&back), MtlsMode::Disable);
    shutdown.cancel();
}

#[tokio::test]
async fn a_bad_policy_at_start_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("bad.yaml"), mesh_policy("SOMETIMES")).expect("write");
    let err = PolicyWatcher::spawn(dir.path(), ROOT, POLL, CancellationToken::new())
        .expect_err("bad at start");
    assert!(err.to_string().contains("bad.yaml: document 1"), "{err}");
    let missing = PolicyWatcher::spawn(
        dir.path().join("nope"),
        ROOT,
        POLL,
        CancellationToken::new(),
    );
    assert!(matches!(missing, Err(PolicyError::Read { .. })));
}

#[tokio::test]
async fn the_watcher_stops_on_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let mut receiver =
        PolicyWatcher::spawn(dir.path(), ROOT, POLL, shutdown.clone()).expect("empty is good");
    assert_eq!(receiver.borrow().peer_authentication_count(), 0);
    shutdown.cancel();
    let closed = tokio::time::timeout(CHANGE_TIMEOUT, receiver.changed()).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "the sender is dropped when the task ends"
    );
}
