//! Framing of PostgreSQL protocol messages, shared by the client side and the upstream side.
//!
//! A regular message is `tag:u8, len:i32 (includes itself), body`. The proxy forwards most messages
//! as bytes; it only needs the *whole* message for the few it must understand. `Scanner` walks a
//! read buffer: frames the caller does not want are passed over as their bytes arrive (a 1 GB
//! `DataRow` is never buffered whole), frames it wants are returned once complete. Offsets, not
//! copies: the caller decides what to forward with `split_to` on its own buffer.
//!
//! The few messages the proxy builds itself are encoded with the pgwire codec (`encode`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwire::messages::PgWireBackendMessage;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A whole message found in a buffer: `buf[start..start + 5 + body_len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    pub tag: u8,
    pub start: usize,
    pub len: usize,
}

#[cfg(test)]
impl FrameRef {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start + 5..self.end()]
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i64 },
    #[error("message of type {tag:?} is {len} bytes, over the limit of {max}")]
    TooLarge { tag: char, len: usize, max: usize },
}

/// Incremental frame walker over one direction of a connection.
#[derive(Debug)]
pub struct Scanner {
    /// Bytes at the front of the buffer already walked over (whole frames, or passed-over parts).
    cursor: usize,
    /// Bytes of a passed-over frame that have not arrived yet.
    pending: usize,
    max_len: usize,
}

impl Scanner {
    pub fn new(max_len: usize) -> Self {
        Scanner {
            cursor: 0,
            pending: 0,
            max_len,
        }
    }

    /// Bytes at the front of the buffer that may be forwarded now.
    pub fn walked(&self) -> usize {
        self.cursor
    }

    /// True when the walked bytes end on a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.pending == 0
    }

    /// The caller removed `n <= walked()` bytes from the front of its buffer.
    pub fn consumed(&mut self, n: usize) {
        debug_assert!(n <= self.cursor);
        self.cursor -= n;
    }

    /// Walk forward. Returns the next complete frame whose tag `wants` accepts (the cursor is
    /// then just past it), or `None` when the buffer holds no more whole frames to report.
    /// `wants` sees every frame header; it sees an unwanted frame's exactly once, so it may count
    /// them, but a wanted frame's header again on each call until the frame is complete.
    pub fn next(
        &mut self,
        buf: &[u8],
        mut wants: impl FnMut(u8) -> bool,
    ) -> Result<Option<FrameRef>, FrameError> {
        loop {
            if self.pending > 0 {
                let n = self.pending.min(buf.len() - self.cursor);
                self.cursor += n;
                self.pending -= n;
                if self.pending > 0 {
                    return Ok(None);
                }
            }
            let rest = &buf[self.cursor..];
            if rest.len() < 5 {
                return Ok(None);
            }
            let tag = rest[0];
            let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
            if len < 4 {
                return Err(FrameError::BadLength {
                    tag: tag as char,
                    len: len as i64,
                });
            }
            let total = len as usize + 1;
            if total - 1 > self.max_len {
                return Err(FrameError::TooLarge {
                    tag: tag as char,
                    len: total - 1,
                    max: self.max_len,
                });
            }
            if wants(tag) {
                if rest.len() < total {
                    return Ok(None);
                }
                let frame = FrameRef {
                    tag,
                    start: self.cursor,
                    len: total,
                };
                self.cursor += total;
                return Ok(Some(frame));
            }
            self.pending = total;
        }
    }
}

/// Encode a backend message the proxy itself sends.
pub fn encode(msg: PgWireBackendMessage, out: &mut BytesMut) {
    // pgwire only fails to encode messages whose fields exceed protocol limits; the proxy's own
    // messages are small and well formed.
    if let Err(e) = msg.encode(out) {
        tracing::error!(error = %e, "failed to encode a proxy message");
    }
}

/// `ReadyForQuery` with the given transaction status byte.
pub fn ready_for_query(status: u8, out: &mut BytesMut) {
    out.put_u8(b'Z');
    out.put_i32(5);
    out.put_u8(status);
}

/// A simple-protocol `Query` message.
pub fn query(sql: &str, out: &mut BytesMut) {
    out.put_u8(b'Q');
    out.put_i32((4 + sql.len() + 1) as i32);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
}

