//! The validated description of one VM, from the command line or a JSON file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::{MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};

/// Command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Emptied 2 MiB blocks after which KVM drops its nested tables, by default: off until a
/// measurement of the re-fault cost against the tables freed chooses a value.
pub const DEFAULT_ZAP_KVM_TABLES_AFTER: u64 = 0;

/// Default fault-around, in 4 KiB pages, for tracked guest RAM with 2 MiB pages (8 blocks).
pub const DEFAULT_HUGE_FAULT_AROUND: u32 = 4096;

/// Why a VM description was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No kernel image was named.
    #[error(
        "no kernel given: pass --kernel PATH, set \"kernel\" in the config file, or start with only --api-sock and configure over the API"
    )]
    MissingKernel,
    /// The kernel image cannot be opened.
    #[error("kernel image {path} is not readable")]
    KernelUnreadable {
        /// The path that was given.
        path: PathBuf,
        /// The open error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd cannot be opened.
    #[error("initrd {path} is not readable")]
    InitrdUnreadable {
        /// The path that was given.
        path: PathBuf,
        /// The open error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU count is out of range.
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    BadVcpus(u64),
    /// The memory size is out of range.
    #[error("memory-mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, got {0}")]
    BadMemory(u64),
    /// Fault-around is not a power of two up to 4096.
    #[error("fault-around must be a power of two from 1 to 4096 pages, got {0}")]
    BadFaultAround(u32),
    /// The command line has a NUL byte or is too long.
    #[error("kernel command line is invalid: {0}")]
    BadCmdline(&'static str),
    /// The config file cannot be read.
    #[error("config file {path} is not readable")]
    FileUnreadable {
        /// The path that was given.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// A balloon option was given without the balloon.
    #[error("balloon option {0} needs the balloon: add --balloon (\"balloon\": true)")]
    BalloonOptionWithoutBalloon(&'static str),
    /// The statistics polling interval is out of range or has no queue to poll.
    #[error(
        "balloon-stats-s must be 0 to {MAX_BALLOON_STATS_S} and needs the statistics queue, got {0}"
    )]
    BadBalloonStatsInterval(u32),
    /// Free page hinting with queue notifications handled off the notifying vCPU.
    #[error(
        "balloon free page hinting needs --queue-notify vcpu: a hinted block must be released before the vCPU that sent it goes on"
    )]
    HintingNeedsInlineNotify,
    /// The balloon's first target is more than guest RAM.
    #[error("balloon-target-mib {0} is more than guest RAM ({1} MiB)")]
    BadBalloonTarget(u64, u64),
    /// The balloon's partial-release delay is out of range.
    #[error("balloon-partial-release-ms must be 0 to {MAX_BALLOON_PARTIAL_RELEASE_MS}, got {0}")]
    BadBalloonPartialRelease(u64),
    /// A Firecracker configuration file was refused.
    #[error("config file {path} (Firecracker's format): {why}")]
    FirecrackerFile {
        /// The path that was given.
        path: PathBuf,
        /// What was refused.
        why: String,
    },
    /// The config file is not valid JSON for a VM description.
    #[error("config file {path} is malformed")]
    FileMalformed {
        /// The path that was given.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// The fields of the JSON config file; every one is optional so that the command line
/// can fill or override it.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Kernel image: bzImage or vmlinux ELF.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    pub vcpus: Option<u64>,
    /// Guest RAM in MiB.
    pub memory_mib: Option<u64>,
    /// Path of the API Unix socket.
    pub api_sock: Option<PathBuf>,
    /// Track every guest page in guest-mm (default true).
    pub track: Option<bool>,
    /// Number of userfaultfd handler threads when tracking.
    pub fault_threads: Option<u64>,
    /// Offer the host's full XSAVE state (AVX and up) instead of hiding XSAVE.
    pub full_xsave: Option<bool>,
    /// Pages guest-mm fills per fault (1 = exact, a power of two up to 4096).
    pub fault_around: Option<u32>,
    /// Let untracked guest RAM use transparent huge pages (default true; tracked RAM is
    /// always 4 KiB pages).
    pub thp: Option<bool>,
    /// Boot an ELF vmlinux through its PVH entry instead of the 64-bit Linux protocol.
    pub pvh: Option<bool>,
    /// Let idle vCPUs halt inside the guest (KVM HLT exits off; default false).
    pub hlt_in_guest: Option<bool>,
    /// Which thread handles virtio queue notifications (default `vcpu`).
    pub queue_notify: Option<QueueNotify>,
    /// Add a virtio-balloon device (default false).
    pub balloon: Option<bool>,
    /// Offer the balloon's deflate-on-OOM feature (default false).
    pub balloon_deflate_on_oom: Option<bool>,
    /// Offer the balloon's statistics queue (default true).
    pub balloon_stats: Option<bool>,
    /// Seconds between guest statistics refreshes; 0 refreshes only when the API asks.
    pub balloon_stats_s: Option<u32>,
    /// Offer free page reporting (default false).
    pub balloon_reporting: Option<bool>,
    /// The balloon's target when the guest's driver comes up, in MiB (default 0).
    pub balloon_target_mib: Option<u64>,
    /// Offer free page hinting (default false; needs `queue_notify` `vcpu`).
    pub balloon_hinting: Option<bool>,
    /// Make KVM drop its nested tables after give-backs emptied this many 2 MiB blocks
    /// (0: never; default [`DEFAULT_ZAP_KVM_TABLES_AFTER`]).
    pub zap_kvm_tables_after: Option<u64>,
    /// Milliseconds without inflation after which the balloon's pages in 2 MiB blocks it holds
    /// only in part are released (0: at once; default [`DEFAULT_BALLOON_PARTIAL_RELEASE_MS`]).
    pub balloon_partial_release_ms: Option<u64>,
}

impl ConfigFile {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::FileUnreadable {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses config file text, ebb's format or Firecracker's (docs/API.md); `path` only names
    /// the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        if crate::preboot::is_firecracker_config(text) {
            return crate::preboot::firecracker_config(text).map_err(|why| {
                ConfigError::FirecrackerFile {
                    path: path.to_owned(),
                    why,
                }
            });
        }
        serde_json::from_str(text).map_err(|source| ConfigError::FileMalformed {
            path: path.to_owned(),
            source,
        })
    }

    /// Fields set in `over` replace those in `self`.
    pub fn overlay(self, over: ConfigFile) -> ConfigFile {
        ConfigFile {
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            cmdline: over.cmdline.or(self.cmdline),
            vcpus: over.vcpus.or(self.vcpus),
            memory_mib: over.memory_mib.or(self.memory_mib),
            api_sock: over.api_sock.or(self.api_sock),
            track: over.track.or(self.track),
            fault_threads: over.fault_threads.or(self.fault_threads),
            full_xsave: over.full_xsave.or(self.full_xsave),
            fault_around: over.fault_around.or(self.fault_around),
            thp: over.thp.or(self.thp),
            pvh: over.pvh.or(self.pvh),
            hlt_in_guest: over.hlt_in_guest.or(self.hlt_in_guest),
            queue_notify: over.queue_notify.or(self.queue_notify),
            balloon: over.balloon.or(self.balloon),
            balloon_deflate_on_oom: over.balloon_deflate_on_oom.or(self.balloon_deflate_on_oom),
            balloon_stats: over.balloon_stats.or(self.balloon_stats),
            balloon_stats_s: over.balloon_stats_s.or(self.balloon_stats_s),
            zap_kvm_tables_after: over.zap_kvm_tables_after.or(self.zap_kvm_tables_after),
            balloon_partial_release_ms: over
                .balloon_partial_release_ms
                .or(self.balloon_partial_release_ms),
            balloon_reporting: over.balloon_reporting.or(self.balloon_reporting),
            balloon_target_mib: over.balloon_target_mib.or(self.balloon_target_mib),
            balloon_hinting: over.balloon_hinting.or(self.balloon_hinting),
        }
    }
}

