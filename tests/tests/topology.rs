//! The harness itself, without any agent: addressing, reachability, process
//! placement, the cluster file, and teardown (also on panic).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_tests::{Cluster, NodeSpec, PodSpec, http_url};

fn two_nodes() -> Result<Cluster> {
    Cluster::builder()
        .node(
            NodeSpec::new("node-a")
                .pod(
                    PodSpec::new("client")
                        .namespace("demo")
                        .service_account("client"),
                )
                .pod(PodSpec::new("outsider").enrolled(false))
                .excluded_ports([22]),
        )
        .node(NodeSpec::new("node-b").pod(PodSpec::new("web").label("app", "web")))
        .build()
}

#[test]
fn pods_reach_each_other_without_agent() -> Result<()> {
    let cluster = two_nodes()?;
    let www = cluster.workdir().join("www");
    fs::create_dir_all(&www)?;
    fs::write(www.join("index.html"), "hello from web\n")?;
    let web = cluster.pod("node-b", "web")?;
    let server = web.http_server(8080, &www)?;

    for client in ["client", "outsider"] {
        let client = cluster.pod("node-a", client)?;
        for ip in web.ips() {
            let out = client.curl(&http_url(ip, 8080))?.check()?;
            ensure!(
                out.stdout_str() == "hello from web\n",
                "body: {:?}",
                out.stdout_str()
            );
        }
    }
    // No NAT anywhere: the server saw the pods' own addresses.
    let client = cluster.pod("node-a", "client")?;
    let outsider = cluster.pod("node-a", "outsider")?;
    let seen = server.client_addrs()?;
    for ip in client.ips().into_iter().chain(outsider.ips()) {
        ensure!(seen.contains(&ip), "server never saw {ip}; saw {seen:?}");
    }

    // Same node: outsider -> client over cbr0.
    let _echo = client.tcp_echo(7000)?;
    let out = outsider
        .run(
            "sh",
            ["-c", "echo ping | socat -t 2 - TCP:10.1.0.2:7000"],
            Duration::from_secs(10),
        )?
        .check()?;
    ensure!(out.stdout_str() == "ping\n", "echo: {:?}", out.stdout_str());
    Ok(())
}

#[test]
fn pod_processes_run_in_pod_cgroup_and_netns() -> Result<()> {
    let cluster = two_nodes()?;
    let pod = cluster.pod("node-a", "client")?;
    let out = pod
        .run("cat", ["/proc/self/cgroup"], Duration::from_secs(5))?
        .check()?;
    // Hybrid hierarchy: the v2 line is the one with id 0.
    let want = format!("0::/mesh-tests/{}/node-a/pods/client", cluster.id());
    let text = out.stdout_str();
    ensure!(
        text.lines().any(|l| l == want),
        "cgroup {text:?}, want {want:?}"
    );

    let out = pod
        .run("readlink", ["/proc/self/ns/net"], Duration::from_secs(5))?
        .check()?;
    let ino = fs::metadata(pod.netns_path())?.ino();
    ensure!(
        out.stdout_str().trim() == format!("net:[{ino}]"),
        "netns {}",
        out.stdout_str()
    );
    // The cgroup fs is still visible inside (unlike with `ip netns exec`).
    let out = pod
        .run("ls", [pod.cgroup()], Duration::from_secs(5))?
        .check()?;
    ensure!(out.stdout_str().contains("cgroup.procs"));
    Ok(())
}

