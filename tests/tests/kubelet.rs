//! mesh-kubelet against a real control plane: its Node is registered and kept by its Lease;
//! pods scheduled to it run with kubelet's cgroup layout (both drivers), an address from the
//! CNI plugins and a Ready status their readiness probe earned; their Services work through
//! the node's kube-proxy rules and hosts file; a kubelet crash leaves the pods to the next
//! kubelet; a failed CNI ADD is retried until it works; containers follow their restart
//! policy; a deleted pod, and every pod of a kubelet stopped with `--cleanup-on-exit`,
//! leaves nothing behind.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Node, Pod};
use kube::Api;
use mesh_tests::kube::{CgroupDriver, KubeCluster};
use mesh_tests::kubelet::{KubeletProcess, PodState, write_node_conflist};
use mesh_tests::sys;
use serde_json::json;

const NS: &str = "kubelet-test";
const POLL: Duration = Duration::from_millis(100);
const POD_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn pods_run_serve_their_service_survive_a_kubelet_crash_and_go_cleanly() -> Result<()> {
    let kc = KubeCluster::builder()
        .node("node-a", CgroupDriver::Systemd)
        .node("node-b", CgroupDriver::Cgroupfs)
        .build()?;
    let mut kubelet_a = KubeletProcess::start(&kc, "node-a", &[])?;
    let mut kubelet_b = KubeletProcess::start(&kc, "node-b", &[])?;
    node_is_registered(&kc, "node-a", 1)?;
    kc.control_plane().kubectl(["create", "namespace", NS])?;

    let web = start_web(&kc, &kubelet_a)?;
    let client = start_client(&kc, &kubelet_b)?;
    let cluster_ip = service_ip(&kc, "web")?;
    for url in [
        format!("http://{cluster_ip}/"),
        "http://web/".to_owned(),
        format!("http://web.{NS}.svc.cluster.local/"),
    ] {
        let took = fetch_until_ok(&kubelet_b, &client.uid, &url, Duration::from_secs(30))?;
        eprintln!("client -> {url}: answered after {took:?}");
    }
    running_pods_see_new_service_names(&kc, &client)?;

    survives_a_kubelet_crash(&kc, &mut kubelet_a, &web)?;
    fetch_until_ok(
        &kubelet_b,
        &client.uid,
        &format!("http://{cluster_ip}/"),
        Duration::from_secs(10),
    )?;
    deletion_leaves_nothing(&kc, &kubelet_a, &web)?;

    kubelet_b.stop()?;
    ensure!(
        !client.netns.exists() && !client.pod_cgroup.exists(),
        "--cleanup-on-exit left the client's netns or cgroup"
    );
    let kubepods = kc.cluster().node("node-b")?.cgroup().join("kubepods");
    ensure!(
        !kubepods.exists(),
        "--cleanup-on-exit left {}",
        kubepods.display()
    );
    Ok(())
}

#[test]
fn a_failed_cni_add_is_retried_and_containers_follow_their_restart_policy() -> Result<()> {
    let kc = KubeCluster::builder()
        .node("node-a", CgroupDriver::Cgroupfs)
        .build()?;
    // A plugin the bin dir does not have: every ADD fails until the config is fixed, as
    // when mesh-cni finds no agent.
    let missing = json!({"type": "not-installed-yet"});
    let kubelet = KubeletProcess::start(&kc, "node-a", &[missing])?;
    let cp = kc.control_plane();
    cp.kubectl(["create", "namespace", NS])?;
    cp.apply(&web_manifest())?;
    let pending = wait_for_pod(&kc, "web", |p| {
        condition(p, "PodReadyToStartContainers") == Some(("False", "FailedCreatePodSandBox"))
    })?;
    ensure!(phase(&pending) == "Pending", "web: {:?}", pending.status);
    let events = cp.kubectl([
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        "reason=FailedCreatePodSandBox",
        "-o",
        "name",
    ])?;
    ensure!(
        !events.stdout_str().trim().is_empty(),
        "no FailedCreatePodSandBox event"
    );

    let began = Instant::now();
    let ipam = kubelet.state_dir().join("host-local");
    write_node_conflist(&kubelet.cni_conf_dir(), 1, &ipam, &[])?;
    wait_for_pod(&kc, "web", is_ready)?;
    eprintln!(
        "pod web: CNI config fixed -> Ready in {:?}",
        began.elapsed()
    );

    cp.apply(&restart_policy_manifest())?;
    let crasher = wait_for_pod(&kc, "crasher", |p| restart_count(p) >= 1)?;
    let last = last_terminated(&crasher);
    ensure!(
        last.as_ref()
            .is_some_and(|t| t.exit_code == 3 && t.reason.as_deref() == Some("Error")),
        "crasher's last state: {last:?}"
    );
    // A forced deletion takes the object at once; the kubelet cleans up after it.
    let crasher_uid = uid(&crasher)?;
    let crasher_cgroup = kc
        .cluster()
        .node("node-a")?
        .cgroup()
        .join(format!("kubepods/besteffort/pod{crasher_uid}"));
    cp.kubectl([
        "delete",
        "pod",
        "crasher",
        "-n",
        NS,
        "--force",
        "--grace-period=0",
    ])?;
    let cleaned = sys::poll(Duration::from_secs(15), POLL, || {
        !crasher_cgroup.exists() && matches!(kubelet.pod_state(&crasher_uid), Ok(None))
    });
    ensure!(
        cleaned,
        "the force-deleted pod's cgroup or state file is left"
    );
    let once = wait_for_pod(&kc, "once", |p| phase(p) == "Succeeded")?;
    let once_uid = uid(&once)?;
    let released = sys::poll(Duration::from_secs(10), POLL, || {
        matches!(kubelet.pod_state(&once_uid), Ok(None))
    });
    ensure!(released, "the Succeeded pod's sandbox is still up");
    let no_command = wait_for_pod(&kc, "no-command", |p| {
        waiting_reason(p).as_deref() == Some("CreateContainerConfigError")
    })?;
    ensure!(phase(&no_command) == "Pending");
    Ok(())
}

