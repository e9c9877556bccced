//! HTTP/1.x framing for the API socket: request heads parsed by `httparse`, bodies framed by
//! one `Content-Length`, responses written back with `Connection: close`.
//!
//! Everything a client sends is hostile until checked: a head larger than [`MAX_HEAD`], a body
//! larger than [`MAX_BODY`] (Firecracker's default limit), a `Transfer-Encoding` (chunked bodies
//! are not accepted: a body must say its length), two `Content-Length` headers, or a length that
//! is not a plain decimal number are refused before any body is read.

use serde_json::Value;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body accepted (Firecracker's default API payload limit).
pub const MAX_BODY: usize = 51_200;
/// Most headers in one request.
const MAX_HEADERS: usize = 32;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// HTTP method, as sent (methods are case-sensitive).
    pub method: String,
    /// Request target (origin form: starts with `/`), query included.
    pub path: String,
    /// Body bytes (empty without a `Content-Length`).
    pub body: Vec<u8>,
}

/// Outcome of parsing a buffer that may hold a partial request.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete,
    /// A full request, and the number of bytes it took.
    Done(Request, usize),
    /// The bytes are not an acceptable request; the reason is for the client.
    Bad(String),
}

/// Parses one HTTP/1.x request from the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parse::Bad(format!("the request head is larger than {MAX_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Parse::Incomplete,
        Err(e) => return Parse::Bad(format!("malformed request: {e}")),
    };
    if head_len > MAX_HEAD {
        return Parse::Bad(format!("the request head is larger than {MAX_HEAD} bytes"));
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parse::Bad("malformed request line".into());
    };
    if !path.starts_with('/') {
        return Parse::Bad("the request target must be a path starting with /".into());
    }
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parse::Bad(
                "Transfer-Encoding is not supported: send the body with a Content-Length".into(),
            );
        }
        if !h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        if length.is_some() {
            return Parse::Bad("more than one Content-Length header".into());
        }
        let text = std::str::from_utf8(h.value).unwrap_or("").trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Parse::Bad("Content-Length is not a decimal number".into());
        }
        match text.parse::<usize>() {
            Ok(n) if n <= MAX_BODY => length = Some(n),
            _ => {
                return Parse::Bad(format!(
                    "the request body is larger than the limit of {MAX_BODY} bytes"
                ));
            }
        }
    }
    let len = length.unwrap_or(0);
    if buf.len() < head_len + len {
        return Parse::Incomplete;
    }
    Parse::Done(
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            body: buf[head_len..head_len + len].to_vec(),
        },
        head_len + len,
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Serialises a response with `body` as (content type, text), if any (never for 204).
fn render_as(status: u16, body: Option<(&str, &str)>) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: ebb\r\nConnection: close\r\n",
        reason(status)
    );
    match body {
        Some((kind, text)) if status != 204 => out.push_str(&format!(
            "Content-Type: {kind}\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )),
        _ if status == 204 => out.push_str("\r\n"),
        _ => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out.into_bytes()
}

/// Serialises a response: a JSON body when there is one (never for 204).
pub fn render(status: u16, body: Option<&Value>) -> Vec<u8> {
    let text = body.map(Value::to_string);
    render_as(status, text.as_deref().map(|t| ("application/json", t)))
}

/// Serialises a response with a plain text body (OpenMetrics text).
pub fn render_text(status: u16, text: &str) -> Vec<u8> {
    render_as(
        status,
        Some((
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> Request {
        match parse_request(buf) {
            Parse::Done(r, n) => {
                assert_eq!(n, buf.len());
                r
            }
            other => panic!("not parsed: {other:?}"),
        }
    }

    #[test]
    fn parses_complete_and_partial_requests() {
        assert_eq!(
            parse_request(b"GET /balloon HTTP/1.1\r\nHost: x"),
            Parse::Incomplete
        );
        let r = done(b"GET /balloon/statistics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/balloon/statistics")
        );
        let req = b"PATCH /balloon HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}";
        assert_eq!(parse_request(req), Parse::Incomplete);
        let r = done(b"PATCH /balloon HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}");
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn refuses_hostile_heads() {
        for bad in [
            &b"\xff\xfe\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"GET / SPDY/3\r\n\r\n",
            b"GET / HTTP/1.1\r\nnocolon\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 51201\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            b"PUT / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 3\r\n\r\n{}",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        ] {
            assert!(matches!(parse_request(bad), Parse::Bad(_)), "{bad:?}");
        }
        // A head that never ends is refused once it is too large, not buffered forever.
        let mut long = b"GET / HTTP/1.1\r\n".to_vec();
        while long.len() <= MAX_HEAD {
            long.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(parse_request(&long), Parse::Bad(_)));
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse_request(req.as_bytes()), Parse::Bad(_)));
    }

    #[test]
    fn the_body_is_exactly_the_content_length() {
        let r = done(b"PUT /actions HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde");
        assert_eq!(r.body, b"abcde");
        // Bytes after the body are the next request's, not this one's.
        let head = b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\n\r\n";
        match parse_request(&[&head[..], b"abGET"].concat()) {
            Parse::Done(r, n) => assert_eq!((r.body.as_slice(), n), (&b"a"[..], head.len() + 1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn renders_json_and_empty_replies() {
        let text = String::from_utf8(render(200, Some(&serde_json::json!({"a": 1})))).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 7\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"a\":1}"), "{text}");
        let text = String::from_utf8(render(204, None)).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
        assert!(!text.contains("Content-Length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    proptest::proptest! {
        /// Any bytes at all: the parser answers, never panics, never claims more bytes than it
        /// was given, and never hands out a body larger than the limit.
        #[test]
        fn any_bytes_get_an_answer(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            match parse_request(&buf) {
                Parse::Done(r, n) => {
                    proptest::prop_assert!(n <= buf.len());
                    proptest::prop_assert!(r.body.len() <= MAX_BODY);
                    proptest::prop_assert!(r.path.starts_with('/'));
                }
                Parse::Incomplete => proptest::prop_assert!(buf.len() <= MAX_HEAD + MAX_BODY),
                Parse::Bad(_) => {}
            }
        }

        /// A well-formed request with any body cut anywhere: incomplete until the last byte, then
        /// exactly that request.
        #[test]
        fn a_request_cut_anywhere_is_incomplete_until_whole(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            cut in 0usize..600,
        ) {
            let mut req = format!("PATCH /balloon HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            req.extend_from_slice(&body);
            let cut = cut.min(req.len());
            match parse_request(&req[..cut]) {
                Parse::Incomplete => proptest::prop_assert!(cut < req.len()),
                Parse::Done(r, n) => {
                    proptest::prop_assert_eq!(cut, req.len());
                    proptest::prop_assert_eq!(n, req.len());
                    proptest::prop_assert_eq!(r.body, body);
                }
                Parse::Bad(why) => proptest::prop_assert!(false, "refused: {}", why),
            }
        }
    }
}
