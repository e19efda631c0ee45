//! Raw-TCP probes of the servers, so that the testkit needs no client crates.
//!
//! Each probe takes a timeout that bounds every connect, read and write: a paused
//! (SIGSTOPped) server makes them fail with [`std::io::ErrorKind::TimedOut`] or
//! [`std::io::ErrorKind::WouldBlock`] instead of hanging.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Normalises "read timed out" (Linux reports `WouldBlock` for `SO_RCVTIMEO`).
fn timeout_kind(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, e)
    } else {
        e
    }
}

/// Sends one request and reads until the peer closes, `done(bytes)` says the reply is
/// complete, or the overall deadline passes.
fn exchange(
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
    done: impl Fn(&[u8]) -> bool,
) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(addr, timeout)?;
    s.write_all(request).map_err(timeout_kind)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "reply timed out"));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if done(&out) {
                    return Ok(out);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timeout_kind(e)),
        }
    }
}

/// Redis `PING` in RESP; `Ok(())` when the reply is `+PONG`.
pub fn redis_ping(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let reply = redis_command(addr, &["PING"], timeout)?;
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        Err(io::Error::other(format!("unexpected PING reply {reply:?}")))
    }
}

/// Sends one Redis command (RESP array of bulk strings) and returns the first reply
/// line (e.g. `+OK`, `$5`, `-ERR ...`) followed by whatever else arrived.
pub fn redis_command(addr: SocketAddr, args: &[&str], timeout: Duration) -> io::Result<String> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let reply = exchange(addr, req.as_bytes(), timeout, |b| {
        // Simple replies end with the first CRLF; a bulk reply `$n` needs its payload.
        let s = String::from_utf8_lossy(b);
        match s.find("\r\n") {
            None => false,
            Some(i) if s.starts_with('$') => match s[1..i].parse::<i64>() {
                Ok(n) if n >= 0 => s.len() >= i + 2 + n as usize + 2,
                _ => true,
            },
            Some(_) => true,
        }
    })?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// A minimal HTTP/1.1 exchange (`Connection: close`); returns the status code and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = exchange(addr, req.as_bytes(), timeout, |_| false)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("malformed HTTP reply {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| io::Error::other(format!("malformed HTTP status line in {head:?}")))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// etcd `GET /health`; `Ok(())` when it reports `"health":"true"`.
pub fn etcd_health(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let (status, body) = http(addr, "GET", "/health", None, timeout)?;
    if status == 200 && body.contains("\"health\":\"true\"") {
        Ok(())
    } else {
        Err(io::Error::other(format!("etcd /health: {status} {body}")))
    }
}

/// A ZooKeeper four-letter word (`srvr`, `mntr`, ...); returns the whole reply.
pub fn zk_four_letter(addr: SocketAddr, word: &str, timeout: Duration) -> io::Result<String> {
    let raw = exchange(addr, word.as_bytes(), timeout, |_| false)?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// The `Mode:` of a ZooKeeper server (`standalone`, `leader`, `follower`), from `srvr`.
/// Fails while the server is not serving (e.g. an ensemble member without quorum).
pub fn zk_mode(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let reply = zk_four_letter(addr, "srvr", timeout)?;
    reply
        .lines()
        .find_map(|l| l.strip_prefix("Mode:"))
        .map(|m| m.trim().to_string())
        .ok_or_else(|| io::Error::other(format!("srvr reply has no Mode: {reply:?}")))
}

/// Value of the first `"field":"value"` string in a JSON text (the etcd JSON gateway
/// encodes 64-bit integers as strings). Enough for the gateway's flat replies.
pub fn json_string_field(json: &str, field: &str) -> Option<String> {
    let pat = format!("\"{field}\":\"");
    let start = json.find(&pat)? + pat.len();
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_string())
}

/// Standard base64 (with padding), as the etcd JSON gateway wants for keys and values.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ------------------------------------------------------------ RESP (full replies)

/// One RESP2 reply, fully parsed (nested arrays included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...` (the text after `-`).
    Error(String),
    /// `:42`
    Int(i64),
    /// `$n` payload; `None` for the nil bulk `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*n` elements; `None` for the nil array `*-1`.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The text of a simple string or bulk reply (lossy UTF-8).
    pub fn text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// Turns an error reply into an `io::Error` (kind `Other`, message = the error text).
    pub fn into_result(self) -> io::Result<Resp> {
        match self {
            Resp::Error(e) => Err(io::Error::other(e)),
            v => Ok(v),
        }
    }
}

