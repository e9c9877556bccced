//! The API socket: HTTP/1.1 over a Unix socket, one request per connection, JSON bodies,
//! answered on the event loop. The request rules and error replies are Firecracker's
//! (docs/API.md): every refusal is a status with `{"fault_message": "..."}`, unknown paths and
//! methods included (400, as Firecracker answers them).
//!
//! `GET /` answers the instance information; the other endpoints plug in through
//! [`ApiHandler`]. Requests are read without blocking the event loop; malformed, oversized or
//! too slow requests get a 400 (or are dropped) and the connection is closed.

pub mod http;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::Serialize;
use serde::de::DeserializeOwned;

use self::http::{MAX_BODY, MAX_HEAD, Parse, parse_request, render};

/// Most connections served at once (Firecracker's limit); one more is answered 503 and closed.
const MAX_CONNECTIONS: usize = 10;
/// A connection that has not sent a whole request by then is dropped when another arrives.
const IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Refusal of a request made before the guest runs, when it needs a running guest.
pub const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
/// Refusal of a request made once the guest runs, when it only makes sense before.
pub const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

/// Why the API socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket failed.
    #[error("cannot listen on API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// A reply: HTTP status and, unless it is a 204, a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// JSON body (none for 204).
    pub body: Option<serde_json::Value>,
    /// A plain text body instead (`GET /metrics`).
    pub text: Option<String>,
}

impl ApiResponse {
    /// 200 with `body`.
    pub fn ok(body: serde_json::Value) -> Self {
        ApiResponse {
            status: 200,
            body: Some(body),
            text: None,
        }
    }

    /// 200 with `value` serialised (a value that cannot be is a 500, which is a bug).
    pub fn json<T: Serialize>(value: &T) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => Self::ok(v),
            Err(e) => Self::error(500, &format!("cannot serialise the reply: {e}")),
        }
    }

    /// 204, no body: the request was carried out.
    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: None,
            text: None,
        }
    }

    /// A refusal: `status` with `{"fault_message": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        ApiResponse {
            status,
            body: Some(serde_json::json!({ "fault_message": message })),
            text: None,
        }
    }

    /// 200 with a plain text body (OpenMetrics text for `GET /metrics`).
    pub fn text(text: String) -> Self {
        ApiResponse {
            status: 200,
            body: None,
            text: Some(text),
        }
    }

    /// A refusal with status 400, the status Firecracker gives every refused request.
    pub fn fault(message: &str) -> Self {
        Self::error(400, message)
    }

    /// The refusal of a method and path nothing serves (Firecracker's wording: 400, naming the
    /// method and the path's first segment).
    pub fn unknown(method: &str, path: &str) -> Self {
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        Self::fault(&format!(
            "Invalid request method and/or path: {method} {first}."
        ))
    }

    /// The fault message, if this is a refusal.
    pub fn fault_message(&self) -> Option<&str> {
        self.body.as_ref()?.get("fault_message")?.as_str()
    }
}

/// Parses a JSON request body into `T`, or the 400 Firecracker gives a body it cannot read.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiResponse> {
    serde_json::from_slice(body).map_err(|e| {
        ApiResponse::fault(&format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// The checks every request meets before its handler (Firecracker's order): a GET has no body,
/// a PUT or PATCH has one (the hinting endpoints excepted: their body is optional).
pub fn precheck(method: &str, path: &str, body: &[u8]) -> Option<ApiResponse> {
    match method {
        "GET" if !body.is_empty() => Some(ApiResponse::fault("GET request cannot have a body.")),
        "PUT" if body.is_empty() => Some(ApiResponse::fault("Empty PUT request.")),
        "PATCH" if body.is_empty() && !path.starts_with("/balloon/hinting/") => {
            Some(ApiResponse::fault("Empty PATCH request."))
        }
        _ => None,
    }
}

/// Answers parsed requests.
pub trait ApiHandler: Send {
    /// Handles one request; `body` is at most [`MAX_BODY`] bytes.
    fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> ApiResponse;

    /// This handler's part of `GET /memory`, as (key, figures); none by default.
    fn memory_figures(&mut self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
}

/// The bound API socket; dropping it removes the socket file. It outlives one server: the
/// configuration before start hands it to the running VM's server, so a client never finds the
/// socket missing in between.
pub struct ApiListener {
    path: PathBuf,
    listener: UnixListener,
}

impl ApiListener {
    /// Binds `path` (an existing socket file there is replaced) with mode 0600: only the
    /// user ebb runs as may drive it.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if std::fs::symlink_metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false)
        {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|e| ApiError::Bind(path.to_owned(), e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ApiError::Bind(path.to_owned(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiError::Bind(path.to_owned(), e))?;
        Ok(ApiListener {
            path: path.to_owned(),
            listener,
        })
    }
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The listening socket and its open connections.
pub struct ApiServer {
    sock: ApiListener,
    conns: HashMap<i32, (UnixStream, Vec<u8>, std::time::Instant)>,
    handler: Box<dyn ApiHandler>,
}

impl ApiServer {
    /// Binds `path` (see [`ApiListener::bind`]) and serves it with `handler`.
    pub fn bind(path: &Path, handler: Box<dyn ApiHandler>) -> Result<Self, ApiError> {
        Ok(Self::serve(ApiListener::bind(path)?, handler))
    }

    /// Serves an already bound socket with `handler`.
    pub fn serve(sock: ApiListener, handler: Box<dyn ApiHandler>) -> Self {
        ApiServer {
            sock,
            conns: HashMap::new(),
            handler,
        }
    }

    /// Stops serving: open connections are closed, the socket stays bound.
    pub fn into_listener(self) -> ApiListener {
        self.sock
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
        while let Ok((stream, _)) = self.sock.listener.accept() {
            if self.conns.len() >= MAX_CONNECTIONS {
                reply(
                    &stream,
                    &ApiResponse::error(503, "Too many open connections."),
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.conns
                    .insert(fd, (stream, Vec::new(), std::time::Instant::now()));
            }
        }
    }

    fn serve_conn(&mut self, fd: i32, ops: &mut EventOps) {
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
            // One request per connection: more than a whole one is not read.
            if buf.len() > MAX_HEAD + MAX_BODY {
                break;
            }
        }
        let answer = match parse_request(buf) {
            Parse::Incomplete if !closed && buf.len() <= MAX_HEAD + MAX_BODY => return,
            Parse::Incomplete => None,
            Parse::Bad(why) => Some(ApiResponse::fault(&why)),
            Parse::Done(req, _) => Some(
                precheck(&req.method, &req.path, &req.body)
                    .unwrap_or_else(|| self.handler.handle(&req.method, &req.path, &req.body)),
            ),
        };
        if let Some((stream, _, _)) = self.conns.remove(&fd) {
            let _ = ops.remove(Events::new(&stream, EventSet::IN));
            if let Some(answer) = answer {
                reply(&stream, &answer);
            }
        }
    }
}

/// Writes `answer` to a client that may be gone or slow (at most 500 ms).
fn reply(stream: &UnixStream, answer: &ApiResponse) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(500)));
    let mut s = stream;
    let bytes = match &answer.text {
        Some(t) => http::render_text(answer.status, t),
        None => render(answer.status, answer.body.as_ref()),
    };
    let _ = s.write_all(&bytes);
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.sock.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve_conn(events.fd(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.sock.listener, EventSet::IN)) {
            log::error!("cannot watch the API socket: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests;
