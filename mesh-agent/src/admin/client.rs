//! A small HTTP/1.1 client (hyper's) for the commands that read HTTP APIs: `status` (the
//! agent's admin API) and `graph` (Prometheus).

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `GET base + path`, where `base` is `http://host[:port]`; the body of a 2xx answer.
pub async fn get_url(base: &str, path: &str, timeout: Duration) -> anyhow::Result<Bytes> {
    let uri: http::Uri = base
        .parse()
        .with_context(|| format!("{base:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("{base}: only http:// URLs are supported");
    }
    let host = uri.host().with_context(|| format!("{base}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = format!("{host}:{port}");
    let prefix = uri.path().trim_end_matches('/');
    let full_path = format!("{prefix}{path}");
    tokio::time::timeout(timeout, fetch(&authority, &full_path))
        .await
        .with_context(|| format!("{base}{path}: no answer within {timeout:?}"))?
        .with_context(|| format!("GET {base}{path}"))
}

async fn fetch(authority: &str, path: &str) -> anyhow::Result<Bytes> {
    let tcp = TcpStream::connect(authority).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(body)
}