// ---------------------------------------------------------------- steps

/// A running pod as its kubelet made it.
struct Running {
    uid: String,
    /// `containerd://<id>` of its (first) container.
    container_id: String,
    pod_cgroup: PathBuf,
    container_cgroup: PathBuf,
    netns: PathBuf,
    ipv4: String,
}

impl Running {
    fn of(kubelet: &KubeletProcess, pod: &Pod) -> Result<Self> {
        let uid = uid(pod)?;
        let state: PodState = kubelet
            .pod_state(&uid)?
            .with_context(|| format!("no state file for pod {uid}"))?;
        let status = pod.status.as_ref().context("no status")?;
        let container = status
            .container_statuses
            .as_deref()
            .and_then(<[_]>::first)
            .context("no container status")?;
        Ok(Running {
            container_id: container.container_id.clone().context("no container id")?,
            pod_cgroup: state.pod_cgroup,
            container_cgroup: state.container_cgroup,
            netns: state.netns,
            ipv4: status.pod_ip.clone().context("no pod IP")?,
            uid,
        })
    }
}

/// The Node is Ready with its pod CIDRs and addresses, and its Lease is held.
fn node_is_registered(kc: &KubeCluster, name: &str, index: u8) -> Result<()> {
    let node = name.to_owned();
    let got = kc
        .control_plane()
        .block_on(|client| async move { Ok(Api::<Node>::all(client).get(&node).await?) })?;
    let cidrs = got.spec.as_ref().and_then(|s| s.pod_cidrs.clone());
    ensure!(
        cidrs
            == Some(vec![
                format!("10.{index}.0.0/24"),
                format!("fd00:{index}::/64")
            ]),
        "{name}'s pod CIDRs: {cidrs:?}"
    );
    let status = got.status.as_ref().context("Node without status")?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ensure!(ready, "{name} is not Ready: {:?}", status.conditions);
    let addresses: Vec<&str> = status
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
        .collect();
    let expected = [format!("10.255.0.{index}"), format!("fd00:ff::{index}")];
    ensure!(addresses == expected, "{name}'s InternalIPs: {addresses:?}");
    let holder = kc.control_plane().kubectl([
        "get",
        "lease",
        name,
        "-n",
        "kube-node-lease",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    ensure!(holder.stdout_str() == name, "lease of {name}: {holder:?}");
    Ok(())
}

/// The web server (HTTP readiness probe on a named port) becomes Ready on node-a with an
/// address of node-a's pod CIDRs, in cgroups at the systemd driver's paths.
fn start_web(kc: &KubeCluster, kubelet: &KubeletProcess) -> Result<Running> {
    let began = Instant::now();
    kc.control_plane().apply(&web_manifest())?;
    let pod = wait_for_pod(kc, "web", is_ready)?;
    eprintln!(
        "pod web: created -> Running and Ready in {:?}",
        began.elapsed()
    );
    let status = pod.status.as_ref().context("web has no status")?;
    let ips: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .collect();
    ensure!(
        ips.len() == 2 && ips[0].starts_with("10.1.0.") && ips[1].starts_with("fd00:1::"),
        "web's addresses should come from node-a's host-local ranges, v4 first: {ips:?}"
    );
    ensure!(
        status.host_ip.as_deref() == Some("10.255.0.1"),
        "web's hostIP: {:?}",
        status.host_ip
    );
    let web = Running::of(kubelet, &pod)?;
    let id = web
        .container_id
        .strip_prefix("containerd://")
        .context("not a containerd:// id")?;
    let slice = format!("kubepods-besteffort-pod{}.slice", web.uid.replace('-', "_"));
    let node = kc.cluster().node("node-a")?.cgroup().to_owned();
    let pod_cgroup = node
        .join("kubepods.slice/kubepods-besteffort.slice")
        .join(slice);
    ensure!(
        web.pod_cgroup == pod_cgroup,
        "web's pod cgroup: {}",
        web.pod_cgroup.display()
    );
    ensure!(
        web.container_cgroup == pod_cgroup.join(format!("cri-containerd-{id}.scope")),
        "web's container cgroup: {}",
        web.container_cgroup.display()
    );
    ensure!(
        !sys::cgroup_procs(&web.container_cgroup)?.is_empty(),
        "no process in web's container cgroup"
    );
    Ok(web)
}

/// A pod on node-b to run curl in, in cgroups at the cgroupfs driver's paths.
fn start_client(kc: &KubeCluster, kubelet: &KubeletProcess) -> Result<Running> {
    kc.control_plane().apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: node-b}}
  containers:
  - {{name: client, image: curl, command: [sleep, infinity]}}
"#
    ))?;
    let client = Running::of(kubelet, &wait_for_pod(kc, "client", is_ready)?)?;
    let node = kc.cluster().node("node-b")?.cgroup().to_owned();
    let pod_cgroup = node.join(format!("kubepods/besteffort/pod{}", client.uid));
    ensure!(
        client.pod_cgroup == pod_cgroup,
        "client's pod cgroup: {}",
        client.pod_cgroup.display()
    );
    let id = client.container_id.trim_start_matches("containerd://");
    ensure!(
        client.container_cgroup == pod_cgroup.join(id),
        "client's container cgroup: {}",
        client.container_cgroup.display()
    );
    Ok(client)
}

