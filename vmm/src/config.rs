//! The one description of a VM, in four sections (boot, machine, memory, balloon) and the API
//! socket. Every source fills the same partial type, [`ConfigFile`]: the JSON config file (this
//! shape, or Firecracker's format, read through the same checks), the command-line flags, and the
//! configuration over the API before start. Sources are layered with [`ConfigFile::overlay`] and
//! checked in one place, [`VmConfig::validate`]. [`VmConfig`] serialises in the same shape, so
//! the configuration `GET /vm` answers is a config file ebb reads back as the same VM.

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
    /// A balloon flag was given without the balloon.
    #[error(
        "balloon option {0} needs the balloon: add --balloon (a \"balloon\" section in the config file)"
    )]
    BalloonOptionWithoutBalloon(&'static str),
    /// The statistics polling interval is out of range or has no queue to poll.
    #[error(
        "balloon-stats-s must be 0 to {MAX_BALLOON_STATS_S} and needs the statistics queue, got {0}"
    )]
    BadBalloonStatsInterval(u32),
    /// A release mode that does not free the memory guest RAM is made of.
    #[error(
        "release mode {mode} needs {needs} guest RAM, but this configuration has {has} RAM \
         (memfd: tracked with 2 MiB pages, the default; anonymous: --no-track or --no-thp)"
    )]
    ReleaseMode {
        /// The mode asked for.
        mode: &'static str,
        /// The RAM it works on.
        needs: &'static str,
        /// The RAM configured.
        has: &'static str,
    },
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

/// The boot section: what to boot.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BootFile {
    /// Kernel image: bzImage or vmlinux ELF.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Boot an ELF vmlinux through its PVH entry instead of the 64-bit Linux protocol.
    pub pvh: Option<bool>,
}

/// The machine section: vCPUs, RAM size and how the vCPUs run.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MachineFile {
    /// Number of vCPUs (default 1).
    pub vcpus: Option<u64>,
    /// Guest RAM in MiB (default 256).
    pub memory_mib: Option<u64>,
    /// Let idle vCPUs halt inside the guest (KVM HLT exits off; default false).
    pub hlt_in_guest: Option<bool>,
    /// Offer the host's full XSAVE state (AVX and up) instead of hiding XSAVE.
    pub full_xsave: Option<bool>,
    /// Which thread handles virtio queue notifications (default `vcpu`).
    pub queue_notify: Option<QueueNotify>,
}

/// The memory section: how guest-mm holds guest RAM.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryFile {
    /// Track every guest page in guest-mm's fault path (default true).
    pub track: Option<bool>,
    /// 2 MiB host pages (default true): tracked RAM is a memfd filled 2 MiB at a time,
    /// untracked RAM may use transparent huge pages.
    pub thp: Option<bool>,
    /// Pages guest-mm fills per fault (a power of two up to 4096).
    pub fault_around: Option<u32>,
    /// Number of userfaultfd handler threads when tracking.
    pub fault_threads: Option<u64>,
    /// Make KVM drop its nested tables after give-backs emptied this many 2 MiB blocks
    /// (0: never; default [`DEFAULT_ZAP_KVM_TABLES_AFTER`]).
    pub zap_kvm_tables_after: Option<u64>,
    /// How guest-mm finds the tables a give-back emptied (default `count`).
    pub strategy: Option<ReclaimStrategy>,
    /// How given-back memory is released (default: `punch-hole` for memfd RAM, `dontneed`
    /// for anonymous RAM).
    pub release: Option<ReleaseChoice>,
}

/// The balloon section; its presence adds the device.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BalloonFile {
    /// Offer deflate-on-OOM (default false).
    pub deflate_on_oom: Option<bool>,
    /// Offer the statistics queue (default true).
    pub stats: Option<bool>,
    /// Seconds between guest statistics refreshes; 0 refreshes only when the API asks.
    pub stats_polling_interval_s: Option<u32>,
    /// Offer free page reporting (default false).
    pub reporting: Option<bool>,
    /// Offer free page hinting (default false; needs `queue_notify` `vcpu`).
    pub hinting: Option<bool>,
    /// The target when the guest's driver comes up, in MiB (default 0).
    pub target_mib: Option<u64>,
    /// Milliseconds without inflation after which the balloon's pages in 2 MiB blocks it holds
    /// only in part are released (0: at once; default [`DEFAULT_BALLOON_PARTIAL_RELEASE_MS`]).
    pub partial_release_ms: Option<u64>,
}

/// A VM description as one source gives it: every field optional, so that sources layer.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    /// What to boot.
    pub boot: BootFile,
    /// vCPUs, RAM size, vCPU threads.
    pub machine: MachineFile,
    /// How guest RAM is held.
    pub memory: MemoryFile,
    /// The balloon device, when there is one.
    pub balloon: Option<BalloonFile>,
    /// Path of the API Unix socket.
    pub api_sock: Option<PathBuf>,
}

