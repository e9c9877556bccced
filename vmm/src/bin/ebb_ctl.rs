//! `ebb-ctl`: a client for ebb's API socket (docs/API.md), for people (tables, a progress bar)
//! and for scripts (`--json`, raw requests, exit codes: 0 on success, 2 when it cannot connect,
//! 1 otherwise).
//!
//! ```text
//! ebb-ctl --api-sock S balloon set 256MiB --wait   # PATCH /balloon, then follow the driver
//! ebb-ctl --api-sock S balloon stats               # GET /balloon/statistics as a table
//! ebb-ctl --api-sock S memory                      # GET /memory as a table
//! ebb-ctl --api-sock S GET /balloon                # any request; prints the body
//! ebb-ctl --api-sock S PATCH /balloon '{"amount_mib":64}'
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::Value;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_REPLY: u64 = 4 << 20;

#[derive(Debug, Parser)]
#[command(name = "ebb-ctl", version, about = "Drive ebb over its API socket")]
struct Cli {
    /// ebb's API socket (ebb --api-sock).
    #[arg(long = "api-sock", global = true)]
    api_sock: Option<PathBuf>,
    /// Print the answers' JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Send GET PATH and print the answer's body.
    #[command(alias = "GET")]
    Get {
        /// Path, e.g. /balloon.
        path: String,
    },
    /// Send PUT PATH BODY and print the answer's body.
    #[command(alias = "PUT")]
    Put {
        /// Path, e.g. /actions.
        path: String,
        /// JSON body.
        body: Option<String>,
    },
    /// Send PATCH PATH BODY and print the answer's body.
    #[command(alias = "PATCH")]
    Patch {
        /// Path, e.g. /balloon.
        path: String,
        /// JSON body.
        body: Option<String>,
    },
    /// The balloon.
    #[command(subcommand)]
    Balloon(BalloonCmd),
    /// ebb's memory figures: guest-mm's tables, the host's and KVM's, the balloon.
    Memory,
}

#[derive(Debug, Subcommand)]
enum BalloonCmd {
    /// Set the balloon's target (its size): 256MiB, 1GiB, or MiB as a plain number.
    Set {
        /// The target.
        size: String,
        /// Follow the guest's driver until it holds the target, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
    /// The balloon's configuration and sizes.
    Show,
    /// The guest's last statistics (each read also asks the guest for fresh ones).
    Stats,
}

/// Why a command failed, and the exit code it means.
#[derive(Debug)]
enum Failure {
    /// The socket could not be reached (exit 2).
    Connect(String),
    /// Anything else (exit 1).
    Other(String),
}

/// Parses a size: a plain number is MiB; `M`, `MiB`, `G`, `GiB` suffixes (any case).
fn parse_mib(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 256MiB, 1GiB, 512)"))?;
    let per = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(format!("{text:?}: the unit must be MiB or GiB")),
    };
    n.checked_mul(per)
        .filter(|&m| m <= u64::from(u32::MAX))
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Splits an answer into status and body (httparse for the head; the body is what follows it,
/// as long as its Content-Length says, if it says).
fn parse_reply(reply: &[u8]) -> Option<(u16, &[u8])> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut r = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = r.parse(reply).ok()? else {
        return None;
    };
    let status = r.code?;
    let body = &reply[head..];
    let len = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    match len {
        Some(n) if n <= body.len() => Some((status, &body[..n])),
        Some(_) => None,
        None => Some((status, body)),
    }
}

