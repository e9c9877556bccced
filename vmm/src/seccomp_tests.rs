use super::*;

use std::process::Command;

/// Set in a child test process: which kind's filter to install, and the mode.
const CHILD_KIND: &str = "EBB_SECCOMP_TEST_KIND";
const CHILD_MODE: &str = "EBB_SECCOMP_TEST_MODE";
/// Set in a child test process to make an ioctl outside the list instead of [`forbidden_call`].
const CHILD_IOCTL: &str = "EBB_SECCOMP_TEST_IOCTL";

/// A syscall outside `kind`'s list, made for real: each kind's is one another kind may make,
/// so the lists are shown to differ.
fn forbidden_call(kind: ThreadKind) -> i64 {
    match kind {
        // The event loop's and the handlers' reads; openat is the event loop's.
        ThreadKind::Vcpu => libc::SYS_openat,
        ThreadKind::FaultHandler => libc::SYS_accept4,
        ThreadKind::Stats => libc::SYS_read,
        // No thread creates sockets once the VM runs.
        ThreadKind::EventLoop => libc::SYS_socket,
    }
}

fn kind_named(name: &str) -> ThreadKind {
    ThreadKind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .expect("a thread kind")
}

/// Runs in the child: installs the filter, shows an allowed syscall works, then makes the
/// forbidden one. With `on` the process ends in the SIGSYS handler; with `log` it goes on.
#[test]
fn child_makes_a_forbidden_call() {
    let (Ok(kind), Ok(mode)) = (std::env::var(CHILD_KIND), std::env::var(CHILD_MODE)) else {
        return; // Only meaningful as the child of the tests below.
    };
    let kind = kind_named(&kind);
    let mode = if mode == "log" {
        SeccompMode::Log
    } else {
        SeccompMode::On
    };
    init(mode).unwrap();
    install(kind, 3).unwrap();
    eprintln!("child: filter installed, allowed calls work");
    if std::env::var_os(CHILD_IOCTL).is_some() {
        // The event loop's memory-slot ioctl, on an invalid descriptor.
        let request = KVM_SET_USER_MEMORY_REGION();
        // SAFETY: ioctl on descriptor -1 touches no memory.
        let rc = unsafe { libc::ioctl(-1, request as _, 0) };
        eprintln!("child: ioctl {request:#x} returned {rc}: still running");
        return;
    }
    let nr = forbidden_call(kind);
    // SAFETY: every forbidden call here takes harmless arguments (an invalid descriptor or
    // path, or a socket that is closed at once).
    let rc = unsafe {
        match nr {
            libc::SYS_openat => libc::syscall(nr, libc::AT_FDCWD, c"/nonexistent".as_ptr(), 0),
            libc::SYS_socket => libc::syscall(nr, libc::AF_UNIX, libc::SOCK_STREAM, 0),
            _ => libc::syscall(nr, -1, 0, 0),
        }
    };
    eprintln!("child: system call {nr} returned {rc}: still running");
}

fn run_child(kind: ThreadKind, mode: &str) -> (Option<i32>, String) {
    run_child_with(kind, mode, false)
}

fn run_child_with(kind: ThreadKind, mode: &str, ioctl: bool) -> (Option<i32>, String) {
    let mut child = Command::new(std::env::current_exe().unwrap());
    if ioctl {
        child.env(CHILD_IOCTL, "1");
    }
    let out = child
        .args([
            "--exact",
            "seccomp::tests::child_makes_a_forbidden_call",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_KIND, kind.name())
        .env(CHILD_MODE, mode)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_syscall_outside_a_threads_list_stops_ebb_with_a_message_naming_it() {
    for kind in ThreadKind::ALL {
        let (code, stderr) = run_child(kind, "on");
        assert!(
            stderr.contains("child: filter installed, allowed calls work"),
            "{kind:?}: the filter let the thread write:\n{stderr}"
        );
        assert!(
            !stderr.contains("still running"),
            "{kind:?}: the forbidden call went through:\n{stderr}"
        );
        assert_eq!(code, Some(KILLED_EXIT_CODE), "{kind:?}:\n{stderr}");
        let number = if matches!(kind, ThreadKind::Vcpu | ThreadKind::FaultHandler) {
            format!("the {} 3 thread", kind.name())
        } else {
            format!("the {} thread", kind.name())
        };
        let want = format!(
            "ebb: seccomp: {number} made system call {} (x86_64 numbering)",
            forbidden_call(kind)
        );
        assert!(
            stderr.contains(&want),
            "{kind:?}: want {want:?} in:\n{stderr}"
        );
    }
}

#[test]
fn an_ioctl_outside_the_list_stops_ebb_with_its_request_named() {
    // The vCPU thread may make ioctls, but only its own requests.
    let (code, stderr) = run_child_with(ThreadKind::Vcpu, "on", true);
    assert_eq!(code, Some(KILLED_EXIT_CODE), "{stderr}");
    assert!(!stderr.contains("still running"), "{stderr}");
    let want = format!(
        "the vcpu 3 thread made system call {} (x86_64 numbering, request {:#x})",
        libc::SYS_ioctl,
        KVM_SET_USER_MEMORY_REGION()
    );
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
}

#[test]
fn log_mode_lets_the_call_through() {
    let (code, stderr) = run_child(ThreadKind::Vcpu, "log");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("still running"), "{stderr}");
}

#[test]
fn every_kind_compiles_in_both_modes() {
    for kind in ThreadKind::ALL {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            let p = compile(kind, mode).unwrap();
            assert!(p.len() > 10, "{kind:?} {mode:?}: {} instructions", p.len());
        }
    }
}

#[test]
fn lists_differ_where_the_threads_do() {
    let has = |k, nr| allowed_syscalls(k).contains(&nr);
    for kind in ThreadKind::ALL {
        assert!(!has(kind, forbidden_call(kind)), "{kind:?}");
        assert!(has(kind, libc::SYS_futex), "{kind:?}");
    }
    assert!(!has(ThreadKind::Stats, libc::SYS_ioctl));
    assert!(has(ThreadKind::EventLoop, libc::SYS_accept4));
    assert!(!has(ThreadKind::Vcpu, libc::SYS_accept4));
    assert!(!has(ThreadKind::Vcpu, libc::SYS_execve));
}

#[test]
fn the_message_is_one_line_and_fits() {
    let l = sigsys_line((ThreadKind::FaultHandler as u8, 65_535), -1, 0);
    let text = std::str::from_utf8(&l.buf[..l.len]).unwrap();
    assert!(text.ends_with('\n'), "{text}");
    assert_eq!(text.lines().count(), 1);
    assert!(text.contains("fault-handler 65535 thread made system call -1"));
    let l = sigsys_line((u8::MAX, 0), 41, 0);
    let text = std::str::from_utf8(&l.buf[..l.len]).unwrap();
    assert!(
        text.contains("the unfiltered thread made system call 41"),
        "{text}"
    );
    let l = sigsys_line((ThreadKind::Vcpu as u8, 0), libc::SYS_ioctl, u64::MAX);
    let text = std::str::from_utf8(&l.buf[..l.len]).unwrap();
    assert!(text.contains("request 0xffffffffffffffff)"), "{text}");
    assert!(text.ends_with('\n'), "{text}");
}
