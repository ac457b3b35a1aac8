//! The socket to a PostgreSQL server: TCP, or a Unix-domain socket when the server's host is a
//! directory (libpq's and PgBouncer's convention: `host = "/var/run/postgresql"` means the file
//! `/var/run/postgresql/.s.PGSQL.<port>`). On the database host, a Unix socket costs the kernel
//! less per message than loopback TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::tls::BackendTls;

pub enum BackendStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Handed to the task that closes the connection (see `BackendConn`'s Drop).
    Closed,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "server connection closed")
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// The SSLRequest packet: length 8, code 1234/5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Whether `host` names a socket directory rather than a network host.
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// The socket file PostgreSQL listens on in directory `dir` for `port`.
pub fn socket_path(dir: &str, port: u16) -> String {
    format!("{}/.s.PGSQL.{port}", dir.trim_end_matches('/'))
}

impl BackendStream {
    /// A socket without TLS (cancel requests, which PostgreSQL takes unencrypted).
    pub async fn connect(host: &str, port: u16) -> io::Result<BackendStream> {
        if is_socket_dir(host) {
            return Ok(BackendStream::Unix(
                UnixStream::connect(socket_path(host, port)).await?,
            ));
        }
        let s = TcpStream::connect((host, port)).await?;
        // Every message is a complete request or reply: nothing to gain from Nagle.
        let _ = s.set_nodelay(true);
        Ok(BackendStream::Tcp(s))
    }

    /// A socket to a server under its `sslmode`: SSLRequest, then a handshake when the server
    /// answers `S`; plaintext when it answers `N` and the mode allows it. Unix sockets never
    /// use TLS, as in libpq.
    pub async fn connect_with(
        host: &str,
        port: u16,
        tls: &BackendTls,
    ) -> Result<BackendStream, ConnectError> {
        if let Some(e) = tls.setup_error() {
            return Err(ConnectError::Tls(e.to_string()));
        }
        let plain = BackendStream::connect(host, port).await?;
        let (mut tcp, config) = match (plain, tls.client_config()) {
            (BackendStream::Tcp(tcp), Some(config)) => (tcp, config),
            (other, _) => return Ok(other),
        };
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' if !tls.required() => return Ok(BackendStream::Tcp(tcp)),
            b'N' => {
                return Err(ConnectError::Tls(format!(
                    "the server does not support TLS, and sslmode is {}",
                    tls.mode.as_str()
                )))
            }
            other => {
                return Err(ConnectError::Tls(format!(
                    "unexpected answer {other:#04x} to SSLRequest"
                )))
            }
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| ConnectError::Tls(format!("invalid server name {host:?}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        Ok(BackendStream::Tls(Box::new(stream)))
    }

    /// Whether this thread's reactor has seen the socket readable (data, or the server's
    /// close) since it was last read dry: no system call. None when the answer is unknown (the
    /// task's cooperative budget is spent, so the readiness poll would say pending whatever the
    /// socket holds) or the stream is closed.
    pub fn seen_readable(&self) -> Option<bool> {
        if !tokio::task::coop::has_budget_remaining() {
            return None;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let ready = match self {
            BackendStream::Tcp(s) => s.poll_read_ready(&mut cx),
            BackendStream::Unix(s) => s.poll_read_ready(&mut cx),
            BackendStream::Tls(t) => t.get_ref().0.poll_read_ready(&mut cx),
            BackendStream::Closed => return None,
        };
        Some(ready.is_ready())
    }

    /// The `tls` column of SHOW SERVERS; None without TLS.
    pub fn tls_description(&self) -> Option<String> {
        match self {
            BackendStream::Tls(t) => Some(crate::tls::describe(t.get_ref().1)),
            _ => None,
        }
    }
}

/// A write that does not wait: what the hot path tries before tokio's `write_all` future.
pub trait TryWrite {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
}

impl TryWrite for TcpStream {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
}

impl TryWrite for BackendStream {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BackendStream::Tcp(s) => s.try_write(buf),
            BackendStream::Unix(s) => s.try_write(buf),
            BackendStream::Tls(t) => {
                let (tcp, conn) = t.get_mut();
                crate::tls::try_write_now(tcp, conn, buf)
            }
            BackendStream::Closed => Err(closed()),
        }
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(t) => crate::tls::poll_read_flushing(Pin::new(&mut **t), cx, buf),
            BackendStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(t) => crate::tls::poll_write_flushing(Pin::new(&mut **t), cx, buf),
            BackendStream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
            BackendStream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
            BackendStream::Closed => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_host_means_postgres_socket_file() {
        assert!(is_socket_dir("/var/run/postgresql"));
        assert!(!is_socket_dir("db.internal"));
        assert_eq!(
            socket_path("/var/run/postgresql/", 5433),
            "/var/run/postgresql/.s.PGSQL.5433"
        );
    }
}