/// The text values of a `DataRow` body (`None` for SQL NULL).
pub fn data_row_texts(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut pos = 2;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = body.get(pos..pos + len as usize)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        pos += len as usize;
    }
    Some(out)
}

/// Append a frame with `tag` and `parts` as its body.
pub fn frame(tag: u8, parts: &[&[u8]], out: &mut BytesMut) {
    let len: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 4;
    out.reserve(len + 1);
    out.put_u8(tag);
    out.put_i32(len as i32);
    for p in parts {
        out.put_slice(p);
    }
}

/// Where the first NUL in `s` is. The protocol's names (statements, portals) are mostly empty
/// or short, and memchr's vector set-up costs more than they do (an extended batch reads ten of
/// them): the first 16 bytes are looked at a word at a time, the rest (statement text) by memchr.
#[inline]
pub fn find_nul(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut at = 0;
    while at < 16 {
        let Some(word) = s.get(at..at + 8) else {
            // Fewer than 8 bytes left, and no more after them.
            return s[at..].iter().position(|&b| b == 0).map(|i| at + i);
        };
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let v = u64::from_le_bytes(bytes);
        // The lowest byte flagged here is the first zero byte (flags above it may be false).
        let zero = v.wrapping_sub(ONES) & !v & HIGHS;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    memchr::memchr(0, &s[at..]).map(|i| at + i)
}

/// Read a NUL-terminated string from `body` at `*pos`.
#[inline]
pub fn read_cstr<'a>(body: &'a [u8], pos: &mut usize) -> Option<&'a str> {
    let rest = body.get(*pos..)?;
    let end = find_nul(rest)?;
    let s = std::str::from_utf8(&rest[..end]).ok()?;
    *pos += end + 1;
    Some(s)
}

/// Why a C string in a message could not be read as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// No NUL ends it: the message is malformed.
    Unterminated,
    /// Whole, but not UTF-8.
    NotUtf8,
}

/// Read a NUL-terminated UTF-8 string from `body` at `*pos`, telling a string that does not
/// end from one that is not UTF-8. `*pos` moves past a whole string, text or not, so the next
/// field can be read.
#[inline]
pub fn read_text<'a>(body: &'a [u8], pos: &mut usize) -> Result<&'a str, Unreadable> {
    let rest = body.get(*pos..).ok_or(Unreadable::Unterminated)?;
    let end = find_nul(rest).ok_or(Unreadable::Unterminated)?;
    *pos += end + 1;
    std::str::from_utf8(&rest[..end]).map_err(|_| Unreadable::NotUtf8)
}

/// Name and value of a `ParameterStatus` body.
pub fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut pos = 0;
    Some((read_cstr(body, &mut pos)?, read_cstr(body, &mut pos)?))
}

/// An `ErrorResponse` body whose severity ends the session (`FATAL` or `PANIC`).
pub fn is_fatal(body: &[u8]) -> bool {
    fields(body)
        .iter()
        .any(|(k, v)| *k == b'V' && (v == "FATAL" || v == "PANIC"))
}

/// Fields of an `ErrorResponse`/`NoticeResponse` body, as (code, value) pairs.
pub fn fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < body.len() && body[pos] != 0 {
        let code = body[pos];
        pos += 1;
        match read_cstr(body, &mut pos) {
            Some(v) => out.push((code, v.to_string())),
            None => break,
        }
    }
    out
}

