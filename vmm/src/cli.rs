//! Command-line parsing; every flag but the seccomp ones maps to a field of the one
//! configuration type ([`ConfigFile`]: sections boot, machine, memory, balloon). Seccomp is the
//! process's own setting, not the VM's, so it is a flag only (as in Firecracker).

use std::path::PathBuf;

use clap::Parser;

use crate::config::{
    BalloonFile, BootFile, ConfigError, ConfigFile, MachineFile, MemoryFile, VmConfig,
};

/// ebb: a KVM microVM host that tracks every guest page in exact second-level tables.
#[derive(Debug, Parser)]
#[command(name = "ebb", version, about)]
pub struct Cli {
    /// Kernel image (bzImage or vmlinux ELF).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1-32).
    #[arg(long)]
    pub vcpus: Option<u64>,
    /// Guest RAM in MiB.
    #[arg(long = "memory-mib")]
    pub memory_mib: Option<u64>,
    /// Unix socket answering API requests (docs/API.md). Without a kernel, ebb waits there for
    /// Firecracker's configuration (PUT /boot-source, /machine-config, /balloon, /actions).
    #[arg(long = "api-sock")]
    pub api_sock: Option<PathBuf>,
    /// JSON file with the same fields; command-line flags override it.
    #[arg(long = "config", alias = "config-file")]
    pub config: Option<PathBuf>,
    /// Do not track guest pages (anonymous memory without guest-mm's fault path, for
    /// comparison).
    #[arg(long = "no-track")]
    pub no_track: bool,
    /// userfaultfd handler threads when tracking.
    #[arg(long = "fault-threads")]
    pub fault_threads: Option<u64>,
    /// Offer AVX and later XSAVE state (off by default: nested KVM under emulation
    /// reports inconsistent XSAVE sizes that crash Linux 6.18).
    #[arg(long = "full-xsave")]
    pub full_xsave: bool,
    /// Pages guest-mm fills per fault when none of their aligned window is filled (1 = only
    /// the faulting page; tracked RAM with 2 MiB pages always fills at least the faulting
    /// 2 MiB block, and a window above 512 pages fills that many whole blocks if the guest
    /// never gave any of them back). Default: 4096 with 2 MiB pages, 1 with --no-thp.
    #[arg(long = "fault-around")]
    pub fault_around: Option<u32>,
    /// Back guest RAM with 4 KiB host pages only (untracked: MADV_NOHUGEPAGE; tracked:
    /// anonymous memory filled page by page instead of a memfd filled 2 MiB at a time).
    #[arg(long = "no-thp")]
    pub no_thp: bool,
    /// Boot an ELF vmlinux through its Xen PVH entry.
    #[arg(long)]
    pub pvh: bool,
    /// Let idle vCPUs halt inside the guest (KVM HLT exits off). KVM then serves a fault on a
    /// not yet filled page synchronously instead of parking the vCPU (async page fault); each
    /// vCPU thread stays busy from the host's view, so use it with dedicated host CPUs.
    #[arg(long = "hlt-in-guest")]
    pub hlt_in_guest: bool,
    /// Which thread handles a virtio queue notification: the vCPU that wrote it, before it
    /// re-enters the guest (default), or the event loop through an ioeventfd.
    #[arg(long = "queue-notify", value_enum)]
    pub queue_notify: Option<crate::config::QueueNotify>,
    /// Add a virtio-balloon device (target set through the API socket).
    #[arg(long)]
    pub balloon: bool,
    /// Offer the balloon's deflate-on-OOM feature.
    #[arg(long = "balloon-deflate-on-oom")]
    pub balloon_deflate_on_oom: bool,
    /// Do not offer the balloon's statistics queue.
    #[arg(long = "balloon-no-stats")]
    pub balloon_no_stats: bool,
    /// Seconds between guest statistics refreshes (0: only when the API asks).
    #[arg(long = "balloon-stats-s")]
    pub balloon_stats_s: Option<u32>,
    /// Offer free page reporting: the guest hands free blocks back on its own.
    #[arg(long = "balloon-reporting")]
    pub balloon_reporting: bool,
    /// Make KVM drop its nested page tables once give-backs have emptied this many 2 MiB
    /// blocks since the last time (a memslot change; every page still mapped then faults into
    /// KVM once more). 0: never.
    #[arg(long = "zap-kvm-tables-after")]
    pub zap_kvm_tables_after: Option<u64>,
    /// Milliseconds without inflation after which the balloon releases its pages in 2 MiB
    /// blocks it holds only in part (blocks it holds whole go at once, without splitting the
    /// host's 2 MiB page or KVM's entry); 0 releases every page at once. Default 50.
    #[arg(long = "balloon-partial-release-ms")]
    pub balloon_partial_release_ms: Option<u64>,
    /// How guest-mm finds the tables a give-back emptied: off (only PUT /memory/reclaim
    /// sweeps), scan (rescan a table after clearing leaves in it) or count (a count per table;
    /// the default).
    #[arg(long = "reclaim-strategy", value_enum)]
    pub reclaim_strategy: Option<crate::config::ReclaimStrategy>,
    /// How given-back memory is released: dontneed or free (anonymous RAM: --no-track or
    /// --no-thp), punch-hole or remove (memfd RAM, the default). Default: punch-hole for memfd
    /// RAM, dontneed for anonymous RAM.
    #[arg(long = "release-mode", value_enum)]
    pub release_mode: Option<crate::config::ReleaseChoice>,
    /// The balloon's target when the guest's driver comes up, in MiB (default 0).
    #[arg(long = "balloon-target-mib")]
    pub balloon_target_mib: Option<u64>,
    /// Offer free page hinting (runs started over the API; needs --queue-notify vcpu).
    #[arg(long = "balloon-hinting")]
    pub balloon_hinting: bool,
    /// Seccomp filters on ebb's threads, one allowlist per kind of thread (docs/SECURITY.md):
    /// on (a syscall outside a thread's list stops ebb with a message), off, or log (allowed,
    /// and written to the kernel log: for finding what a new code path needs).
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: crate::seccomp::SeccompMode,
    /// No seccomp filters (--seccomp off), for debugging.
    #[arg(long = "no-seccomp", conflicts_with = "seccomp")]
    pub no_seccomp: bool,
}

