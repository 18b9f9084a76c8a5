//! 100 MiB of random bytes cross the mesh unchanged.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{client_and_web, wait_conn};
use mesh_tests::{addr, http_url};
use sha2::{Digest, Sha256};

const SIZE: u64 = 100 * 1024 * 1024;

/// Writes `size` random bytes to `path`; returns their SHA-256.
fn random_file(path: &Path, size: u64) -> Result<Vec<u8>> {
    let mut src = File::open("/dev/urandom")?.take(size);
    let mut dst = File::create(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
    }
    Ok(hash.finalize().to_vec())
}

fn sha256_of(path: &Path) -> Result<(Vec<u8>, u64)> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hash = Sha256::new();
    let len = std::io::copy(&mut f, &mut hash)?;
    Ok((hash.finalize().to_vec(), len))
}

#[test]
fn hundred_mib_download_is_intact() -> Result<()> {
    let cluster = client_and_web()?;
    let client = cluster.pod("node-a", "client")?;
    let web = cluster.pod("node-b", "web")?;
    let www = cluster.workdir().join("www");
    std::fs::create_dir_all(&www)?;
    let want = random_file(&www.join("blob.bin"), SIZE)?;
    let _server = web.http_server(8080, &www)?;

    let out_path = cluster.workdir().join("download.bin");
    let url = format!("{}blob.bin", http_url(web.ipv4(), 8080));
    let out = client.run(
        "curl",
        [
            "-sS",
            "--max-time",
            "60",
            "-o",
            out_path.to_str().unwrap(),
            &url,
        ],
        Duration::from_secs(70),
    )?;
    ensure!(
        out.success(),
        "curl exited {:?}: {}",
        out.code(),
        out.stderr_str()
    );
    let (got, len) = sha256_of(&out_path)?;
    ensure!(len == SIZE, "downloaded {len} bytes, want {SIZE}");
    ensure!(
        got == want,
        "sha256 of the download differs from the served file"
    );

    let conn = wait_conn(
        &cluster,
        "node-a",
        "default/client",
        &addr(web.ipv4(), 8080),
    )?;
    ensure!(
        conn.bytes_received >= SIZE,
        "agent logged bytes_received {} < {SIZE}: {conn:?}",
        conn.bytes_received
    );
    Ok(())
}