/// Read one whole regular message (startup-phase use: auth exchanges, small messages).
/// `Ok(None)` when the peer closed cleanly before a message started.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> std::io::Result<Option<(u8, Bytes)>> {
    loop {
        if buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            if len < 4 || len as usize > max_len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("invalid message length {len}"),
                ));
            }
            let total = len as usize + 1;
            if buf.len() >= total {
                let mut frame = buf.split_to(total);
                let tag = frame[0];
                frame.advance(5);
                return Ok(Some((tag, frame.freeze())));
            }
            buf.reserve(total - buf.len());
        }
        if r.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Read one length-prefixed startup-phase packet (no tag byte): startup, SSL/GSS/cancel requests.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<Option<BytesMut>> {
    const MAX_STARTUP: usize = 10_000;
    loop {
        if buf.len() >= 4 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if !(8..=MAX_STARTUP as i32).contains(&len) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("invalid startup packet length {len}"),
                ));
            }
            if buf.len() >= len as usize {
                return Ok(Some(buf.split_to(len as usize)));
            }
        }
        if r.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn finds_the_first_nul_before_after_and_at_the_short_look() {
        // Fillers next to which a word-at-a-time test could go wrong (borrows, high bits).
        for fill in [b'x', 0x01, 0x80, 0xff] {
            for len in 0..40 {
                let none = vec![fill; len];
                assert_eq!(find_nul(&none), None, "no NUL in {len} bytes of {fill:#x}");
                for at in 0..len {
                    let mut v = vec![fill; len];
                    v[at] = 0;
                    // A second NUL further on must not be the one found.
                    if at + 1 < len {
                        v[len - 1] = 0;
                    }
                    assert_eq!(find_nul(&v), Some(at), "NUL at {at} of {len}, {fill:#x}");
                }
            }
        }
    }

    #[test]
    fn tells_a_string_without_an_end_from_one_that_is_not_text() {
        // A name in LATIN1 (not UTF-8), then a text, then a string with no end.
        let body = b"caf\xe9\0select 1\0tail";
        let mut pos = 0;
        assert_eq!(read_text(body, &mut pos), Err(Unreadable::NotUtf8));
        assert_eq!(pos, 5, "past the whole string");
        assert_eq!(read_text(body, &mut pos), Ok("select 1"));
        assert_eq!(read_text(body, &mut pos), Err(Unreadable::Unterminated));
        assert_eq!(pos, 14, "not moved");
        let mut past = body.len() + 1;
        assert_eq!(read_text(body, &mut past), Err(Unreadable::Unterminated));
    }

    #[test]
    fn passes_over_unwanted_frames_as_bytes_arrive() {
        let mut buf = msg(b'D', &[7u8; 100]);
        buf.extend(msg(b'Z', b"I"));
        let mut s = Scanner::new(1 << 20);
        // Only half of the DataRow has arrived: it is walked over without waiting for the rest.
        let half = &buf[..50];
        assert_eq!(s.next(half, |t| t == b'Z').unwrap(), None);
        assert_eq!(s.walked(), 50);
        assert!(!s.at_boundary());
        let f = s.next(&buf, |t| t == b'Z').unwrap().unwrap();
        assert_eq!(f.tag, b'Z');
        assert_eq!(f.body(&buf), b"I");
        assert_eq!(s.walked(), buf.len());
        assert!(s.at_boundary());
    }

    #[test]
    fn waits_for_whole_wanted_frame() {
        let buf = msg(b'E', b"SERROR\0\0");
        let mut s = Scanner::new(1 << 20);
        assert_eq!(s.next(&buf[..7], |_| true).unwrap(), None);
        assert_eq!(s.walked(), 0);
        assert!(s.next(&buf, |_| true).unwrap().is_some());
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut s = Scanner::new(100);
        let bad = [b'Q', 0, 0, 0, 2];
        assert!(matches!(
            s.next(&bad, |_| true),
            Err(FrameError::BadLength { .. })
        ));
        let mut s = Scanner::new(100);
        let big = msg(b'Q', &[1u8; 200]);
        assert!(matches!(
            s.next(&big, |_| true),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn consumed_shifts_cursor() {
        let mut buf = msg(b'Z', b"I");
        buf.extend(msg(b'Z', b"T"));
        let mut s = Scanner::new(100);
        let f = s.next(&buf, |_| true).unwrap().unwrap();
        s.consumed(f.end());
        let rest = &buf[f.end()..];
        let g = s.next(rest, |_| true).unwrap().unwrap();
        assert_eq!(g.body(rest), b"T");
    }

    #[test]
    fn reads_parameter_status_and_fatal_severity() {
        assert_eq!(
            parameter_status(b"TimeZone\0UTC\0"),
            Some(("TimeZone", "UTC"))
        );
        assert_eq!(parameter_status(b"TimeZone\0UTC"), None);
        assert!(is_fatal(b"SFATAL\0VFATAL\0C28P01\0\0"));
        assert!(!is_fatal(b"SERROR\0VERROR\0C42P01\0\0"));
    }

    #[test]
    fn parses_error_fields() {
        let f = fields(b"SERROR\0C42P01\0Mno such table\0\0");
        assert_eq!(f[1], (b'C', "42P01".to_string()));
        assert_eq!(f.len(), 3);
    }
}