/// Which thread handles a virtio queue notification (the driver's QueueNotify write).
#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum QueueNotify {
    /// The vCPU that wrote it, on its MMIO exit, before it re-enters the guest.
    #[default]
    Vcpu,
    /// The event loop, woken by an ioeventfd; the vCPU goes on at once.
    EventLoop,
}

/// Longest balloon statistics polling interval accepted (one day).
pub const MAX_BALLOON_STATS_S: u32 = 86_400;

/// How long, by default, pages of 2 MiB blocks the balloon holds only in part wait for the rest
/// of their block before they are released (docs/BALLOON.md, "Whole-block release").
pub const DEFAULT_BALLOON_PARTIAL_RELEASE_MS: u64 = 50;
/// Longest partial-release delay accepted (ten seconds).
pub const MAX_BALLOON_PARTIAL_RELEASE_MS: u64 = 10_000;

/// The balloon device's options.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct BalloonSettings {
    /// Offer deflate-on-OOM.
    pub deflate_on_oom: bool,
    /// Offer the statistics queue.
    pub stats: bool,
    /// Seconds between statistics refreshes (0: only on API request).
    pub stats_polling_interval_s: u32,
    /// Offer free page reporting.
    pub reporting: bool,
    /// Milliseconds without inflation after which the pages of 2 MiB blocks the balloon holds
    /// only in part are released (blocks it holds whole go at once); 0: every page at once.
    pub partial_release_ms: u64,
    /// The target when the guest's driver comes up, in MiB.
    pub target_mib: u64,
    /// Offer free page hinting.
    pub hinting: bool,
}

