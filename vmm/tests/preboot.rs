//! `ebb --api-sock S` with no kernel waits for Firecracker's configuration over the socket: the
//! sequence of Firecracker's getting-started guide, on the host (no guest boots: the kernel
//! given at the end is not one, so ebb stops with an error after `InstanceStart`).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// One request; returns (status, body).
fn request(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ebb-preboot-{}-{name}", std::process::id()))
}

#[test]
fn firecrackers_configuration_sequence_over_the_socket() {
    let sock = temp("api.sock");
    let not_a_kernel = temp("vmlinux");
    std::fs::write(&not_a_kernel, b"not a kernel").unwrap();
    let mut ebb = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["--api-sock", sock.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // ebb binds the socket before it serves; its existence is the handshake.
    let mut waited = 0;
    while !sock.exists() {
        assert!(waited < 1000, "ebb never opened its API socket");
        assert!(ebb.try_wait().unwrap().is_none(), "ebb exited early");
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let (s, b) = request(&sock, "GET", "/", "");
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"state\":\"Not started\""), "{b}");
    let (s, b) = request(
        &sock,
        "PUT",
        "/boot-source",
        r#"{ "kernel_image_path": "/nonexistent/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off" }"#,
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("The kernel file cannot be opened"), "{b}");
    let (s, b) = request(
        &sock,
        "PUT",
        "/machine-config",
        r#"{ "vcpu_count": 2, "mem_size_mib": 1024 }"#,
    );
    assert_eq!((s, b.as_str()), (204, ""));
    let (s, b) = request(&sock, "GET", "/machine-config", "");
    assert_eq!(s, 200);
    assert!(b.contains("\"mem_size_mib\":1024"), "{b}");
    let (s, b) = request(
        &sock,
        "PUT",
        "/balloon",
        r#"{ "amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1 }"#,
    );
    assert_eq!(s, 204, "{b}");
    let (s, b) = request(&sock, "PATCH", "/balloon", r#"{ "amount_mib": 64 }"#);
    assert_eq!(s, 400, "{b}");
    assert!(
        b.contains("not supported before starting the microVM"),
        "{b}"
    );
    let (s, b) = request(
        &sock,
        "PUT",
        "/actions",
        r#"{ "action_type": "InstanceStart" }"#,
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("without kernel configuration"), "{b}");
    assert!(ebb.try_wait().unwrap().is_none(), "refusals change nothing");

    let boot = format!(
        r#"{{ "kernel_image_path": "{}", "boot_args": "console=ttyS0" }}"#,
        not_a_kernel.display()
    );
    assert_eq!(request(&sock, "PUT", "/boot-source", &boot).0, 204);
    let (s, b) = request(
        &sock,
        "PUT",
        "/actions",
        r#"{ "action_type": "InstanceStart" }"#,
    );
    assert_eq!((s, b.as_str()), (204, ""));
    // The configuration is taken; the "kernel" cannot be loaded, so ebb stops with one line.
    let out = ebb.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ebb: "), "{err}");
    assert!(!sock.exists(), "the socket is removed when ebb stops");
    let _ = std::fs::remove_file(&not_a_kernel);
}

#[test]
fn without_a_kernel_or_a_socket_ebb_says_how_to_configure_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--api-sock"), "{err}");
}