/// One request; the answer's status and body. A 503 (ebb serves a limited number of connections
/// at once) is tried again, up to 50 times 100 ms apart.
fn request(
    sock: &PathBuf,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Vec<u8>), Failure> {
    let mut tries = 0;
    loop {
        let answer = request_once(sock, method, path, body)?;
        tries += 1;
        if answer.0 != 503 || tries >= 50 {
            return Ok(answer);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn request_once(
    sock: &PathBuf,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Vec<u8>), Failure> {
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
        return Err(Failure::Other(format!(
            "bad path {path:?}: it must start with / and hold no spaces"
        )));
    }
    let mut stream = UnixStream::connect(sock)
        .map_err(|e| Failure::Connect(format!("cannot connect to {}: {e}", sock.display())))?;
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: ebb\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(req.as_bytes())
        .map_err(|e| Failure::Other(format!("cannot send the request: {e}")))?;
    let mut reply = Vec::new();
    (&mut stream)
        .take(MAX_REPLY)
        .read_to_end(&mut reply)
        .map_err(|e| Failure::Other(format!("no complete answer: {e}")))?;
    let (status, body) = parse_reply(&reply)
        .ok_or_else(|| Failure::Other(format!("malformed answer ({} bytes)", reply.len())))?;
    Ok((status, body.to_vec()))
}

/// A request whose answer must be a 2xx; its JSON body (null for none).
fn call(sock: &PathBuf, method: &str, path: &str, body: &str) -> Result<Value, Failure> {
    let (status, bytes) = request(sock, method, path, body)?;
    let v: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        let why = v["fault_message"]
            .as_str()
            .map_or_else(|| v.to_string(), str::to_owned);
        Err(Failure::Other(format!(
            "{method} {path}: HTTP {status}: {why}"
        )))
    }
}

fn mib(kib_or_bytes: Option<u64>, shift: u32) -> String {
    kib_or_bytes.map_or_else(
        || "-".into(),
        |v| format!("{:.1} MiB", v as f64 / f64::from(1u32 << shift)),
    )
}

/// Prints `rows` as two aligned columns.
fn table(rows: &[(String, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<w$}  {v}");
    }
}

fn memory_table(v: &Value) -> Vec<(String, String)> {
    let m = &v["memory"];
    let t = &m["tracked"];
    let n = |v: &Value| v.as_u64();
    let mut rows = vec![
        ("guest RAM".into(), mib(n(&m["guest_bytes"]), 20)),
        (
            "resident".into(),
            format!(
                "{} ({} pages)",
                mib(n(&m["resident_pages"]).map(|p| p * 4096), 20),
                m["resident_pages"]
            ),
        ),
    ];
    if t.is_object() {
        rows.push((
            "leaves".into(),
            format!("{} x 4 KiB + {} x 2 MiB", t["leaves_4k"], t["leaves_2m"]),
        ));
        rows.push((
            "table bytes".into(),
            format!("{} (minimum {})", t["table_bytes"], t["min_table_bytes"]),
        ));
        rows.push((
            "held by the balloon".into(),
            format!("{} pages", t["held_pages"]),
        ));
    }
    rows.push((
        "pending release".into(),
        format!("{} pages", m["balloon_pending_pages"]),
    ));
    rows.push((
        "host page tables (VmPTE)".into(),
        format!("{} bytes", m["host_pte_bytes"]),
    ));
    rows.push((
        "KVM's tables".into(),
        format!("{} bytes", m["kvm_table_bytes"]),
    ));
    let b = &v["balloon"];
    if b.is_object() {
        rows.push((
            "balloon".into(),
            format!("{} MiB of target {} MiB", b["actual_mib"], b["target_mib"]),
        ));
        rows.push((
            "longest queue notification".into(),
            format!(
                "{:.1} ms",
                b["counters"]["notify_ns_max"].as_u64().unwrap_or(0) as f64 / 1e6
            ),
        ));
    }
    rows
}

/// Follows the balloon from its size now to `target` MiB, with a progress bar on a terminal.
fn wait_for(sock: &PathBuf, target: u64, timeout: Duration) -> Result<u64, Failure> {
    let actual = |sock: &PathBuf| -> Result<u64, Failure> {
        let v = call(sock, "GET", "/memory", "")?;
        v["balloon"]["actual_mib"]
            .as_u64()
            .ok_or_else(|| Failure::Other("GET /memory has no balloon".into()))
    };
    let start = actual(sock)?;
    let bar = indicatif::ProgressBar::new(start.abs_diff(target).max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    loop {
        let now = actual(sock)?;
        bar.set_position(start.abs_diff(now).min(start.abs_diff(target)));
        bar.set_message(format!("balloon {now} MiB, target {target} MiB"));
        if now == target {
            bar.finish();
            return Ok(now);
        }
        if t0.elapsed() > timeout {
            bar.abandon();
            return Err(Failure::Other(format!(
                "the balloon is at {now} MiB, not {target}, after {} s",
                timeout.as_secs()
            )));
        }
        // Each reading costs ebb a memory report: twice a second is enough.
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_raw(status_and_body: (u16, Vec<u8>)) -> Result<(), Failure> {
    let (status, body) = status_and_body;
    let mut out = std::io::stdout();
    let _ = out.write_all(&body);
    let _ = out.write_all(b"\n");
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(Failure::Other(format!("HTTP {status}")))
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let sock = cli
        .api_sock
        .ok_or_else(|| Failure::Other("--api-sock is required".into()))?;
    match cli.cmd {
        Cmd::Get { path } => print_raw(request(&sock, "GET", &path, "")?),
        Cmd::Put { path, body } => {
            print_raw(request(&sock, "PUT", &path, body.as_deref().unwrap_or(""))?)
        }
        Cmd::Patch { path, body } => print_raw(request(
            &sock,
            "PATCH",
            &path,
            body.as_deref().unwrap_or(""),
        )?),
        Cmd::Memory => {
            let v = call(&sock, "GET", "/memory", "")?;
            if cli.json {
                println!("{v}");
            } else {
                table(&memory_table(&v));
            }
            Ok(())
        }
        Cmd::Balloon(BalloonCmd::Set {
            size,
            wait,
            timeout_s,
        }) => {
            let target = parse_mib(&size).map_err(Failure::Other)?;
            call(
                &sock,
                "PATCH",
                "/balloon",
                &format!("{{\"amount_mib\":{target}}}"),
            )?;
            if wait {
                let at = wait_for(&sock, target, Duration::from_secs(timeout_s))?;
                if !cli.json {
                    println!("balloon at {at} MiB");
                }
            }
            Ok(())
        }
        Cmd::Balloon(BalloonCmd::Show) => {
            let config = call(&sock, "GET", "/balloon", "")?;
            if cli.json {
                println!("{config}");
                return Ok(());
            }
            let mut rows: Vec<(String, String)> = config
                .as_object()
                .map(|o| o.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
                .unwrap_or_default();
            if let Ok(m) = call(&sock, "GET", "/memory", "") {
                let b = &m["balloon"];
                rows.push(("actual_mib".into(), b["actual_mib"].to_string()));
                rows.push(("held_pages".into(), b["held_pages"].to_string()));
            }
            table(&rows);
            Ok(())
        }
        Cmd::Balloon(BalloonCmd::Stats) => {
            let v = call(&sock, "GET", "/balloon/statistics", "")?;
            if cli.json {
                println!("{v}");
                return Ok(());
            }
            let rows: Vec<(String, String)> = v
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            let shown =
                                match (k.ends_with("_memory") || k == "disk_caches", v.as_u64()) {
                                    (true, Some(b)) => mib(Some(b), 20),
                                    _ => v.to_string(),
                                };
                            (k.clone(), shown)
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&rows);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            return if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Connect(why)) => {
            eprintln!("ebb-ctl: {why}");
            ExitCode::from(2)
        }
        Err(Failure::Other(why)) => {
            eprintln!("ebb-ctl: {why}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ebb-ctl").chain(v.iter().copied()))
    }

    #[test]
    fn arguments() {
        let c = parse(&["--api-sock", "/s", "PUT", "/balloon", "{}"]).unwrap();
        assert!(
            matches!(c.cmd, Cmd::Put { ref path, ref body } if path == "/balloon" && body.as_deref() == Some("{}"))
        );
        let c = parse(&["GET", "/vm", "--api-sock=/x"]).unwrap();
        assert_eq!(c.api_sock.as_deref(), Some(std::path::Path::new("/x")));
        let c = parse(&["--api-sock", "/s", "balloon", "set", "1GiB", "--wait"]).unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Balloon(BalloonCmd::Set { wait: true, .. })
        ));
        let c = parse(&["--api-sock", "/s", "memory", "--json"]).unwrap();
        assert!(c.json);
        for bad in [
            &["--api-sock", "/s", "GET"][..],
            &["--api-sock", "/s", "G T", "/vm"],
            &["--api-sock", "/s", "GET", "/vm", "{}"],
            &["--api-sock", "/s", "balloon"],
            &["--api-sock"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_mib("256"), Ok(256));
        assert_eq!(parse_mib("256MiB"), Ok(256));
        assert_eq!(parse_mib("2gib"), Ok(2048));
        assert_eq!(parse_mib("1G"), Ok(1024));
        for bad in ["", "MiB", "-1", "12KiB", "1.5GiB", "99999999999GiB"] {
            assert!(parse_mib(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies() {
        let r = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_reply(r), Some((400, &b"{}"[..])));
        let r = b"HTTP/1.1 204 No Content\r\nServer: ebb\r\n\r\n";
        assert_eq!(parse_reply(r), Some((204, &b""[..])));
        assert_eq!(parse_reply(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(parse_reply(b"SPDY 200\r\n\r\n"), None);
        assert_eq!(parse_reply(b"HTTP/1.1 abc\r\n\r\n"), None);
        assert_eq!(
            parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}"),
            None
        );
    }
}
