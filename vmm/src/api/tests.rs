use std::os::unix::fs::PermissionsExt;

use event_manager::{EventManager, SubscriberOps};

use super::*;

struct Echo;
impl ApiHandler for Echo {
    fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> ApiResponse {
        match (method, path) {
            ("GET", "/") => ApiResponse::ok(serde_json::json!({"n": body.len()})),
            ("PUT", "/x") => ApiResponse::no_content(),
            _ => ApiResponse::unknown(method, path),
        }
    }
}

/// Sends `raw` on a fresh connection and returns everything the server wrote back (empty if
/// the server reset the connection: it answers a connection beyond its limit without reading).
fn send(path: &Path, raw: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    let mut out = String::new();
    let _ = s
        .write_all(raw)
        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
        .and_then(|()| s.read_to_string(&mut out));
    out
}

/// Runs a server on a fresh socket while `client` runs; returns what it returned.
fn with_server<T: Send + 'static>(client: impl FnOnce(PathBuf) -> T + Send + 'static) -> T {
    let path = std::env::temp_dir().join(format!(
        "ebb-api-{}-{:?}.sock",
        std::process::id(),
        std::thread::current().id()
    ));
    let server = ApiServer::bind(&path, Box::new(Echo)).unwrap();
    let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new().unwrap();
    em.add_subscriber(Box::new(server));
    let p2 = path.clone();
    let client = std::thread::spawn(move || client(p2));
    while !client.is_finished() {
        em.run_with_timeout(20).unwrap();
    }
    let out = client.join().unwrap();
    drop(em);
    assert!(!path.exists(), "socket file removed on drop");
    out
}

#[test]
fn serves_good_requests_and_refuses_bad_ones_over_a_real_socket() {
    let (good, empty, bad, unknown, get_body, empty_put) = with_server(|p| {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "only ebb's user may drive the socket");
        (
            send(&p, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            send(&p, b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            send(&p, b"\x00\x01garbage\r\n\r\n"),
            send(&p, b"GET /nope/deeper HTTP/1.1\r\n\r\n"),
            send(&p, b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            send(&p, b"PUT /x HTTP/1.1\r\n\r\n"),
        )
    });
    assert!(good.starts_with("HTTP/1.1 200"), "{good}");
    assert!(good.ends_with("{\"n\":0}"), "{good}");
    assert!(empty.starts_with("HTTP/1.1 204"), "{empty}");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    assert!(bad.contains("fault_message"), "{bad}");
    assert!(unknown.starts_with("HTTP/1.1 400"), "{unknown}");
    assert!(
        unknown.contains("Invalid request method and/or path: GET nope."),
        "{unknown}"
    );
    assert!(
        get_body.contains("GET request cannot have a body."),
        "{get_body}"
    );
    assert!(empty_put.contains("Empty PUT request."), "{empty_put}");
}

#[test]
fn a_client_that_stops_half_way_gets_nothing_and_the_next_one_is_served() {
    let (cut, next) = with_server(|p| {
        (
            send(&p, b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"),
            send(&p, b"GET / HTTP/1.1\r\n\r\n"),
        )
    });
    assert!(cut.is_empty(), "{cut}");
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
}

#[test]
fn slow_and_surplus_connections_do_not_stop_the_server() {
    let (busy, served) = with_server(|p| {
        // Ten silent clients take every slot; the eleventh is told 503 and closed.
        let silent: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&p).unwrap())
            .collect();
        // The server accepts pending connections in order, so the next one is the eleventh.
        // (It is answered without being read: a client that had sent a request may see its
        // connection reset instead, so this one only listens.)
        let mut busy = String::new();
        UnixStream::connect(&p)
            .unwrap()
            .read_to_string(&mut busy)
            .unwrap();
        drop(silent);
        // Once they hang up, requests are served again.
        let mut served = String::new();
        for _ in 0..100 {
            served = send(&p, b"GET / HTTP/1.1\r\n\r\n");
            if served.starts_with("HTTP/1.1 200") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        (busy, served)
    });
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
}

#[test]
fn an_oversized_body_is_refused_before_it_is_read() {
    let big = with_server(|p| {
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 999999\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert!(big.starts_with("HTTP/1.1 400"), "{big}");
    assert!(big.contains("larger than the limit"), "{big}");
}

#[test]
fn precheck_follows_firecrackers_order() {
    assert!(precheck("GET", "/balloon", b"").is_none());
    assert!(precheck("PATCH", "/balloon/hinting/stop", b"").is_none());
    assert_eq!(
        precheck("PATCH", "/balloon", b"").unwrap().fault_message(),
        Some("Empty PATCH request.")
    );
    let r = ApiResponse::unknown("DELETE", "/balloon/statistics");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.fault_message(),
        Some("Invalid request method and/or path: DELETE balloon.")
    );
    let e = parse_body::<serde_json::Value>(b"{oops").unwrap_err();
    assert!(
        e.fault_message()
            .unwrap()
            .starts_with("An error occurred when deserializing the json body of a request: ")
    );
}
