//! Packet captures on a node's link (`tcpdump`), read back with `tshark` or as raw bytes.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cluster::Cluster;
use crate::pod::{ChildGuard, tail_of};
use crate::sys;

/// A running `tcpdump`; see [`Cluster::capture`].
#[derive(Debug)]
pub struct PacketCapture {
    guard: ChildGuard,
    pcap: PathBuf,
    log: PathBuf,
}

/// A finished capture file.
#[derive(Debug, Clone)]
pub struct Pcap {
    path: PathBuf,
}

impl Cluster {
    /// Starts `tcpdump -i eth0 FILTER` in `node`'s network namespace (the node's link to the
    /// fabric, the underlay), writing every packet whole and at once to
    /// `<workdir>/<name>.pcap`, and returns once tcpdump is capturing.
    ///
    /// tcpdump runs with `-Z root`: it would otherwise drop to user `tcpdump`, which cannot
    /// write into the root-owned scratch dir.
    pub fn capture(&self, node: &str, name: &str, filter: &str) -> Result<PacketCapture> {
        let pcap = self.workdir().join(format!("{name}.pcap"));
        let log = self.workdir().join(format!("{name}.tcpdump.log"));
        let mut cmd = self.node_command(
            node,
            "tcpdump",
            [
                "-Z",
                "root",
                "--immediate-mode",
                "-U",
                "-n",
                "-s",
                "0",
                "-i",
                "eth0",
                "-w",
            ]
            .into_iter()
            .map(String::from)
            .chain([pcap.display().to_string()])
            .chain(filter.split_whitespace().map(String::from)),
        )?;
        cmd.stderr(File::create(&log).with_context(|| format!("create {}", log.display()))?);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn tcpdump in node {node}"))?;
        let mut guard = ChildGuard {
            child,
            name: format!("tcpdump in node {node}"),
        };
        // tcpdump says "listening on eth0" once the capture is active.
        let listening = sys::poll(Duration::from_secs(10), Duration::from_millis(20), || {
            fs::read_to_string(&log).is_ok_and(|t| t.contains("listening on"))
        });
        if !listening {
            let exited = guard.child.try_wait()?;
            bail!(
                "tcpdump in node {node} not capturing after 10 s (exit: {exited:?}); {}",
                tail_of(&log)
            );
        }
        Ok(PacketCapture { guard, pcap, log })
    }
}

impl PacketCapture {
    /// Stops the capture (SIGINT, so tcpdump flushes and closes the file) and returns it.
    /// Waits 300 ms first: packets sent just before are still on their way to the capture.
    pub fn stop(mut self) -> Result<Pcap> {
        thread::sleep(Duration::from_millis(300));
        kill(Pid::from_raw(self.guard.pid() as i32), Signal::SIGINT)?;
        let exited = sys::poll(Duration::from_secs(5), Duration::from_millis(20), || {
            matches!(self.guard.child.try_wait(), Ok(Some(_)))
        });
        ensure!(
            exited,
            "tcpdump did not exit on SIGINT; {}",
            tail_of(&self.log)
        );
        ensure!(
            self.pcap.exists(),
            "tcpdump wrote no {}",
            self.pcap.display()
        );
        Ok(Pcap {
            path: self.pcap.clone(),
        })
    }
}

impl Pcap {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `needle` occurs anywhere in the capture file's bytes (payloads included).
    pub fn contains(&self, needle: &[u8]) -> Result<bool> {
        let bytes =
            fs::read(&self.path).with_context(|| format!("read {}", self.path.display()))?;
        Ok(!needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle))
    }

    /// `tshark -r FILE -Y FILTER -T fields -e FIELD`: the field of every matching packet, one
    /// entry per packet. Port 15008 (HBONE) is decoded as TLS, the application ports 8080 and
    /// 9090 as HTTP; `decode_as` adds rules (`tcp.port==7000,echo`).
    pub fn fields(&self, filter: &str, field: &str, decode_as: &[&str]) -> Result<Vec<String>> {
        self.tshark(filter, decode_as, &["-T", "fields", "-e", field])
    }

    /// tshark's one-line summary of every packet that matches `filter` (decoded as in
    /// [`Pcap::fields`]), for messages: the capture file goes with the cluster's scratch dir.
    pub fn packets(&self, filter: &str) -> Result<Vec<String>> {
        self.tshark(filter, &[], &[])
    }

    fn tshark(&self, filter: &str, decode_as: &[&str], output: &[&str]) -> Result<Vec<String>> {
        let mut cmd = Command::new("tshark");
        cmd.args(["-n", "-r"]).arg(&self.path);
        for rule in [
            "tcp.port==15008,tls",
            "tcp.port==8080,http",
            "tcp.port==9090,http",
        ]
        .iter()
        .chain(decode_as)
        {
            cmd.args(["-d", rule]);
        }
        cmd.args(["-Y", filter]).args(output);
        let out = cmd.output().context("run tshark")?;
        ensure!(
            out.status.success(),
            "tshark -Y {filter:?} on {}: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// How many packets match the display filter `filter` (decoded as in [`Pcap::fields`]).
    pub fn count(&self, filter: &str) -> Result<usize> {
        Ok(self.fields(filter, "frame.number", &[])?.len())
    }
}