/// `over`'s value where it has one, else `base`'s.
macro_rules! layer {
    ($base:expr, $over:expr, $($f:ident),+) => {
        $( $base.$f = $over.$f.or($base.$f.take()); )+
    };
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
        let malformed = |source| ConfigError::FileMalformed {
            path: path.to_owned(),
            source,
        };
        // An object, not any JSON serde would take for the struct (an array, say).
        let value: serde_json::Value = serde_json::from_str(text).map_err(malformed)?;
        if !value.is_object() {
            return Err(malformed(serde::de::Error::custom(
                "a config file is a JSON object",
            )));
        }
        serde_json::from_value(value).map_err(malformed)
    }

    /// Fields set in `over` replace those in `self`; a balloon section in either adds the
    /// balloon, its fields layered the same way.
    pub fn overlay(mut self, over: ConfigFile) -> ConfigFile {
        layer!(self.boot, over.boot, kernel, initrd, cmdline, pvh);
        layer!(
            self.machine,
            over.machine,
            vcpus,
            memory_mib,
            hlt_in_guest,
            full_xsave,
            queue_notify
        );
        layer!(
            self.memory,
            over.memory,
            track,
            thp,
            fault_around,
            fault_threads,
            zap_kvm_tables_after,
            strategy,
            release
        );
        self.balloon = match (self.balloon, over.balloon) {
            (Some(mut b), Some(o)) => {
                layer!(
                    b,
                    o,
                    deflate_on_oom,
                    stats,
                    stats_polling_interval_s,
                    reporting,
                    hinting,
                    target_mib,
                    partial_release_ms
                );
                Some(b)
            }
            (b, o) => o.or(b),
        };
        self.api_sock = over.api_sock.or(self.api_sock);
        self
    }
}

/// How guest-mm finds the second-level tables a give-back emptied (the seeds' debate).
#[derive(Debug, Default, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReclaimStrategy {
    /// Never at give-back (as KVM's TDP MMU); only `PUT /memory/reclaim` sweeps.
    Off,
    /// Rescan a table's 512 entries after clearing leaves in it.
    Scan,
    /// Keep a count of present entries in every table, updated on every fault and release.
    #[default]
    Count,
}

/// How given-back memory is released to the host.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseChoice {
    /// `MADV_DONTNEED` (anonymous RAM).
    Dontneed,
    /// `MADV_FREE`: lazily, the host takes the pages under memory pressure (anonymous RAM).
    Free,
    /// `fallocate(PUNCH_HOLE)` (memfd RAM).
    PunchHole,
    /// `MADV_REMOVE` (memfd RAM).
    Remove,
}

impl ReleaseChoice {
    /// Whether the mode releases memfd RAM (else anonymous RAM).
    pub fn for_memfd(self) -> bool {
        matches!(self, ReleaseChoice::PunchHole | ReleaseChoice::Remove)
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
    /// Offer free page hinting.
    pub hinting: bool,
    /// The target when the guest's driver comes up, in MiB.
    pub target_mib: u64,
    /// Milliseconds without inflation after which the pages of 2 MiB blocks the balloon holds
    /// only in part are released (blocks it holds whole go at once); 0: every page at once.
    pub partial_release_ms: u64,
}

impl BalloonSettings {
    fn validate(file: &BalloonFile) -> Result<Self, ConfigError> {
        let stats = file.stats.unwrap_or(true);
        let interval = file.stats_polling_interval_s.unwrap_or(0);
        if interval > MAX_BALLOON_STATS_S || (interval > 0 && !stats) {
            return Err(ConfigError::BadBalloonStatsInterval(interval));
        }
        let partial = file
            .partial_release_ms
            .unwrap_or(DEFAULT_BALLOON_PARTIAL_RELEASE_MS);
        if partial > MAX_BALLOON_PARTIAL_RELEASE_MS {
            return Err(ConfigError::BadBalloonPartialRelease(partial));
        }
        Ok(BalloonSettings {
            deflate_on_oom: file.deflate_on_oom.unwrap_or(false),
            stats,
            stats_polling_interval_s: interval,
            reporting: file.reporting.unwrap_or(false),
            hinting: file.hinting.unwrap_or(false),
            target_mib: file.target_mib.unwrap_or(0),
            partial_release_ms: partial,
        })
    }
}

/// What to boot, checked.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Boot {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// PVH boot.
    pub pvh: bool,
}

/// The machine, checked.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Machine {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// HLT exits off: an idle vCPU halts inside the guest, and KVM never parks a vCPU on a
    /// page the host has not filled yet (see `kvm::Vm::new`).
    pub hlt_in_guest: bool,
    /// Offer AVX and later XSAVE state to the guest.
    pub full_xsave: bool,
    /// Which thread handles virtio queue notifications.
    pub queue_notify: QueueNotify,
}

/// How guest RAM is held, checked.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Memory {
    /// Whether guest-mm tracks every guest page.
    pub track: bool,
    /// 2 MiB host pages.
    pub thp: bool,
    /// Pages filled per fault.
    pub fault_around: u32,
    /// userfaultfd handler threads.
    pub fault_threads: usize,
    /// Emptied 2 MiB blocks after which KVM drops its nested tables (0: never).
    pub zap_kvm_tables_after: u64,
    /// How guest-mm finds emptied tables.
    pub strategy: ReclaimStrategy,
    /// How given-back memory is released.
    pub release: ReleaseChoice,
}

