//! `kvm-pin`: keeps one idle KVM VM (an in-kernel interrupt controller and one vCPU that never
//! runs) alive in the rig's L1, so that the VMs a job creates and destroys are never the first or
//! the last one.
//!
//! Why: KVM flips kernel static keys when the first VM is created and when the last one goes
//! (the scheduler's `preempt_notifier_key`, and while a vCPU's local APIC is software-disabled,
//! `apic_sw_disabled`). Each flip rewrites kernel text through int3 breakpoints, and under the
//! outer QEMU's TCG with two L1 CPUs another CPU now and then still executes the breakpoint after
//! the rewrite finished: L1 oopses with `int3` in `__schedule` (docs/ARCHITECTURE.md, "Known
//! flakiness"). While this VM lives, the keys stay on and their code is not rewritten again.
//!
//! The VM is created by a child process, which then waits for a signal; the command prints the
//! child's pid once the VM exists and exits, so `pid=$(ebb-guest kvm-pin)` returns only when the
//! pin holds. Killing the child destroys the VM.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::args::Args;
use crate::error::ToolError;

/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
/// `_IO(KVMIO, 0x41)`.
const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
/// `_IO(KVMIO, 0x60)`.
const KVM_CREATE_IRQCHIP: libc::c_ulong = 0xAE60;

/// The last OS error, with what was being done.
fn os_err(what: &str) -> ToolError {
    ToolError::Io {
        what: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// A file descriptor an ioctl returned, owned.
fn owned(fd: libc::c_int, what: &str) -> Result<OwnedFd, ToolError> {
    if fd < 0 {
        return Err(os_err(what));
    }
    // SAFETY: `fd` was just returned to this process and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates the VM, its interrupt controller and vCPU 0; the descriptors keep them alive.
fn create_vm() -> Result<[OwnedFd; 3], ToolError> {
    // SAFETY: a NUL-terminated path; the flags ask for a new descriptor.
    let kvm = owned(
        unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
        "open /dev/kvm",
    )?;
    // SAFETY: KVM_CREATE_VM takes the machine type (0) by value and returns a new descriptor.
    let vm = owned(
        unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) },
        "create a KVM VM",
    )?;
    // SAFETY: KVM_CREATE_IRQCHIP takes no argument.
    if unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_IRQCHIP as _, 0) } != 0 {
        return Err(os_err("create the VM's interrupt controller"));
    }
    // SAFETY: KVM_CREATE_VCPU takes the vCPU id (0) by value and returns a new descriptor.
    let vcpu = owned(
        unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU as _, 0) },
        "create vCPU 0",
    )?;
    Ok([kvm, vm, vcpu])
}

/// The `kvm-pin` subcommand.
pub fn kvm_pin(argv: &[String]) -> Result<i32, ToolError> {
    Args::parse(argv, &[], &[]).map_err(ToolError::Args)?;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("create a pipe"));
    }
    let [r, w] = fds.map(|fd| {
        // SAFETY: pipe2 just returned these descriptors.
        std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    });
    // SAFETY: this process has one thread; the child only makes system calls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork"));
    }
    if pid == 0 {
        hold(r, w);
    }
    drop(w);
    let mut answer = String::new();
    (&r).read_to_string(&mut answer)
        .map_err(|source| ToolError::Io {
            what: "read the holder's answer".into(),
            source,
        })?;
    if answer != "ok" {
        let mut status = 0;
        // SAFETY: `pid` is this process's child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let why = if answer.is_empty() {
            "the holder ended without an answer"
        } else {
            answer.as_str()
        };
        return Err(ToolError::Invalid(format!("kvm-pin: {why}")));
    }
    println!("{pid}");
    Ok(0)
}

/// The child: creates the VM, answers on `w`, and waits to be killed with the VM held.
fn hold(r: std::fs::File, mut w: std::fs::File) -> ! {
    drop(r);
    let answer = match create_vm() {
        Ok(held) => {
            std::mem::forget(held);
            "ok".to_string()
        }
        Err(e) => {
            let mut msg = e.to_string();
            if let Some(s) = std::error::Error::source(&e) {
                msg.push_str(&format!(": {s}"));
            }
            msg
        }
    };
    let ok = answer == "ok";
    let _ = w.write_all(answer.as_bytes());
    drop(w);
    if !ok {
        // SAFETY: ends the child at once, as after fork.
        unsafe { libc::_exit(1) };
    }
    // Off the caller's output, so `$(ebb-guest kvm-pin)` returns when the parent exits.
    // SAFETY: a NUL-terminated path; dup2 onto the standard descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        loop {
            libc::pause();
        }
    }
}
