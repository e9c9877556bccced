//! `ebb-hostile SOCKET SECONDS`: a hostile API client for the rig. For SECONDS it keeps opening
//! connections to ebb's API socket that misbehave: some say nothing, some send a request one
//! byte at a time, some send garbage, oversized bodies, chunked bodies or two Content-Lengths,
//! and some hang up half way. It never sends a well-formed request, so nothing it sends may
//! change ebb. At the end it prints one line,
//! `EBB-HOSTILE label=done connections=N answered=N status_4xx=N status_503=N closed=N errors=N`,
//! and exits 0 (its own failures to connect are counted, not fatal: ebb may refuse it).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    answered: AtomicU64,
    status_4xx: AtomicU64,
    status_503: AtomicU64,
    closed: AtomicU64,
    errors: AtomicU64,
}

/// The misbehaviours, in turn.
const KINDS: u64 = 7;

/// Sends one misbehaving request of `kind` and reads what comes back.
fn one(path: &str, kind: u64, seed: u64, t: &Tally) {
    let Ok(mut s) = UnixStream::connect(path) else {
        t.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    t.connections.fetch_add(1, Ordering::Relaxed);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let sent = match kind {
        // Silent: says nothing until ebb drops it.
        0 => Ok(()),
        // Slow: a request, one byte every 50 ms, never finished.
        1 => {
            let req = b"PATCH /balloon HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"amount_m";
            req.iter().try_for_each(|b| {
                std::thread::sleep(Duration::from_millis(50));
                s.write_all(&[*b])
            })
        }
        // Garbage bytes, then an empty line.
        2 => {
            let mut x = seed | 1;
            let junk: Vec<u8> = (0..512)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x & 0xff) as u8
                })
                .collect();
            s.write_all(&junk).and_then(|()| s.write_all(b"\r\n\r\n"))
        }
        // A body far over the limit.
        3 => s
            .write_all(b"PATCH /balloon HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n")
            .and_then(|()| s.write_all(&vec![b'9'; 256 * 1024])),
        // Chunked.
        4 => s.write_all(
            b"PATCH /balloon HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n{\"amount_mib\":64}\r\n0\r\n\r\n",
        ),
        // Two Content-Lengths that disagree.
        5 => s.write_all(
            b"PATCH /balloon HTTP/1.1\r\nContent-Length: 17\r\nContent-Length: 2\r\n\r\n{\"amount_mib\":64}",
        ),
        // Half a request, then gone.
        _ => s.write_all(b"PATCH /balloon HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"amo"),
    };
    if kind == 6 || sent.is_err() {
        t.closed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) if reply.is_empty() => {
            t.closed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {
            t.answered.fetch_add(1, Ordering::Relaxed);
            let text = String::from_utf8_lossy(&reply);
            if text.starts_with("HTTP/1.1 503") {
                t.status_503.fetch_add(1, Ordering::Relaxed);
            } else if text.starts_with("HTTP/1.1 4") {
                t.status_4xx.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(_) => {
            t.closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(secs)) = (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok()))
    else {
        eprintln!("usage: ebb-hostile SOCKET SECONDS");
        std::process::exit(2);
    };
    let tally = Arc::new(Tally::default());
    let end = Instant::now() + Duration::from_secs(secs);
    // Four clients at a time: ebb serves ten connections, so well-behaved clients still get in.
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (path, tally) = (path.clone(), tally.clone());
            std::thread::spawn(move || {
                let mut n = w;
                while Instant::now() < end {
                    one(
                        &path,
                        n % KINDS,
                        n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        &tally,
                    );
                    n += 4;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "EBB-HOSTILE label=done connections={} answered={} status_4xx={} status_503={} closed={} errors={}",
        l(&tally.connections),
        l(&tally.answered),
        l(&tally.status_4xx),
        l(&tally.status_503),
        l(&tally.closed),
        l(&tally.errors)
    );
}