impl Cli {
    /// The seccomp mode the flags ask for.
    pub fn seccomp_mode(&self) -> crate::seccomp::SeccompMode {
        if self.no_seccomp {
            crate::seccomp::SeccompMode::Off
        } else {
            self.seccomp
        }
    }

    /// Merges the config file (if any) with the flags and validates the result.
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        VmConfig::validate(self.into_file()?)
    }

    /// Merges the config file (if any) with the flags, unchecked: the configuration before start
    /// (over the API) builds on it.
    pub fn into_file(self) -> Result<ConfigFile, ConfigError> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let balloon = BalloonFile {
            deflate_on_oom: self.balloon_deflate_on_oom.then_some(true),
            stats: self.balloon_no_stats.then_some(false),
            stats_polling_interval_s: self.balloon_stats_s,
            reporting: self.balloon_reporting.then_some(true),
            hinting: self.balloon_hinting.then_some(true),
            target_mib: self.balloon_target_mib,
            partial_release_ms: self.balloon_partial_release_ms,
        };
        // A balloon flag without the balloon (neither --balloon nor a section in the file) is
        // refused, naming the flag.
        if !self.balloon && file.balloon.is_none() {
            let given = [
                ("balloon-deflate-on-oom", balloon.deflate_on_oom.is_some()),
                ("balloon-no-stats", balloon.stats.is_some()),
                (
                    "balloon-stats-s",
                    balloon.stats_polling_interval_s.is_some(),
                ),
                ("balloon-reporting", balloon.reporting.is_some()),
                ("balloon-hinting", balloon.hinting.is_some()),
                ("balloon-target-mib", balloon.target_mib.is_some()),
                (
                    "balloon-partial-release-ms",
                    balloon.partial_release_ms.is_some(),
                ),
            ];
            if let Some((name, _)) = given.iter().find(|(_, set)| *set) {
                return Err(ConfigError::BalloonOptionWithoutBalloon(name));
            }
        }
        let flags = ConfigFile {
            boot: BootFile {
                kernel: self.kernel,
                initrd: self.initrd,
                cmdline: self.cmdline,
                pvh: self.pvh.then_some(true),
            },
            machine: MachineFile {
                vcpus: self.vcpus,
                memory_mib: self.memory_mib,
                hlt_in_guest: self.hlt_in_guest.then_some(true),
                full_xsave: self.full_xsave.then_some(true),
                queue_notify: self.queue_notify,
            },
            memory: MemoryFile {
                track: self.no_track.then_some(false),
                thp: self.no_thp.then_some(false),
                fault_around: self.fault_around,
                fault_threads: self.fault_threads,
                zap_kvm_tables_after: self.zap_kvm_tables_after,
                strategy: self.reclaim_strategy,
                release: self.release_mode,
            },
            balloon: (self.balloon || balloon != BalloonFile::default()).then_some(balloon),
            api_sock: self.api_sock,
        };
        Ok(file.overlay(flags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let exe = std::env::current_exe().unwrap();
        let cli = Cli::try_parse_from([
            "ebb",
            "--kernel",
            exe.to_str().unwrap(),
            "--vcpus",
            "2",
            "--memory-mib",
            "512",
            "--no-track",
        ])
        .unwrap();
        let c = cli.into_config().unwrap();
        assert_eq!(c.machine.vcpus, 2);
        assert_eq!(c.machine.memory_mib, 512);
        assert!(!c.memory.track);
        assert!(!c.machine.hlt_in_guest, "HLT exits stay on unless asked");
        let cli = Cli::try_parse_from(["ebb", "--kernel", exe.to_str().unwrap(), "--hlt-in-guest"])
            .unwrap();
        assert!(cli.into_config().unwrap().machine.hlt_in_guest);
    }

    #[test]
    fn balloon_flags_parse() {
        let exe = std::env::current_exe().unwrap();
        let k = exe.to_str().unwrap();
        let c = Cli::try_parse_from(["ebb", "--kernel", k]).unwrap();
        assert_eq!(c.into_config().unwrap().balloon, None);
        let c = Cli::try_parse_from([
            "ebb",
            "--kernel",
            k,
            "--balloon",
            "--balloon-deflate-on-oom",
            "--balloon-stats-s",
            "3",
            "--balloon-reporting",
        ])
        .unwrap();
        let b = c.into_config().unwrap().balloon.unwrap();
        assert!(b.deflate_on_oom && b.reporting && b.stats);
        assert_eq!(b.stats_polling_interval_s, 3);
        let c = Cli::try_parse_from(["ebb", "--kernel", k, "--balloon-reporting"]).unwrap();
        assert!(c.into_config().is_err(), "balloon options need --balloon");
        assert!(Cli::try_parse_from(["ebb", "--balloon-stats-s", "-1"]).is_err());
    }

    #[test]
    fn seccomp_flags_parse() {
        use crate::seccomp::SeccompMode;
        let mode = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("ebb").chain(args.iter().copied()))
                .map(|c| c.seccomp_mode())
        };
        assert_eq!(
            mode(&[]).unwrap(),
            SeccompMode::On,
            "filters are on by default"
        );
        assert_eq!(mode(&["--no-seccomp"]).unwrap(), SeccompMode::Off);
        assert_eq!(mode(&["--seccomp", "off"]).unwrap(), SeccompMode::Off);
        assert_eq!(mode(&["--seccomp", "log"]).unwrap(), SeccompMode::Log);
        assert!(mode(&["--seccomp", "maybe"]).is_err());
        assert!(mode(&["--no-seccomp", "--seccomp", "on"]).is_err());
    }

    #[test]
    fn non_numbers_are_refused_by_clap() {
        assert!(Cli::try_parse_from(["ebb", "--vcpus", "-1"]).is_err());
        assert!(Cli::try_parse_from(["ebb", "--memory-mib", "lots"]).is_err());
    }
}
