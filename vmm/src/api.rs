//! The API socket: HTTP/1.1 over a Unix socket, one request per connection, JSON bodies.
//!
//! `GET /` or `GET /vm` answers the VM's status. Other endpoints (the balloon) plug in
//! through [`ApiHandler`]. Requests are read without blocking the event loop; malformed or
//! oversized requests get a 400 and the connection is closed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

/// Largest request (head and body) ebb accepts.
const MAX_REQUEST: usize = 64 * 1024;
/// Most connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent a whole request by then is dropped when a new one arrives.
const IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the API socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket failed.
    #[error("cannot listen on API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// A reply: HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: serde_json::Value,
}

impl ApiResponse {
    /// 200 with `body`.
    pub fn ok(body: serde_json::Value) -> Self {
        ApiResponse { status: 200, body }
    }

    /// An error status with a message.
    pub fn error(status: u16, message: &str) -> Self {
        ApiResponse {
            status,
            body: serde_json::json!({ "error": message }),
        }
    }
}

/// Answers parsed requests.
pub trait ApiHandler: Send {
    /// Handles one request; `body` is at most 64 KiB.
    fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> ApiResponse;
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Outcome of parsing a buffer that may hold a partial request.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete,
    /// A full request.
    Done(Request),
    /// The bytes are not an acceptable request.
    Bad(&'static str),
}

/// Parses one HTTP/1.x request from `buf`.
pub fn parse_request(buf: &[u8]) -> Parse {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_REQUEST {
            Parse::Bad("request head too large")
        } else {
            Parse::Incomplete
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return Parse::Bad("request head is not UTF-8");
    };
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Parse::Bad("malformed request line");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Parse::Bad("malformed request line");
    }
    let mut content_length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parse::Bad("malformed header");
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            match value.trim().parse::<usize>() {
                Ok(n) if n <= MAX_REQUEST => content_length = n,
                _ => return Parse::Bad("bad Content-Length"),
            }
        }
    }
    let body_start = head_end + 4;
    if buf.len() < body_start + content_length {
        return Parse::Incomplete;
    }
    let path = target.split('?').next().unwrap_or(target).to_owned();
    Parse::Done(Request {
        method: method.to_owned(),
        path,
        body: buf[body_start..body_start + content_length].to_vec(),
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Serialises a response.
pub fn render(resp: &ApiResponse) -> Vec<u8> {
    let body = resp.body.to_string();
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        resp.status,
        reason(resp.status),
        body.len(),
        body
    )
    .into_bytes()
}

/// The listening socket and its open connections.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<i32, (UnixStream, Vec<u8>, std::time::Instant)>,
    handler: Box<dyn ApiHandler>,
}

impl ApiServer {
    /// Binds `path` (an existing socket file there is replaced).
    pub fn bind(path: &Path, handler: Box<dyn ApiHandler>) -> Result<Self, ApiError> {
        if std::fs::symlink_metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false)
        {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|e| ApiError::Bind(path.to_owned(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiError::Bind(path.to_owned(), e))?;
        Ok(ApiServer {
            path: path.to_owned(),
            listener,
            conns: HashMap::new(),
            handler,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        // Slow or silent clients must not hold the slots forever.
        let stale: Vec<i32> = self
            .conns
            .iter()
            .filter(|(_, (_, _, since))| since.elapsed() > IDLE_LIMIT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            if let Some((stream, _, _)) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::new(&stream, EventSet::IN));
            }
        }
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.conns
                    .insert(fd, (stream, Vec::new(), std::time::Instant::now()));
            }
        }
    }

    fn serve(&mut self, fd: i32, ops: &mut EventOps) {
        let Some((stream, buf, _)) = self.conns.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if buf.len() > MAX_REQUEST * 2 {
                break;
            }
        }
        let reply = match parse_request(buf) {
            Parse::Incomplete if !closed => return,
            Parse::Incomplete => None,
            Parse::Bad(why) => Some(ApiResponse::error(400, why)),
            Parse::Done(req) => Some(self.handler.handle(&req.method, &req.path, &req.body)),
        };
        if let Some((stream, _, _)) = self.conns.remove(&fd) {
            let _ = ops.remove(Events::new(&stream, EventSet::IN));
            if let Some(reply) = reply {
                // The client may be gone; nothing to do about it.
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(500)));
                let _ = (&stream).write_all(&render(&reply));
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(events.fd(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("cannot watch the API socket: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_complete_and_partial_requests() {
        assert_eq!(
            parse_request(b"GET /vm HTTP/1.1\r\nHost: x"),
            Parse::Incomplete
        );
        let Parse::Done(r) = parse_request(b"GET /vm?x=1 HTTP/1.1\r\nHost: x\r\n\r\n") else {
            panic!("not parsed")
        };
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/vm"));
        let req = b"PATCH /balloon HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}";
        assert_eq!(parse_request(req), Parse::Incomplete);
        let req = b"PATCH /balloon HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}";
        let Parse::Done(r) = parse_request(req) else {
            panic!("not parsed")
        };
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            &b"\xff\xfe\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"GET / SPDY/3\r\n\r\n",
            b"GET / HTTP/1.1\r\nnocolon\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert!(matches!(parse_request(bad), Parse::Bad(_)), "{bad:?}");
        }
        assert!(matches!(
            parse_request(&vec![b'a'; MAX_REQUEST]),
            Parse::Bad(_)
        ));
    }

    struct Fixed;
    impl ApiHandler for Fixed {
        fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> ApiResponse {
            ApiResponse::ok(serde_json::json!({"m": method, "p": path, "n": body.len()}))
        }
    }

    #[test]
    fn serves_over_a_real_socket() {
        use event_manager::{EventManager, SubscriberOps};
        let path = std::env::temp_dir().join(format!("ebb-api-{}.sock", std::process::id()));
        let server = ApiServer::bind(&path, Box::new(Fixed)).unwrap();
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new().unwrap();
        em.add_subscriber(Box::new(server));
        let p2 = path.clone();
        let client = std::thread::spawn(move || {
            let mut good = UnixStream::connect(&p2).unwrap();
            good.write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut reply = String::new();
            good.read_to_string(&mut reply).unwrap();
            let mut bad = UnixStream::connect(&p2).unwrap();
            bad.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
            let mut reply_bad = String::new();
            bad.read_to_string(&mut reply_bad).unwrap();
            (reply, reply_bad)
        });
        while !client.is_finished() {
            em.run_with_timeout(50).unwrap();
        }
        let (reply, reply_bad) = client.join().unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("\"p\":\"/vm\""), "{reply}");
        assert!(reply_bad.starts_with("HTTP/1.1 400"), "{reply_bad}");
        drop(em);
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn renders_json() {
        let out = render(&ApiResponse::ok(serde_json::json!({"state": "running"})));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.ends_with("{\"state\":\"running\"}"));
    }
}