/// Parses one reply from the start of `b`: `Ok(None)` while incomplete, else the
/// value and how many bytes it used.
fn parse_resp(b: &[u8]) -> io::Result<Option<(Resp, usize)>> {
    let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some(&tag) = b.first() else {
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&b[1..eol]).into_owned();
    let after = eol + 2;
    let num = || {
        line.parse::<i64>()
            .map_err(|_| io::Error::other(format!("malformed RESP length {line:?}")))
    };
    Ok(match tag {
        b'+' => Some((Resp::Simple(line), after)),
        b'-' => Some((Resp::Error(line), after)),
        b':' => Some((Resp::Int(num()?), after)),
        b'$' => {
            let n = num()?;
            if n < 0 {
                Some((Resp::Bulk(None), after))
            } else if b.len() < after + n as usize + 2 {
                None
            } else {
                let data = b[after..after + n as usize].to_vec();
                Some((Resp::Bulk(Some(data)), after + n as usize + 2))
            }
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                return Ok(Some((Resp::Array(None), after)));
            }
            let mut items = Vec::with_capacity(n as usize);
            let mut at = after;
            for _ in 0..n {
                match parse_resp(&b[at..])? {
                    Some((v, used)) => {
                        items.push(v);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Some((Resp::Array(Some(items)), at))
        }
        other => {
            return Err(io::Error::other(format!(
                "unexpected RESP type byte {:?}",
                other as char
            )))
        }
    })
}

/// A plain-TCP (no TLS) connection to one Redis server speaking RESP2, for the
/// testkit's admin commands (cluster formation, slot moves) and for tests that want
/// raw replies. Every read and write is bounded by the timeout.
#[derive(Debug)]
pub struct RedisConn {
    stream: TcpStream,
    buf: Vec<u8>,
    timeout: Duration,
}

impl RedisConn {
    /// Connects to `addr`; `timeout` bounds the connect and every later reply.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<RedisConn> {
        Ok(RedisConn {
            stream: connect(addr, timeout)?,
            buf: Vec::new(),
            timeout,
        })
    }

    /// Sends one command and reads its whole reply. An error reply is `Ok(Resp::Error)`.
    pub fn query<A: AsRef<[u8]>>(&mut self, args: &[A]) -> io::Result<Resp> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            let a = a.as_ref();
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&req).map_err(timeout_kind)?;
        let deadline = Instant::now() + self.timeout;
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((v, used)) = parse_resp(&self.buf)? {
                self.buf.drain(..used);
                return Ok(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "reply timed out"));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the reply",
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timeout_kind(e)),
            }
        }
    }

    /// Like [`RedisConn::query`], with an error reply turned into an `io::Error`.
    pub fn query_ok<A: AsRef<[u8]>>(&mut self, args: &[A]) -> io::Result<Resp> {
        self.query(args)?.into_result()
    }

    /// A command whose reply is text (simple or bulk string), e.g. `CLUSTER NODES`.
    pub fn query_text<A: AsRef<[u8]>>(&mut self, args: &[A]) -> io::Result<String> {
        let v = self.query_ok(args)?;
        v.text()
            .ok_or_else(|| io::Error::other(format!("expected a text reply, got {v:?}")))
    }
}

/// One command on a new connection, with the whole reply parsed (see [`RedisConn`]).
pub fn redis_query<A: AsRef<[u8]>>(
    addr: SocketAddr,
    args: &[A],
    timeout: Duration,
) -> io::Result<Resp> {
    RedisConn::connect(addr, timeout)?.query(args)
}

/// The Redis Cluster hash slot of a key (CRC16/XMODEM mod 16384 of the key, or of
/// its `{hash tag}` when it has a non-empty one), as `CLUSTER KEYSLOT` computes it.
pub fn redis_key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&c| c == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_resp_replies_and_waits_for_incomplete_ones() {
        let full = b"*3\r\n$3\r\nabc\r\n*2\r\n:7\r\n$-1\r\n-ERR no\r\n+OK\r\n";
        let (v, used) = parse_resp(full).unwrap().unwrap();
        assert_eq!(
            v,
            Resp::Array(Some(vec![
                Resp::Bulk(Some(b"abc".to_vec())),
                Resp::Array(Some(vec![Resp::Int(7), Resp::Bulk(None)])),
                Resp::Error("ERR no".into()),
            ]))
        );
        assert_eq!(&full[used..], b"+OK\r\n");
        for cut in 0..used {
            assert!(parse_resp(&full[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        // Binary payloads with CRLF inside.
        let (v, _) = parse_resp(b"$4\r\n\r\n\r\n\r\n").unwrap().unwrap();
        assert_eq!(v, Resp::Bulk(Some(b"\r\n\r\n".to_vec())));
        assert_eq!(
            parse_resp(b"*-1\r\n").unwrap().unwrap().0,
            Resp::Array(None)
        );
        assert!(parse_resp(b"?x\r\n").is_err());
    }

    #[test]
    fn key_slots_follow_the_cluster_spec() {
        // Values from the Redis Cluster specification / CLUSTER KEYSLOT.
        assert_eq!(redis_key_slot(b"foo"), 12182);
        assert_eq!(redis_key_slot(b"somekey"), 11058);
        assert_eq!(
            redis_key_slot(b"{user1000}.following"),
            redis_key_slot(b"user1000")
        );
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(redis_key_slot(b"{}a"), redis_key_slot(b"{}b"));
        // Only the first `{…}` counts.
        assert_eq!(redis_key_slot(b"foo{{bar}}zap"), redis_key_slot(b"{bar"));
    }
}
