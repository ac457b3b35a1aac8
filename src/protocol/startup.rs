//! The untyped first packet a client sends: StartupMessage, SSLRequest, GSSENCRequest or
//! CancelRequest.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::framing::cstr;

/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
pub const MAX_STARTUP_PACKET: usize = 10_000;

const CANCEL_REQUEST_CODE: u32 = 80877102;
const SSL_REQUEST_CODE: u32 = 80877103;
const GSSENC_REQUEST_CODE: u32 = 80877104;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("connection closed during startup")]
    Closed,
    #[error("i/o error during startup: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid length of startup packet: {0} bytes")]
    BadLength(u32),
    #[error("invalid startup packet layout: {0}")]
    BadLayout(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: u32, secret: u32 },
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// Minor version the client asked for (protocol 3.x).
    pub minor: u16,
    /// Parameters in the order sent; `_pq_.` protocol options are kept apart.
    pub params: Vec<(String, String)>,
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one startup-phase packet. Nothing over [`MAX_STARTUP_PACKET`] is ever allocated.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, StartupError> {
    let mut len_buf = [0u8; 4];
    match r.read_exact(&mut len_buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(StartupError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len_buf);
    if !(8..=MAX_STARTUP_PACKET as u32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StartupError::Closed
        } else {
            e.into()
        }
    })?;
    parse_startup(&body)
}

/// Parses a startup packet body (everything after the length).
pub fn parse_startup(body: &[u8]) -> Result<StartupPacket, StartupError> {
    let Some((code, rest)) = body.split_first_chunk::<4>() else {
        return Err(StartupError::BadLength(body.len() as u32 + 4));
    };
    let code = u32::from_be_bytes(*code);
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => return Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if rest.is_empty() => return Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if rest.len() == 8 => {
            let pid = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let secret = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
            return Ok(StartupPacket::Cancel { pid, secret });
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            return Err(StartupError::BadLayout("wrong length for a request code"))
        }
        _ => {}
    }
    let major = (code >> 16) as u16;
    let minor = (code & 0xffff) as u16;
    if major != 3 {
        return Err(StartupError::UnsupportedVersion { major, minor });
    }
    if rest.last() != Some(&0) {
        return Err(StartupError::BadLayout("expected terminator as last byte"));
    }
    let mut params = Vec::new();
    let mut protocol_options = Vec::new();
    let mut cursor = rest;
    loop {
        let (name, after) = cstr(cursor).ok_or(StartupError::BadLayout("unterminated name"))?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(StartupError::BadLayout("data after the final terminator"));
            }
            break;
        }
        let (value, after) =
            cstr(after).ok_or(StartupError::BadLayout("missing value for a parameter"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| StartupError::BadLayout("parameter name is not UTF-8"))?;
        let value = std::str::from_utf8(value)
            .map_err(|_| StartupError::BadLayout("parameter value is not UTF-8"))?;
        if name.starts_with("_pq_.") {
            protocol_options.push(name.to_string());
        } else {
            params.push((name.to_string(), value.to_string()));
        }
        cursor = after;
    }
    Ok(StartupPacket::Startup(StartupMessage {
        minor,
        params,
        protocol_options,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: u32, pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        for (k, val) in pairs {
            v.extend_from_slice(k.as_bytes());
            v.push(0);
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v.push(0);
        v
    }

    #[test]
    fn a_body_too_short_for_a_code_is_refused() {
        assert!(matches!(
            parse_startup(&[0, 3]),
            Err(StartupError::BadLength(6))
        ));
    }

    #[test]
    fn parses_a_v3_startup_message() {
        let b = body(196608, &[("user", "app.acme"), ("database", "acme")]);
        let StartupPacket::Startup(m) = parse_startup(&b).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(m.param("user"), Some("app.acme"));
        assert_eq!(m.param("database"), Some("acme"));
        assert_eq!(m.minor, 0);
    }

    #[test]
    fn recognises_ssl_gssenc_and_cancel_requests() {
        assert_eq!(
            parse_startup(&SSL_REQUEST_CODE.to_be_bytes()).unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(
            parse_startup(&GSSENC_REQUEST_CODE.to_be_bytes()).unwrap(),
            StartupPacket::GssEncRequest
        );
        let mut c = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        c.extend_from_slice(&7u32.to_be_bytes());
        c.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_startup(&c).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: 9 }
        );
    }

    #[test]
    fn refuses_protocol_version_two() {
        let b = body(2 << 16, &[("user", "x")]);
        assert!(matches!(
            parse_startup(&b),
            Err(StartupError::UnsupportedVersion { major: 2, minor: 0 })
        ));
    }

    #[test]
    fn refuses_a_packet_without_its_terminator() {
        let mut b = body(196608, &[("user", "x")]);
        b.pop();
        assert!(matches!(parse_startup(&b), Err(StartupError::BadLayout(_))));
    }

    #[test]
    fn keeps_protocol_options_apart() {
        let b = body(196610, &[("user", "x"), ("_pq_.foo", "1")]);
        let StartupPacket::Startup(m) = parse_startup(&b).unwrap() else {
            panic!()
        };
        assert_eq!(m.protocol_options, vec!["_pq_.foo".to_string()]);
        assert_eq!(m.minor, 2);
    }

    #[tokio::test]
    async fn refuses_an_oversize_length_without_reading_it() {
        let mut r: &[u8] = &[0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_startup(&mut r).await,
            Err(StartupError::BadLength(_))
        ));
    }
}
