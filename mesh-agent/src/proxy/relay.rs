//! Moving bytes between the two legs of a connection, counting them.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Per direction. Large reads mean fewer system calls and fuller TLS records.
const BUFFER_SIZE: usize = 64 * 1024;

/// Bytes moved, from the point of view of the caller.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Caller to destination.
    pub sent: u64,
    /// Destination to caller.
    pub received: u64,
}

/// Copies both ways between the caller's side and the destination's until both have finished
/// sending, passing half-closes through. The counts are kept even when the relay fails.
pub async fn relay<C, U>(caller: C, upstream: U) -> (Transferred, io::Result<()>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut transferred = Transferred::default();
    let (mut client_rx, mut client_tx) = tokio::io::split(caller);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    let result = tokio::try_join!(
        pump(&mut client_rx, &mut upstream_tx, &mut transferred.sent),
        pump(&mut upstream_rx, &mut client_tx, &mut transferred.received),
    )
    .map(|_| ());
    (transferred, result)
}

async fn pump<R, W>(from: &mut R, to: &mut W, count: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Left uninitialised (`read_buf`): zeroing 64 KiB twice per connection showed in the
    // new-connection profile.
    let mut buf = BytesMut::with_capacity(BUFFER_SIZE);
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            return finish_sending(to).await;
        }
        to.write_all(&buf).await?;
        *count += n as u64;
    }
}

/// Passes an end-of-stream on; the other side having gone already is not an error.
async fn finish_sending<W: AsyncWrite + Unpin>(to: &mut W) -> io::Result<()> {
    match to.shutdown().await {
        Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}