#[test]
fn cluster_file_lists_enrolled_pods() -> Result<()> {
    let cluster = two_nodes()?;
    let text = fs::read_to_string(cluster.cluster_file())?;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)?;
    ensure!(
        doc["trustDomain"].as_str() == Some("cluster.local"),
        "{text}"
    );
    let a = &doc["nodes"][0];
    ensure!(a["name"].as_str() == Some("node-a"));
    ensure!(a["addresses"][0].as_str() == Some("10.255.0.1"), "{text}");
    ensure!(a["addresses"][1].as_str() == Some("fd00:ff::1"), "{text}");
    let pods_cg = cluster.node("node-a")?.pods_cgroup();
    ensure!(
        a["workloadCgroup"].as_str() == Some(pods_cg.to_str().unwrap()),
        "{text}"
    );
    ensure!(a["excludedPorts"][0].as_u64() == Some(22), "{text}");
    let wls = a["workloads"].as_sequence().context("workloads")?;
    ensure!(wls.len() == 1, "only the enrolled pod is listed: {text}");
    let w = &wls[0];
    ensure!(w["name"].as_str() == Some("client"));
    ensure!(w["namespace"].as_str() == Some("demo"));
    ensure!(w["serviceAccount"].as_str() == Some("client"));
    ensure!(w["ips"][0].as_str() == Some("10.1.0.2"), "{text}");
    ensure!(w["ips"][1].as_str() == Some("fd00:1::2"), "{text}");
    let client = cluster.pod("node-a", "client")?;
    ensure!(w["netns"].as_str() == Some(&*format!("/var/run/netns/{}", client.netns_name())));
    ensure!(w["cgroup"].as_str() == Some(client.cgroup().to_str().unwrap()));
    let b = &doc["nodes"][1];
    ensure!(
        b["workloads"][0]["labels"]["app"].as_str() == Some("web"),
        "{text}"
    );
    ensure!(
        b["workloads"][0]["ips"][1].as_str() == Some("fd00:2::2"),
        "{text}"
    );
    Ok(())
}

/// What a cluster made on the host, to check it is gone afterwards.
struct Footprint {
    netns: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Footprint {
    fn of(cluster: &Cluster) -> Self {
        let mut netns = vec![Path::new("/var/run/netns").join(format!("{}-fab", cluster.id()))];
        for n in cluster.nodes() {
            netns.push(n.netns_path());
            netns.extend(n.pods().iter().map(|p| p.netns_path()));
        }
        let dirs = vec![
            Path::new("/sys/fs/cgroup/unified/mesh-tests").join(cluster.id()),
            Path::new("/sys/fs/bpf").join(cluster.id()),
            cluster.workdir().to_owned(),
        ];
        Footprint { netns, dirs }
    }
    fn assert_gone(&self) {
        for p in self.netns.iter().chain(&self.dirs) {
            assert!(!p.exists(), "{} still exists after teardown", p.display());
        }
    }
    fn assert_present(&self) {
        for p in self.netns.iter().chain(&self.dirs) {
            assert!(p.exists(), "{} missing", p.display());
        }
    }
}

#[test]
fn teardown_removes_everything() -> Result<()> {
    let cluster = two_nodes()?;
    let footprint = Footprint::of(&cluster);
    footprint.assert_present();
    // A process started without a guard: teardown must kill it (cgroup.kill).
    let mut stray = cluster
        .pod("node-b", "web")?
        .command("sleep", ["600"])?
        .spawn()?;
    drop(cluster);
    footprint.assert_gone();
    let status = stray
        .try_wait()?
        .context("stray process survived teardown")?;
    ensure!(!status.success());
    Ok(())
}

#[test]
fn teardown_on_panic() {
    let footprint = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let cluster = two_nodes().unwrap();
        *footprint.lock().unwrap() = Some(Footprint::of(&cluster));
        panic!("test failure inside a cluster");
    });
    assert!(result.is_err());
    footprint.lock().unwrap().take().unwrap().assert_gone();
}

#[test]
fn nodes_forward_and_have_rp_filter_off() -> Result<()> {
    let cluster = two_nodes()?;
    let node = cluster.node("node-a")?;
    // `ip netns exec` is fine here: sysctl needs no cgroup fs.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", node.netns_name(), "sysctl", "-n"])
        .args([
            "net.ipv4.ip_forward",
            "net.ipv6.conf.all.forwarding",
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            "net.ipv4.conf.eth0.rp_filter",
            "net.ipv4.conf.p1.rp_filter",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.stdout == b"1\n1\n0\n0\n0\n0\n",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