/// A Service made while a pod runs gets its names into the /etc/hosts the pod already has.
fn running_pods_see_new_service_names(kc: &KubeCluster, client: &Running) -> Result<()> {
    kc.control_plane().apply(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: late, namespace: {NS}}}
spec:
  ports: [{{port: 80}}]
"#
    ))?;
    let ip = service_ip(kc, "late")?;
    let pid = *sys::cgroup_procs(&client.container_cgroup)?
        .first()
        .context("no process in the client")?;
    // The file as the client's own mount namespace shows it.
    let hosts = PathBuf::from(format!("/proc/{pid}/root/etc/hosts"));
    let line = format!("{ip} late late.{NS} late.{NS}.svc late.{NS}.svc.cluster.local\n");
    let seen = sys::poll(Duration::from_secs(10), POLL, || {
        fs::read_to_string(&hosts).is_ok_and(|t| t.contains(&line))
    });
    ensure!(seen, "the client's /etc/hosts never got {line:?}");
    Ok(())
}

/// A kubelet that crashes leaves its pods running; the next one adopts them: same
/// container, same processes, no restart, still Ready.
fn survives_a_kubelet_crash(
    kc: &KubeCluster,
    kubelet: &mut KubeletProcess,
    web: &Running,
) -> Result<()> {
    let pids = sys::cgroup_procs(&web.container_cgroup)?;
    kubelet.crash_and_restart(kc)?;
    // Long enough for the new kubelet to have listed the pod and written its status.
    thread::sleep(Duration::from_secs(2));
    let pod = get_pod(kc, "web")?.context("web is gone")?;
    let after = Running::of(kubelet, &pod)?;
    ensure!(
        is_ready(&pod) && restart_count(&pod) == 0 && after.container_id == web.container_id,
        "web after the kubelet restart: {:?}",
        pod.status
    );
    ensure!(
        sys::cgroup_procs(&web.container_cgroup)? == pids,
        "web's processes changed"
    );
    Ok(())
}

