//! `ebb-ctl`: a small client for ebb's API socket, for shells without curl.
//!
//! ```text
//! ebb-ctl --api-sock PATH METHOD URL-PATH [JSON-BODY]
//! ebb-ctl --api-sock /tmp/ebb.sock GET /balloon
//! ebb-ctl --api-sock /tmp/ebb.sock PUT /balloon '{"target_mib":128}'
//! ```
//!
//! Prints the response body. Exit status: 0 for a 2xx answer, 2 when the socket cannot be
//! reached, 1 for anything else (another status, a malformed reply, bad usage).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: ebb-ctl --api-sock PATH METHOD PATH [BODY]";
/// Longest wait for an answer; ebb answers from its event loop, normally within milliseconds.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest reply read (ebb's replies are a few KiB).
const MAX_REPLY: u64 = 4 << 20;

struct Args {
    sock: String,
    method: String,
    path: String,
    body: String,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut sock = None;
    let mut rest = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--api-sock" => sock = Some(it.next().ok_or("--api-sock needs a path")?),
            "-h" | "--help" => return Err(String::new()),
            _ => match a.strip_prefix("--api-sock=") {
                Some(p) => sock = Some(p.to_owned()),
                None => rest.push(a),
            },
        }
    }
    let sock = sock.ok_or("--api-sock is required")?;
    let mut rest = rest.into_iter();
    let method = rest.next().ok_or("no method given")?.to_ascii_uppercase();
    let path = rest.next().ok_or("no path given")?;
    let body = rest.next().unwrap_or_default();
    if rest.next().is_some() {
        return Err("too many arguments (quote the JSON body)".into());
    }
    if !method.bytes().all(|b| b.is_ascii_uppercase()) || method.is_empty() {
        return Err(format!("bad method {method:?}"));
    }
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
        return Err(format!(
            "bad path {path:?}: it must start with / and hold no spaces"
        ));
    }
    Ok(Args {
        sock,
        method,
        path,
        body,
    })
}

/// Splits an HTTP/1.x reply into status and body.
fn parse_reply(reply: &[u8]) -> Option<(u16, &[u8])> {
    let head_end = reply.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&reply[..head_end]).ok()?;
    let status_line = head.split("\r\n").next()?;
    let mut parts = status_line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some((status, &reply[head_end + 4..]))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("ebb-ctl: {why}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(1);
        }
    };
    let mut stream = match UnixStream::connect(&args.sock) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ebb-ctl: cannot connect to {}: {e}", args.sock);
            return ExitCode::from(2);
        }
    };
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let request = format!(
        "{} {} HTTP/1.1\r\nHost: ebb\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        args.method,
        args.path,
        args.body.len(),
        args.body
    );
    if let Err(e) = stream.write_all(request.as_bytes()) {
        eprintln!("ebb-ctl: cannot send the request: {e}");
        return ExitCode::from(2);
    }
    let mut reply = Vec::new();
    if let Err(e) = (&mut stream).take(MAX_REPLY).read_to_end(&mut reply) {
        eprintln!("ebb-ctl: no complete answer: {e}");
        return ExitCode::from(1);
    }
    let Some((status, body)) = parse_reply(&reply) else {
        eprintln!("ebb-ctl: malformed answer ({} bytes)", reply.len());
        return ExitCode::from(1);
    };
    let mut out = std::io::stdout();
    let _ = out.write_all(body);
    let _ = out.write_all(b"\n");
    if (200..300).contains(&status) {
        ExitCode::SUCCESS
    } else {
        eprintln!("ebb-ctl: HTTP {status}");
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let a = args(&["--api-sock", "/s", "put", "/balloon", "{}"]).unwrap();
        assert_eq!((a.sock.as_str(), a.method.as_str()), ("/s", "PUT"));
        assert_eq!((a.path.as_str(), a.body.as_str()), ("/balloon", "{}"));
        let a = args(&["GET", "/vm", "--api-sock=/x"]).unwrap();
        assert_eq!(a.sock, "/x");
        assert!(a.body.is_empty());
        for bad in [
            &["GET", "/vm"][..],
            &["--api-sock", "/s", "GET"],
            &["--api-sock", "/s", "GET", "vm"],
            &["--api-sock", "/s", "GET", "/a b"],
            &["--api-sock", "/s", "G T", "/vm"],
            &["--api-sock", "/s", "GET", "/vm", "{}", "extra"],
            &["--api-sock"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies() {
        let r = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_reply(r), Some((400, &b"{}"[..])));
        assert_eq!(parse_reply(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(parse_reply(b"SPDY 200\r\n\r\n"), None);
        assert_eq!(parse_reply(b"HTTP/1.1 abc\r\n\r\n"), None);
    }
}