impl BalloonSettings {
    fn validate(file: &ConfigFile) -> Result<Option<Self>, ConfigError> {
        if file.balloon != Some(true) {
            let given = [
                (
                    "balloon-deflate-on-oom",
                    file.balloon_deflate_on_oom.is_some(),
                ),
                ("balloon-stats", file.balloon_stats.is_some()),
                ("balloon-stats-s", file.balloon_stats_s.is_some()),
                ("balloon-reporting", file.balloon_reporting.is_some()),
                (
                    "balloon-partial-release-ms",
                    file.balloon_partial_release_ms.is_some(),
                ),
                ("balloon-target-mib", file.balloon_target_mib.is_some()),
                ("balloon-hinting", file.balloon_hinting.is_some()),
            ];
            return match given.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(ConfigError::BalloonOptionWithoutBalloon(name)),
                None => Ok(None),
            };
        }
        let stats = file.balloon_stats.unwrap_or(true);
        let interval = file.balloon_stats_s.unwrap_or(0);
        if interval > MAX_BALLOON_STATS_S || (interval > 0 && !stats) {
            return Err(ConfigError::BadBalloonStatsInterval(interval));
        }
        let partial = file
            .balloon_partial_release_ms
            .unwrap_or(DEFAULT_BALLOON_PARTIAL_RELEASE_MS);
        if partial > MAX_BALLOON_PARTIAL_RELEASE_MS {
            return Err(ConfigError::BadBalloonPartialRelease(partial));
        }
        Ok(Some(BalloonSettings {
            deflate_on_oom: file.balloon_deflate_on_oom.unwrap_or(false),
            stats,
            stats_polling_interval_s: interval,
            reporting: file.balloon_reporting.unwrap_or(false),
            partial_release_ms: partial,
            target_mib: file.balloon_target_mib.unwrap_or(0),
            hinting: file.balloon_hinting.unwrap_or(false),
        }))
    }
}

/// A complete, checked VM description.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// API socket path.
    pub api_sock: Option<PathBuf>,
    /// Whether guest-mm tracks every guest page.
    pub track: bool,
    /// userfaultfd handler threads.
    pub fault_threads: usize,
    /// Offer AVX and later XSAVE state to the guest.
    pub full_xsave: bool,
    /// Pages filled per fault.
    pub fault_around: u32,
    /// Transparent huge pages for untracked RAM.
    pub thp: bool,
    /// PVH boot.
    pub pvh: bool,
    /// HLT exits off: an idle vCPU halts inside the guest, and KVM never parks a vCPU on a
    /// page the host has not filled yet (see `kvm::Vm::new`).
    pub hlt_in_guest: bool,
    /// Which thread handles virtio queue notifications.
    pub queue_notify: QueueNotify,
    /// The balloon device, when there is one.
    pub balloon: Option<BalloonSettings>,
    /// Emptied 2 MiB blocks after which KVM drops its nested tables (0: never).
    pub zap_kvm_tables_after: u64,
}

