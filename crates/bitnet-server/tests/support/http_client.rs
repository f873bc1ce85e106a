//! A minimal HTTP/1.1 client over a raw TCP stream, shared by the socket tests and the load tool
//! (`examples/loadtest.rs` includes this file). Raw, so that it can send what a well-behaved
//! client library would not: malformed or oversized bodies, and streams abandoned midway.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A whole response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, chunked transfer-encoding already decoded.
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }

    /// The `data:` payloads of a server-sent-event body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        sse_data(&self.text())
    }
}

/// The `data:` payloads of a server-sent-event text.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> =
                event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The request head, with `Connection: close` so that the response ends at EOF.
fn request_head(method: &str, path: &str, headers: &[(&str, &str)], body_len: Option<usize>) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(n) = body_len {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Sends one request and reads the whole response. The body is written by a separate task while
/// the response is read, so a server that answers before reading it all (413) is still heard.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let mut message = request_head(method, path, headers, Some(body.len())).into_bytes();
    message.extend_from_slice(body);
    let write = tokio::spawn(async move {
        // A server that refuses the body may close before it is all sent: not an error here.
        let _ = writer.write_all(&message).await;
        writer
    });
    let mut raw = Vec::new();
    let read_result = reader.read_to_end(&mut raw).await;
    let _writer = write.await;
    match read_result {
        Ok(_) => {}
        // The server may reset a connection whose body it did not read; what arrived before counts.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_response(&raw)
}

/// Sends `body` with chunked transfer-encoding (no Content-Length) and reads the response.
pub async fn request_chunked(addr: SocketAddr, path: &str, body: &[u8]) -> io::Result<HttpResponse> {
    let stream = TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    let head = request_head(
        "POST",
        path,
        &[("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")],
        None,
    );
    let mut message = head.into_bytes();
    for chunk in body.chunks(8192) {
        message.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        message.extend_from_slice(chunk);
        message.extend_from_slice(b"\r\n");
    }
    message.extend_from_slice(b"0\r\n\r\n");
    let write = tokio::spawn(async move {
        let _ = writer.write_all(&message).await;
        writer
    });
    let mut raw = Vec::new();
    let read_result = reader.read_to_end(&mut raw).await;
    let _writer = write.await;
    match read_result {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_response(&raw)
}

/// Posts JSON and returns the open connection once the response head and the first `min_events`
/// server-sent events have arrived, with the text read so far. Dropping the stream disconnects.
pub async fn open_stream(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    min_events: usize,
    timeout: Duration,
) -> io::Result<(u16, TcpStream, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut message = request_head("POST", path, headers, Some(body.len())).into_bytes();
    message.extend_from_slice(body);
    stream.write_all(&message).await?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let status = parse_status(&text)?;
            if status != 200 || sse_data(&text[head_end + 4..]).len() >= min_events {
                return Ok((status, stream, text));
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no events in time"))??;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("stream ended: {text}")));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

fn parse_status(text: &str) -> io::Result<u16> {
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no status line in {text:?}")))
}

/// Splits a raw response into status, headers and decoded body.
pub fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid(format!("no response head in {} bytes", raw.len())))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = parse_status(&head)?;
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = &raw[head_end + 4..];
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { decode_chunked(body).map_err(invalid)? } else { body.to_vec() };
    Ok(HttpResponse { status, headers, body })
}

fn decode_chunked(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}