/// Deleting the pod removes its state file, netns, cgroup and address lease.
fn deletion_leaves_nothing(
    kc: &KubeCluster,
    kubelet: &KubeletProcess,
    web: &Running,
) -> Result<()> {
    let lease = kubelet
        .state_dir()
        .join("host-local/mesh-tests")
        .join(&web.ipv4);
    ensure!(lease.exists(), "no host-local lease {}", lease.display());
    let began = Instant::now();
    kc.control_plane().delete(["pod", "web", "-n", NS])?;
    eprintln!("pod web: deleted (object gone) in {:?}", began.elapsed());
    ensure!(
        kubelet.pod_state(&web.uid)?.is_none(),
        "web's state file is left"
    );
    ensure!(
        !web.netns.exists(),
        "web's netns {} is left",
        web.netns.display()
    );
    ensure!(
        !web.pod_cgroup.exists(),
        "web's cgroup {} is left",
        web.pod_cgroup.display()
    );
    ensure!(
        !lease.exists(),
        "web's address is still leased (no CNI DEL?)"
    );
    Ok(())
}

// ---------------------------------------------------------------- helpers

/// An HTTP server on node-a (probed for readiness) and its Service.
fn web_manifest() -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {NS}, labels: {{app: web}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: node-a}}
  containers:
  - name: web
    image: python:3
    command: [python3, -m, http.server, "8080", --directory, /]
    ports: [{{name: http, containerPort: 8080}}]
    readinessProbe:
      httpGet: {{port: http, path: /}}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
"#
    )
}

/// A container that fails (restarted: OnFailure), one that succeeds (Never: the pod
/// completes), one without a command (which this kubelet cannot run).
fn restart_policy_manifest() -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: crasher, namespace: {NS}}}
spec:
  restartPolicy: OnFailure
  containers:
  - {{name: c, image: busybox, command: [sh, -c, "sleep 0.2; exit 3"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: once, namespace: {NS}}}
spec:
  restartPolicy: Never
  containers:
  - {{name: c, image: busybox, command: [sh, -c, "exit 0"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: no-command, namespace: {NS}}}
spec:
  containers:
  - {{name: c, image: busybox}}
"#
    )
}

fn get_pod(kc: &KubeCluster, name: &str) -> Result<Option<Pod>> {
    let name = name.to_owned();
    kc.control_plane().block_on(|client| async move {
        Ok(Api::<Pod>::namespaced(client, NS).get_opt(&name).await?)
    })
}

/// Polls the pod until `done` holds for it.
fn wait_for_pod(kc: &KubeCluster, name: &str, done: impl Fn(&Pod) -> bool) -> Result<Pod> {
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        let pod = get_pod(kc, name)?;
        if let Some(pod) = pod.as_ref().filter(|p| done(p)) {
            return Ok(pod.clone());
        }
        if Instant::now() >= deadline {
            bail!(
                "pod {name} not as expected after {POD_TIMEOUT:?}: {:#?}",
                pod.and_then(|p| p.status)
            );
        }
        thread::sleep(POLL);
    }
}

fn uid(pod: &Pod) -> Result<String> {
    pod.metadata.uid.clone().context("pod without uid")
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// A condition's status and reason.
fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<(&'a str, &'a str)> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.as_str(), c.reason.as_deref().unwrap_or("")))
}

fn is_ready(pod: &Pod) -> bool {
    phase(pod) == "Running" && condition(pod, "Ready").is_some_and(|(s, _)| s == "True")
}

fn first_container(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn restart_count(pod: &Pod) -> i32 {
    first_container(pod).map_or(0, |c| c.restart_count)
}

fn last_terminated(pod: &Pod) -> Option<ContainerStateTerminated> {
    first_container(pod)?
        .last_state
        .as_ref()?
        .terminated
        .clone()
}

fn waiting_reason(pod: &Pod) -> Option<String> {
    first_container(pod)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

fn service_ip(kc: &KubeCluster, name: &str) -> Result<String> {
    let out = kc.control_plane().kubectl([
        "get",
        "service",
        name,
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    Ok(out.stdout_str().trim().to_owned())
}

/// curl `url` from the pod until it answers 200; how long that took.
fn fetch_until_ok(
    kubelet: &KubeletProcess,
    uid: &str,
    url: &str,
    timeout: Duration,
) -> Result<Duration> {
    let began = Instant::now();
    let args = [
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "2",
        url,
    ];
    loop {
        let out = kubelet.exec(uid, "curl", args, Duration::from_secs(5))?;
        if out.success() && out.stdout_str() == "200" {
            return Ok(began.elapsed());
        }
        if began.elapsed() >= timeout {
            bail!(
                "GET {url} from pod {uid}: {} {}; {}",
                out.stdout_str(),
                out.stderr_str().trim(),
                kubelet.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
}
