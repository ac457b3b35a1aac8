//! Zero-copy message framing for the relay.
//!
//! Hand-written rather than pgwire's codec: the relay forwards every message byte-for-byte and
//! only needs the tag (and, for a few tags, the body) of each one. Decoding into pgwire's typed
//! messages would allocate per message, re-encode SQL as UTF-8, and reject tags it does not model.
//! The scanner also lets a message larger than the buffer stream through in pieces, so a huge
//! DataRow or CopyData never has to fit in memory.

/// Tag byte plus the 4-byte length that counts itself.
pub const HEADER_LEN: usize = 5;
/// Largest server message body a proxy accepts (PostgreSQL's own limit, 1 GiB).
pub const MAX_SERVER_MESSAGE: usize = 0x3fff_ffff;
/// Largest server message body handed over whole to be examined (CommandComplete,
/// ParameterStatus, ReadyForQuery, ErrorResponse); larger ones stream through.
pub const INSPECT_LIMIT: usize = 64 * 1024;

/// The header at the front of `buf`: its tag and body length, None until all five bytes are
/// there. The one header parse of both pool modes, client and server side.
pub fn header(buf: &[u8], max_body: usize) -> Result<Option<(u8, usize)>, FrameError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let tag = h[0];
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if len < 4 {
        return Err(FrameError::BadLength { tag, len });
    }
    let body_len = len as usize - 4;
    if body_len > max_body {
        return Err(FrameError::TooLarge {
            tag,
            len: len as usize,
            max: max_body + 4,
        });
    }
    Ok(Some((tag, body_len)))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{}'", char::from(*tag))]
    BadLength { tag: u8, len: u32 },
    #[error("message of type '{}' is {len} bytes, over the limit of {max}", char::from(*tag))]
    TooLarge { tag: u8, len: usize, max: usize },
}

/// Result of one scan: `forward` leading bytes are ready to pass on; `need` is how many bytes the
/// buffer must hold from `forward` onwards before the scan can make progress (0: any more will do).
/// `stop` says why the scan ended early; the message it stopped at is not part of `forward`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub forward: usize,
    pub need: usize,
    pub stop: Option<Stop>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The callback refused the message with this tag.
    Refused(u8),
    /// The next message header is invalid.
    Frame(FrameError),
}

/// Tracks message boundaries across reads. One per direction of a connection.
#[derive(Debug, Clone)]
pub struct Scanner {
    /// Body bytes of the current (streamed) message not yet seen.
    remaining: usize,
    max_body: usize,
    inspect_limit: usize,
}

impl Scanner {
    /// `max_body`: largest body accepted; `inspect_limit`: largest body handed to the callback.
    pub fn new(max_body: usize, inspect_limit: usize) -> Self {
        Scanner {
            remaining: 0,
            max_body,
            inspect_limit,
        }
    }

    /// A scanner in the middle of a message with `remaining` body bytes still to come.
    pub fn mid_message(max_body: usize, inspect_limit: usize, remaining: usize) -> Self {
        Scanner {
            remaining,
            max_body,
            inspect_limit,
        }
    }

    /// True between messages: nothing of a started message is still owed.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Walks `buf`, calling `on_message(tag, body)` once per message as its header is seen. `body`
    /// is the whole body when `want_body(tag)` and it fits `inspect_limit` (the scan then waits
    /// until the whole message is buffered); otherwise `None` and the message streams through.
    /// Returning false from `on_message` stops the scan before that message.
    pub fn scan(
        &mut self,
        buf: &[u8],
        want_body: impl Fn(u8) -> bool,
        mut on_message: impl FnMut(u8, Option<&[u8]>) -> bool,
    ) -> Scanned {
        let mut pos = self.remaining.min(buf.len());
        self.remaining -= pos;
        let mut need = 0;
        let mut stop = None;
        while self.remaining == 0 {
            let rest = &buf[pos..];
            let (tag, body_len) = match header(rest, self.max_body) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    if !rest.is_empty() {
                        need = HEADER_LEN;
                    }
                    break;
                }
                Err(e) => {
                    stop = Some(Stop::Frame(e));
                    break;
                }
            };
            if want_body(tag) && body_len <= self.inspect_limit {
                let total = HEADER_LEN + body_len;
                if rest.len() < total {
                    need = total;
                    break;
                }
                if !on_message(tag, Some(&rest[HEADER_LEN..total])) {
                    stop = Some(Stop::Refused(tag));
                    break;
                }
                pos += total;
            } else {
                if !on_message(tag, None) {
                    stop = Some(Stop::Refused(tag));
                    break;
                }
                let avail = (rest.len() - HEADER_LEN).min(body_len);
                pos += HEADER_LEN + avail;
                self.remaining = body_len - avail;
            }
        }
        Scanned {
            forward: pos,
            need,
            stop,
        }
    }
}

