//! The socket to a PostgreSQL server: TCP, or a Unix-domain socket when the server's host is a
//! directory (libpq's and PgBouncer's convention: `host = "/var/run/postgresql"` means the file
//! `/var/run/postgresql/.s.PGSQL.<port>`). On the database host, a Unix socket costs the kernel
//! less per message than loopback TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub enum BackendStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Whether `host` names a socket directory rather than a network host.
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// The socket file PostgreSQL listens on in directory `dir` for `port`.
pub fn socket_path(dir: &str, port: u16) -> String {
    format!("{}/.s.PGSQL.{port}", dir.trim_end_matches('/'))
}

impl BackendStream {
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
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
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
