//! One HBONE tunnel: an HTTP/2 `CONNECT` stream's two directions as relay chunks, and the
//! HTTP/2 settings both ends of an HBONE connection use.

use std::{future::poll_fn, io};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::ResponseFuture};
use http::StatusCode;

use super::relay::{ChunkRead, ChunkWrite};

/// Per stream: many times a node network's bandwidth-delay product, so a transfer never waits
/// for a WINDOW_UPDATE; larger windows only let more data wait in the receiving agent (4 MiB
/// measured the same throughput with 4 MiB more RSS, docs/performance.md).
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Per connection, shared by its streams.
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Larger than a socket read, so one read is one DATA frame; TLS splits it into records anyway.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Every connection of a workload to another shares one HTTP/2 connection, so the limit must be
/// above what a busy workload keeps open (an idle stream costs a few hundred bytes).
pub const MAX_CONCURRENT_STREAMS: u32 = 100_000;

/// The tunnel's receiving direction.
pub struct TunnelReader<U = ()> {
    state: ReaderState,
    /// Kept for as long as the stream is relayed (the pool's idle accounting).
    _usage: U,
}

enum ReaderState {
    /// The client's side before the far agent has answered `CONNECT`: data can already be sent,
    /// and the far agent delivers it only once it has accepted the stream.
    Awaiting(ResponseFuture),
    Open(RecvStream),
    Done,
}

/// The tunnel's sending direction.
pub struct TunnelWriter {
    send: SendStream<Bytes>,
}

/// The far agent answered `CONNECT` with something other than 200.
#[derive(Debug, thiserror::Error)]
#[error("CONNECT refused: {0}")]
pub struct Refused(pub StatusCode);

impl Refused {
    /// The refusal status, if this relay error is a refusal.
    pub fn status_of(err: &io::Error) -> Option<StatusCode> {
        err.get_ref()?
            .downcast_ref::<Refused>()
            .map(|refused| refused.0)
    }
}

impl TunnelReader {
    /// The server's side: the request's body.
    pub fn open(recv: RecvStream) -> Self {
        Self {
            state: ReaderState::Open(recv),
            _usage: (),
        }
    }
}

impl<U: Send> TunnelReader<U> {
    /// The client's side: the answer is awaited by the first read (or [`Self::accepted`]).
    pub fn awaiting(response: ResponseFuture, usage: U) -> Self {
        Self {
            state: ReaderState::Awaiting(response),
            _usage: usage,
        }
    }

    /// Waits for the far agent to accept the stream; an error if it refused it or failed.
    pub async fn accepted(&mut self) -> io::Result<()> {
        if let ReaderState::Awaiting(response) = &mut self.state {
            let response = response.await.map_err(into_io)?;
            if response.status() != StatusCode::OK {
                self.state = ReaderState::Done;
                return Err(io::Error::other(Refused(response.status())));
            }
            self.state = ReaderState::Open(response.into_body());
        }
        Ok(())
    }
}

impl<U: Send> ChunkRead for TunnelReader<U> {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        self.accepted().await?;
        let ReaderState::Open(recv) = &mut self.state else {
            return Ok(None);
        };
        loop {
            match recv.data().await {
                None => return Ok(None),
                Some(Err(err)) => return Err(into_io(err)),
                // An empty frame (such as the one carrying END_STREAM) is not the end.
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    // Returned to the window at once: the relay reads no further until this
                    // chunk is written, so the window still bounds what waits in the agent.
                    let _ = recv.flow_control().release_capacity(chunk.len());
                    return Ok(Some(chunk));
                }
            }
        }
    }
}

impl TunnelWriter {
    pub fn new(send: SendStream<Bytes>) -> Self {
        Self { send }
    }
}

impl ChunkWrite for TunnelWriter {
    async fn write_chunk(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while !chunk.is_empty() {
            self.send.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| self.send.poll_capacity(cx)).await {
                None => return Err(io::Error::from(io::ErrorKind::BrokenPipe)),
                Some(granted) => granted.map_err(into_io)?,
            };
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            self.send.send_data(part, false).map_err(into_io)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.send.send_data(Bytes::new(), true).map_err(into_io)
    }
}

/// HTTP/2 errors as the relay's I/O errors; a peer's reset reads as a reset connection.
pub fn into_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    if err.is_reset() || err.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionReset, err);
    }
    io::Error::other(err)
}