impl VmConfig {
    /// Checks every field and fills defaults. Files are opened to prove they are readable.
    pub fn validate(file: ConfigFile) -> Result<Self, ConfigError> {
        let balloon = BalloonSettings::validate(&file)?;
        let kernel = file.kernel.ok_or(ConfigError::MissingKernel)?;
        std::fs::File::open(&kernel).map_err(|source| ConfigError::KernelUnreadable {
            path: kernel.clone(),
            source,
        })?;
        if let Some(initrd) = &file.initrd {
            std::fs::File::open(initrd).map_err(|source| ConfigError::InitrdUnreadable {
                path: initrd.clone(),
                source,
            })?;
        }
        let vcpus = file.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > u64::from(MAX_VCPUS) {
            return Err(ConfigError::BadVcpus(vcpus));
        }
        let memory_mib = file.memory_mib.unwrap_or(256);
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(ConfigError::BadMemory(memory_mib));
        }
        if let Some(b) = &balloon
            && b.target_mib > memory_mib
        {
            return Err(ConfigError::BadBalloonTarget(b.target_mib, memory_mib));
        }
        let queue_notify = file.queue_notify.unwrap_or_default();
        if balloon.is_some_and(|b| b.hinting) && queue_notify != QueueNotify::Vcpu {
            return Err(ConfigError::HintingNeedsInlineNotify);
        }
        let cmdline = file.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
        if cmdline.contains('\0') {
            return Err(ConfigError::BadCmdline("it contains a NUL byte"));
        }
        if cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::BadCmdline("it is longer than 64 KiB"));
        }
        let thp = file.thp.unwrap_or(true);
        // Tracked RAM with 2 MiB pages fills 8 blocks (16 MiB) per fault by default: a userfault
        // round trip costs milliseconds under nested virtualisation, and the window keeps the
        // guest's first touches within about 10% of untracked RAM (docs/ARCHITECTURE.md,
        // "Measurements"). With 4 KiB pages the default stays exact: the faulting page only.
        let fault_around =
            file.fault_around
                .unwrap_or(if thp { DEFAULT_HUGE_FAULT_AROUND } else { 1 });
        if !fault_around.is_power_of_two() || fault_around > 4096 {
            return Err(ConfigError::BadFaultAround(fault_around));
        }
        let fault_threads = file.fault_threads.unwrap_or(2).clamp(1, 64) as usize;
        Ok(VmConfig {
            kernel,
            initrd: file.initrd,
            cmdline,
            // The range check above keeps this lossless.
            vcpus: vcpus as u8,
            memory_mib,
            api_sock: file.api_sock,
            track: file.track.unwrap_or(true),
            fault_threads,
            full_xsave: file.full_xsave.unwrap_or(false),
            fault_around,
            thp,
            pvh: file.pvh.unwrap_or(false),
            hlt_in_guest: file.hlt_in_guest.unwrap_or(false),
            queue_notify,
            balloon,
            zap_kvm_tables_after: file
                .zap_kvm_tables_after
                .unwrap_or(DEFAULT_ZAP_KVM_TABLES_AFTER),
        })
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing_file() -> PathBuf {
        std::env::current_exe().unwrap()
    }

    fn base() -> ConfigFile {
        ConfigFile {
            kernel: Some(existing_file()),
            ..ConfigFile::default()
        }
    }

    #[test]
    fn fault_around_defaults_follow_the_page_size() {
        let file = |thp| ConfigFile {
            kernel: Some(std::env::current_exe().unwrap()),
            thp,
            ..Default::default()
        };
        let c = VmConfig::validate(file(None)).unwrap();
        assert_eq!(c.fault_around, DEFAULT_HUGE_FAULT_AROUND);
        let c = VmConfig::validate(file(Some(false))).unwrap();
        assert_eq!(c.fault_around, 1, "4 KiB tracking stays exact by default");
        let mut f = file(None);
        f.fault_around = Some(8192);
        assert!(matches!(
            VmConfig::validate(f),
            Err(ConfigError::BadFaultAround(8192))
        ));
    }

    #[test]
    fn defaults_fill_in() {
        let c = VmConfig::validate(base()).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 256);
        assert!(c.track);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn bad_values_are_refused() {
        let missing = ConfigFile::default();
        assert!(matches!(
            VmConfig::validate(missing),
            Err(ConfigError::MissingKernel)
        ));
        let nofile = ConfigFile {
            kernel: Some("/nonexistent/kernel".into()),
            ..ConfigFile::default()
        };
        assert!(matches!(
            VmConfig::validate(nofile),
            Err(ConfigError::KernelUnreadable { .. })
        ));
        for vcpus in [0, 33, u64::MAX] {
            let f = ConfigFile {
                vcpus: Some(vcpus),
                ..base()
            };
            assert!(matches!(VmConfig::validate(f), Err(ConfigError::BadVcpus(v)) if v == vcpus));
        }
        for mib in [0, 63, 3073, u64::MAX] {
            let f = ConfigFile {
                memory_mib: Some(mib),
                ..base()
            };
            assert!(matches!(VmConfig::validate(f), Err(ConfigError::BadMemory(m)) if m == mib));
        }
        let nul = ConfigFile {
            cmdline: Some("a\0b".into()),
            ..base()
        };
        assert!(matches!(
            VmConfig::validate(nul),
            Err(ConfigError::BadCmdline(_))
        ));
    }

    #[test]
    fn file_parses_and_overlays() {
        let text = r#"{"kernel": "/k", "vcpus": 2, "memory_mib": 512, "track": false,
            "hlt_in_guest": true}"#;
        let f = ConfigFile::parse(Path::new("x.json"), text).unwrap();
        assert_eq!(f.vcpus, Some(2));
        let cli = ConfigFile {
            vcpus: Some(4),
            ..ConfigFile::default()
        };
        let merged = f.overlay(cli);
        assert_eq!(merged.vcpus, Some(4));
        assert_eq!(merged.memory_mib, Some(512));
        assert_eq!(merged.track, Some(false));
        assert_eq!(merged.hlt_in_guest, Some(true));
        assert_eq!(merged.kernel.as_deref(), Some(Path::new("/k")));
    }

    #[test]
    fn balloon_options() {
        assert_eq!(VmConfig::validate(base()).unwrap().balloon, None);
        let text = r#"{"balloon": true, "balloon_stats_s": 5, "balloon_reporting": true}"#;
        let f = ConfigFile::parse(Path::new("x.json"), text).unwrap();
        let b = VmConfig::validate(base().overlay(f))
            .unwrap()
            .balloon
            .unwrap();
        assert_eq!(
            b,
            BalloonSettings {
                deflate_on_oom: false,
                stats: true,
                stats_polling_interval_s: 5,
                reporting: true,
                partial_release_ms: DEFAULT_BALLOON_PARTIAL_RELEASE_MS,
                target_mib: 0,
                hinting: false,
            }
        );
        let orphan = ConfigFile {
            balloon_reporting: Some(true),
            ..base()
        };
        assert!(matches!(
            VmConfig::validate(orphan),
            Err(ConfigError::BalloonOptionWithoutBalloon(
                "balloon-reporting"
            ))
        ));
        for (stats, s) in [(true, MAX_BALLOON_STATS_S + 1), (false, 1)] {
            let f = ConfigFile {
                balloon: Some(true),
                balloon_stats: Some(stats),
                balloon_stats_s: Some(s),
                ..base()
            };
            assert!(matches!(
                VmConfig::validate(f),
                Err(ConfigError::BadBalloonStatsInterval(_))
            ));
        }
    }

    #[test]
    fn malformed_file_is_refused() {
        for text in ["{", r#"{"vcpus": "two"}"#, r#"{"unknown": 1}"#, "[]"] {
            assert!(matches!(
                ConfigFile::parse(Path::new("x.json"), text),
                Err(ConfigError::FileMalformed { .. })
            ));
        }
    }
}
