//! Moving bytes between the two legs of a connection, counting them.
//!
//! The relay works in chunks ([`Bytes`]) rather than through a copy buffer: a chunk read from a
//! TCP socket is handed to HTTP/2 as it is, and a DATA frame received from HTTP/2 is written to
//! the socket as it is, so the agent copies nothing in user space besides what TLS needs. A
//! socket's read buffer is only held while data is flowing: an idle connection holds none.

use std::{future::Future, io};

use bytes::{Bytes, BytesMut};

use super::record::ByteMeter;
use tokio::{
    io::AsyncWriteExt as _,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

/// Largest read from a socket. Large reads mean fewer system calls and fuller TLS records.
const READ_SIZE: usize = 64 * 1024;
/// A read into less room than this would be a wasted system call; take a fresh buffer.
const MIN_READ_ROOM: usize = 4 * 1024;

/// One direction's source: chunks until the end of the stream (`None`).
pub trait ChunkRead {
    fn read_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// One direction's sink.
pub trait ChunkWrite {
    fn write_chunk(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Passes the end of the stream on (a half-close).
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// Bytes moved, from the point of view of the caller.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Caller to destination.
    pub sent: u64,
    /// Destination to caller.
    pub received: u64,
}

/// Copies both ways between the caller's side and the destination's until both have finished
/// sending, passing half-closes through. Each chunk is counted in `meter` once written, so the
/// counts are right while the relay runs, when it fails, and when it is cut short.
pub async fn relay<CR, CW, UR, UW>(
    (mut caller_rx, mut caller_tx): (CR, CW),
    (mut upstream_rx, mut upstream_tx): (UR, UW),
    meter: &ByteMeter,
) -> io::Result<()>
where
    CR: ChunkRead,
    CW: ChunkWrite,
    UR: ChunkRead,
    UW: ChunkWrite,
{
    tokio::try_join!(
        pump(&mut caller_rx, &mut upstream_tx, |n| meter.add_sent(n)),
        pump(&mut upstream_rx, &mut caller_tx, |n| meter.add_received(n)),
    )
    .map(|_| ())
}

async fn pump<R: ChunkRead, W: ChunkWrite>(
    from: &mut R,
    to: &mut W,
    count: impl Fn(u64),
) -> io::Result<()> {
    while let Some(chunk) = from.read_chunk().await? {
        let len = chunk.len() as u64;
        to.write_chunk(chunk).await?;
        count(len);
    }
    to.finish().await
}

/// The two directions of a TCP connection, borrowed for the relay.
pub fn tcp_halves(stream: &mut TcpStream) -> (TcpReader<'_>, TcpWriter<'_>) {
    let (rx, tx) = stream.split();
    (
        TcpReader {
            half: rx,
            buf: BytesMut::new(),
        },
        TcpWriter { half: tx },
    )
}

pub struct TcpReader<'a> {
    half: ReadHalf<'a>,
    buf: BytesMut,
}

pub struct TcpWriter<'a> {
    half: WriteHalf<'a>,
}

impl ChunkRead for TcpReader<'_> {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.buf.capacity() - self.buf.len() < MIN_READ_ROOM {
                // The previous chunks still use the old allocation until they are sent; reserve
                // reuses it when they are gone.
                self.buf.reserve(READ_SIZE);
            }
            match self.half.try_read_buf(&mut self.buf) {
                Ok(0) => {
                    // The other direction may go on for long: hold no buffer meanwhile.
                    self.buf = BytesMut::new();
                    return Ok(None);
                }
                Ok(_) => return Ok(Some(self.buf.split().freeze())),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing to read: let an idle connection hold no buffer.
                    self.buf = BytesMut::new();
                    self.half.readable().await?;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl ChunkWrite for TcpWriter<'_> {
    async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        self.half.write_all(&chunk).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        // The other side having gone already is not an error.
        match self.half.shutdown().await {
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpListener;

    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut app, mut caller) = connected_pair().await;
        let (mut upstream, mut server) = connected_pair().await;
        let meter = std::sync::Arc::new(ByteMeter::default());
        let counted = meter.clone();
        let relayed = tokio::spawn(async move {
            relay(tcp_halves(&mut caller), tcp_halves(&mut upstream), &counted).await
        });
        let request = vec![7u8; 300_000];
        app.write_all(&request).await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, request,
            "caller's bytes reach the server, then its half-close"
        );
        server.write_all(b"answer").await.unwrap();
        drop(server);
        let mut answer = Vec::new();
        app.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        relayed.await.unwrap().unwrap();
        assert_eq!(
            meter.transferred(),
            Transferred {
                sent: 300_000,
                received: 6
            }
        );
    }
}