/// Reads a NUL-terminated string from the front of `buf`, returning it and the rest.
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    // Unnamed statements and portals are the common case.
    if buf.first() == Some(&0) {
        return Some((&buf[..0], &buf[1..]));
    }
    let end = memchr::memchr(0, buf)?;
    Some((&buf[..end], &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_read_once_all_five_bytes_are_there() {
        assert_eq!(header(b"Z\0\0", 10), Ok(None));
        assert_eq!(header(b"Z\0\0\0\x05I", 10), Ok(Some((b'Z', 1))));
    }

    #[test]
    fn a_header_with_a_length_below_four_or_over_the_limit_is_refused() {
        assert_eq!(
            header(b"Z\0\0\0\x03", 10),
            Err(FrameError::BadLength { tag: b'Z', len: 3 })
        );
        assert_eq!(
            header(b"D\0\0\0\x20", 10),
            Err(FrameError::TooLarge {
                tag: b'D',
                len: 32,
                max: 14
            })
        );
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    type Seen = Vec<(u8, Option<Vec<u8>>)>;

    fn scan_all(s: &mut Scanner, buf: &[u8]) -> (Scanned, Seen) {
        let mut seen = Vec::new();
        let r = s.scan(
            buf,
            |t| t == b'Z',
            |t, b| {
                seen.push((t, b.map(|b| b.to_vec())));
                true
            },
        );
        (r, seen)
    }

    #[test]
    fn forwards_whole_messages_and_inspects_wanted_bodies() {
        let mut buf = msg(b'D', b"row");
        buf.extend(msg(b'Z', b"I"));
        let mut s = Scanner::new(1 << 20, 1024);
        let (r, seen) = scan_all(&mut s, &buf);
        assert_eq!(r.forward, buf.len());
        assert_eq!(seen, vec![(b'D', None), (b'Z', Some(b"I".to_vec()))]);
        assert!(s.at_boundary());
    }

    #[test]
    fn streams_a_message_larger_than_the_buffer_in_pieces() {
        let big = msg(b'D', &[7u8; 100]);
        let mut s = Scanner::new(1 << 20, 1024);
        let (r1, seen) = scan_all(&mut s, &big[..30]);
        assert_eq!(r1.forward, 30);
        assert_eq!(seen.len(), 1);
        assert!(!s.at_boundary());
        let (r2, seen) = scan_all(&mut s, &big[30..]);
        assert_eq!(r2.forward, big.len() - 30);
        assert!(seen.is_empty());
        assert!(s.at_boundary());
    }

    #[test]
    fn waits_for_the_whole_body_of_an_inspected_message() {
        let z = msg(b'Z', b"T");
        let mut s = Scanner::new(1 << 20, 1024);
        let (r, seen) = scan_all(&mut s, &z[..5]);
        assert_eq!((r.forward, r.need), (0, 6));
        assert!(seen.is_empty());
    }

    #[test]
    fn a_split_header_asks_for_five_bytes() {
        let mut s = Scanner::new(1 << 20, 1024);
        let (r, _) = scan_all(&mut s, &[b'D', 0, 0]);
        assert_eq!((r.forward, r.need), (0, 5));
    }

    #[test]
    fn rejects_a_length_below_four_after_the_good_messages_before_it() {
        let mut buf = msg(b'Q', b"x\0");
        buf.extend_from_slice(&[b'Q', 0, 0, 0, 3]);
        let mut s = Scanner::new(1 << 20, 1024);
        let r = s.scan(&buf, |_| false, |_, _| true);
        assert_eq!(r.forward, 7);
        assert_eq!(
            r.stop,
            Some(Stop::Frame(FrameError::BadLength { tag: b'Q', len: 3 }))
        );
    }

    #[test]
    fn rejects_an_oversize_message_before_reading_its_body() {
        let mut s = Scanner::new(1000, 100);
        let r = s.scan(&[b'Q', 0x7f, 0xff, 0xff, 0xff], |_| false, |_, _| true);
        assert!(matches!(
            r.stop,
            Some(Stop::Frame(FrameError::TooLarge { tag: b'Q', .. }))
        ));
        assert_eq!(r.forward, 0);
    }

    #[test]
    fn a_refused_message_is_not_forwarded() {
        let mut buf = msg(b'Q', b"x\0");
        buf.extend(msg(b'X', b""));
        let mut s = Scanner::new(1000, 100);
        let r = s.scan(&buf, |_| false, |t, _| t != b'X');
        assert_eq!(r.forward, 7);
        assert_eq!(r.stop, Some(Stop::Refused(b'X')));
    }
}