impl Memory {
    /// Whether guest RAM is a memfd (tracked, 2 MiB pages) rather than anonymous memory.
    pub fn memfd(&self) -> bool {
        self.track && self.thp
    }
}

/// A complete, checked VM description; serialised, it is a config file for the same VM.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VmConfig {
    /// What to boot.
    pub boot: Boot,
    /// The machine.
    pub machine: Machine,
    /// Guest RAM.
    pub memory: Memory,
    /// The balloon device, when there is one.
    pub balloon: Option<BalloonSettings>,
    /// API socket path.
    pub api_sock: Option<PathBuf>,
}

impl VmConfig {
    /// Checks every field and fills defaults. Files are opened to prove they are readable.
    pub fn validate(file: ConfigFile) -> Result<Self, ConfigError> {
        let balloon = file
            .balloon
            .as_ref()
            .map(BalloonSettings::validate)
            .transpose()?;
        let kernel = file.boot.kernel.ok_or(ConfigError::MissingKernel)?;
        std::fs::File::open(&kernel).map_err(|source| ConfigError::KernelUnreadable {
            path: kernel.clone(),
            source,
        })?;
        if let Some(initrd) = &file.boot.initrd {
            std::fs::File::open(initrd).map_err(|source| ConfigError::InitrdUnreadable {
                path: initrd.clone(),
                source,
            })?;
        }
        let m = &file.machine;
        let vcpus = m.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > u64::from(MAX_VCPUS) {
            return Err(ConfigError::BadVcpus(vcpus));
        }
        let memory_mib = m.memory_mib.unwrap_or(256);
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(ConfigError::BadMemory(memory_mib));
        }
        if let Some(b) = &balloon
            && b.target_mib > memory_mib
        {
            return Err(ConfigError::BadBalloonTarget(b.target_mib, memory_mib));
        }
        let queue_notify = m.queue_notify.unwrap_or_default();
        if balloon.is_some_and(|b| b.hinting) && queue_notify != QueueNotify::Vcpu {
            return Err(ConfigError::HintingNeedsInlineNotify);
        }
        let cmdline = file
            .boot
            .cmdline
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
        if cmdline.contains('\0') {
            return Err(ConfigError::BadCmdline("it contains a NUL byte"));
        }
        if cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::BadCmdline("it is longer than 64 KiB"));
        }
        let mem = &file.memory;
        let thp = mem.thp.unwrap_or(true);
        // Tracked RAM with 2 MiB pages fills 8 blocks (16 MiB) per fault by default: a userfault
        // round trip costs milliseconds under nested virtualisation, and the window keeps the
        // guest's first touches within about 10% of untracked RAM (docs/ARCHITECTURE.md,
        // "Measurements"). With 4 KiB pages the default stays exact: the faulting page only.
        let fault_around =
            mem.fault_around
                .unwrap_or(if thp { DEFAULT_HUGE_FAULT_AROUND } else { 1 });
        if !fault_around.is_power_of_two() || fault_around > 4096 {
            return Err(ConfigError::BadFaultAround(fault_around));
        }
        let track = mem.track.unwrap_or(true);
        let memfd = track && thp;
        let release = mem.release.unwrap_or(if memfd {
            ReleaseChoice::PunchHole
        } else {
            ReleaseChoice::Dontneed
        });
        if release.for_memfd() != memfd {
            let kind = |m: bool| if m { "memfd" } else { "anonymous" };
            return Err(ConfigError::ReleaseMode {
                mode: match release {
                    ReleaseChoice::Dontneed => "dontneed",
                    ReleaseChoice::Free => "free",
                    ReleaseChoice::PunchHole => "punch-hole",
                    ReleaseChoice::Remove => "remove",
                },
                needs: kind(release.for_memfd()),
                has: kind(memfd),
            });
        }
        Ok(VmConfig {
            boot: Boot {
                kernel,
                initrd: file.boot.initrd,
                cmdline,
                pvh: file.boot.pvh.unwrap_or(false),
            },
            machine: Machine {
                // The range check above keeps this lossless.
                vcpus: vcpus as u8,
                memory_mib,
                hlt_in_guest: m.hlt_in_guest.unwrap_or(false),
                full_xsave: m.full_xsave.unwrap_or(false),
                queue_notify,
            },
            memory: Memory {
                track,
                thp,
                fault_around,
                fault_threads: mem.fault_threads.unwrap_or(2).clamp(1, 64) as usize,
                zap_kvm_tables_after: mem
                    .zap_kvm_tables_after
                    .unwrap_or(DEFAULT_ZAP_KVM_TABLES_AFTER),
                strategy: mem.strategy.unwrap_or_default(),
                release,
            },
            balloon,
            api_sock: file.api_sock,
        })
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.machine.memory_mib << 20
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
