//! Hand-written HTTP/1.1 GETs over plain TCP, for the tasks' checks of Klaus's plain-HTTP port and the
//! admin ports: so few requests that an HTTP client crate would cost xtask more than it saves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;

/// The status code of `GET path`, or `None` when nothing answers within a few hundred
/// milliseconds. Reads no further than the status line: `bench` polls readiness with it every
/// millisecond.
pub(crate) fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while head.len() < 12 {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()
}

/// An HTTP response, as much of it as the checks read.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) body: String,
}

/// A minimal HTTP/1.1 GET over a plain TCP connection (Klaus's port and the admin ports are plain
/// HTTP): connect within 1 s, the whole answer within 5 s.
pub(crate) fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("the response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the response has no end of headers")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("the response has no status line")?;
    let mut content_type = String::new();
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-type") {
            content_type = value.to_owned();
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(Reply {
        status,
        content_type,
        body,
    })
}

/// Decodes a chunked body.
fn dechunk(mut rest: &str) -> anyhow::Result<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .context("a chunk has no size line")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("a chunk size is not hexadecimal")?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = after
            .get(..size)
            .context("a chunk is shorter than its size")?;
        body.push_str(chunk);
        rest = after
            .get(size + 2..)
            .context("a chunk does not end with CRLF")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_is_joined() {
        let body = dechunk("5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n").expect("valid chunks");
        assert_eq!(body, "hello world");
    }

    #[test]
    fn a_short_chunk_is_refused() {
        assert!(dechunk("a\r\nhello\r\n0\r\n\r\n").is_err());
    }
}
