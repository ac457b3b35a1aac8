//! The client's socket: plain TCP, or TLS over it.
//!
//! TLS writes go into rustls's buffer and then to the socket as far as it takes them; what the
//! socket did not take is sent by the next read (reads flush first), so a response is never
//! left in the buffer while the session waits for the client.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::backend::stream::TryWrite;
use crate::tls::ClientTls;

pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<ClientTls>),
    /// Left behind while the socket moves into a TLS session; every operation fails.
    Closed,
}

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The `tls` column of SHOW CLIENTS; None without TLS.
    pub fn tls_description(&self) -> Option<String> {
        self.tls()
            .map(|t| crate::tls::describe(t.stream.get_ref().1))
    }

    pub fn tls(&self) -> Option<&ClientTls> {
        match self {
            ClientStream::Tls(t) => Some(t),
            _ => None,
        }
    }

    /// The TCP socket's descriptor, for the admin console's KILL (shutdown(2) reaches TLS
    /// sessions too).
    pub fn raw_fd(&self) -> RawFd {
        match self {
            ClientStream::Plain(s) => s.as_raw_fd(),
            ClientStream::Tls(t) => t.stream.get_ref().0.as_raw_fd(),
            ClientStream::Closed => -1,
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "client connection is closed")
}

impl TryWrite for ClientStream {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.try_write(buf),
            ClientStream::Tls(t) => {
                let (tcp, conn) = t.stream.get_mut();
                crate::tls::try_write_now(tcp, conn, buf)
            }
            ClientStream::Closed => Err(closed()),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(t) => {
                crate::tls::poll_read_flushing(Pin::new(&mut t.stream), cx, buf)
            }
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(t) => {
                crate::tls::poll_write_flushing(Pin::new(&mut t.stream), cx, buf)
            }
            ClientStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(t) => Pin::new(&mut t.stream).poll_flush(cx),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(t) => Pin::new(&mut t.stream).poll_shutdown(cx),
            ClientStream::Closed => Poll::Ready(Ok(())),
        }
    }
}
