//! Choosing where jobs run: nested in QEMU TCG (L1 with kvm-amd), or directly on a host that has
//! hardware virtualization. `EBB_RIG_MODE=auto|nested|host` overrides the detection.

use std::path::Path;

use crate::error::RigError;

/// Where a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Inside L1: QEMU TCG emulating an AMD CPU with SVM and NPT.
    Nested,
    /// Directly on this host (it has VMX/SVM and a hardware KVM).
    Host,
}

/// Facts about this machine's virtualization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostVirt {
    /// `vmx` or `svm` in the CPU flags.
    pub cpu_flag: bool,
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// The KVM module is PVM (`kvm_pvm`), which cannot boot stock Linux guests.
    pub pvm: bool,
}

impl HostVirt {
    /// Reads `/proc/cpuinfo`, `/dev/kvm` and `/sys/module/kvm_pvm`.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostVirt {
            cpu_flag: has_virt_flag(&cpuinfo),
            dev_kvm: Path::new("/dev/kvm").exists(),
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }

    /// Whether Linux guests can run under this host's KVM.
    pub fn hardware_kvm(&self) -> bool {
        self.cpu_flag && self.dev_kvm && !self.pvm
    }
}

/// Whether a cpuinfo text lists `vmx` or `svm` among the flags.
pub fn has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The mode from `EBB_RIG_MODE` (default auto) and the probed host.
pub fn select_mode(env: Option<&str>, host: &HostVirt) -> Result<Mode, RigError> {
    match env.unwrap_or("auto") {
        "" | "auto" => Ok(if host.hardware_kvm() {
            Mode::Host
        } else {
            Mode::Nested
        }),
        "nested" => Ok(Mode::Nested),
        "host" => Ok(Mode::Host),
        other => Err(RigError::BadMode(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        assert!(has_virt_flag("processor: 0\nflags\t\t: fpu svm lm\n"));
        assert!(has_virt_flag("flags : vmx\n"));
        assert!(!has_virt_flag("flags : fpu svmx\nbugs : vmx\n"));
    }

    #[test]
    fn mode_selection() {
        let pvm = HostVirt {
            cpu_flag: false,
            dev_kvm: true,
            pvm: true,
        };
        let hw = HostVirt {
            cpu_flag: true,
            dev_kvm: true,
            pvm: false,
        };
        assert_eq!(select_mode(None, &pvm).unwrap(), Mode::Nested);
        assert_eq!(select_mode(None, &hw).unwrap(), Mode::Host);
        assert_eq!(select_mode(Some("nested"), &hw).unwrap(), Mode::Nested);
        assert_eq!(select_mode(Some("host"), &pvm).unwrap(), Mode::Host);
        assert!(select_mode(Some("bogus"), &hw).is_err());
    }
}
