//! Configuration over the API before start, Firecracker's way: `ebb --api-sock S` without a
//! kernel serves `PUT /boot-source`, `PUT`/`PATCH`/`GET /machine-config`, `PUT`/`GET /balloon`
//! and `PUT /actions` until `InstanceStart`, then hands the bound socket to the running VM.
//!
//! The bodies are Firecracker's (unknown fields refused), and so are the answers and the rules
//! of what may be asked before start (docs/API.md). What ebb does not have is refused with a
//! clear message rather than ignored: SMT, dirty page tracking, CPU templates, drives.
//! Everything set here lands in the same [`ConfigFile`] the command line fills, on top of the
//! flags ebb was started with, and is checked by [`VmConfig::validate`] at `InstanceStart`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use serde::{Deserialize, Serialize};

use crate::api::{
    ApiError, ApiHandler, ApiListener, ApiResponse, ApiServer, NOT_AFTER_START, NOT_BEFORE_START,
    parse_body,
};
use crate::config::{BalloonFile, ConfigFile, DEFAULT_CMDLINE, VmConfig};
use crate::layout::{MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};

/// Firecracker's memory size before any `PUT /machine-config`.
const DEFAULT_MEM_SIZE_MIB: u64 = 128;

/// `PUT /boot-source` (Firecracker's `BootSourceConfig`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image: bzImage or vmlinux ELF.
    pub kernel_image_path: PathBuf,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line (ebb's default when absent: `console=ttyS0 reboot=k panic=-1`).
    #[serde(default)]
    pub boot_args: Option<String>,
}

/// Firecracker's `huge_pages` values. ebb backs guest RAM its own way (guest-mm: a memfd
/// filled 2 MiB at a time unless `--no-thp`); every value is accepted and changes nothing.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum HugePages {
    /// 4 KiB pages (Firecracker's default).
    #[default]
    None,
    /// Transparent huge pages.
    Transparent,
    /// hugetlbfs 2 MiB pages.
    #[serde(rename = "2M")]
    Huge2M,
}

/// `PUT /machine-config` (Firecracker's `MachineConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfigPut {
    vcpu_count: u8,
    mem_size_mib: u64,
    #[serde(default)]
    smt: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    huge_pages: HugePages,
    #[serde(default)]
    cpu_template: Option<String>,
}

/// `PATCH /machine-config` (Firecracker's `MachineConfigUpdate`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfigPatch {
    vcpu_count: Option<u8>,
    mem_size_mib: Option<u64>,
    smt: Option<bool>,
    track_dirty_pages: Option<bool>,
    huge_pages: Option<HugePages>,
    cpu_template: Option<String>,
}

/// `GET /machine-config`: the machine as configured (or running).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Always false: ebb offers no SMT.
    pub smt: bool,
    /// Always false: ebb tracks no dirty pages.
    pub track_dirty_pages: bool,
    /// As last set (accepted, changes nothing).
    pub huge_pages: HugePages,
}

impl MachineConfig {
    /// The machine `c` describes (ebb has no SMT or dirty tracking, and backs RAM its own way).
    pub fn of(c: &VmConfig) -> Self {
        MachineConfig {
            vcpu_count: c.machine.vcpus,
            mem_size_mib: c.machine.memory_mib,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// `GET /` (Firecracker's `InstanceInfo`): `state` is "Not started" or "Running".
pub fn instance_info(state: &str) -> ApiResponse {
    ApiResponse::ok(serde_json::json!({
        "id": "anonymous-instance",
        "state": state,
        "vmm_version": env!("CARGO_PKG_VERSION"),
        "app_name": "ebb",
    }))
}

/// `GET /vm/config` in Firecracker's file format, from its three parts (ebb has no drives or
/// network interfaces).
fn vm_config_view(
    boot: Option<&BootSource>,
    machine: &MachineConfig,
    balloon: Option<&BalloonDevice>,
) -> serde_json::Value {
    serde_json::json!({
        "boot-source": boot,
        "machine-config": machine,
        "balloon": balloon,
        "drives": [],
        "network-interfaces": [],
    })
}

/// `PUT /balloon` (Firecracker's `BalloonDeviceConfig`); also `GET /balloon` before start.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonDevice {
    /// The target, in MiB, the driver sees when it comes up.
    pub amount_mib: u32,
    /// Offer deflate-on-OOM.
    pub deflate_on_oom: bool,
    /// Seconds between statistics refreshes; 0: no statistics queue (Firecracker's rule).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Offer free page hinting (runs started with `PATCH /balloon/hinting/start`).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Offer free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PUT /actions` (Firecracker's `InstanceActionInfo`), before start and after.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Action {
    pub action_type: ActionType,
}

/// Firecracker's actions.
#[derive(Debug, Deserialize)]
pub(crate) enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// Checks a machine configuration as ebb can run it; the refusal is Firecracker's wording where
/// Firecracker refuses the same, and says what ebb lacks otherwise.
fn check_machine(m: &MachineConfig, cpu_template: Option<&str>) -> Result<(), String> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return Err(format!(
            "Machine config error: The number of vCPUs must be greater than 0 and at most {MAX_VCPUS}."
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m.mem_size_mib) {
        return Err(format!(
            "Machine config error: The memory size (MiB) must be from {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}."
        ));
    }
    if m.smt {
        return Err("Machine config error: ebb does not offer simultaneous multithreading.".into());
    }
    if m.track_dirty_pages {
        return Err("Machine config error: ebb does not track dirty pages.".into());
    }
    if cpu_template.is_some_and(|t| t != "None") {
        return Err("Machine config error: ebb has no CPU templates.".into());
    }
    Ok(())
}

/// The configuration gathered before start.
pub struct PreBoot {
    base: ConfigFile,
    boot: Option<BootSource>,
    machine: MachineConfig,
    balloon: Option<BalloonDevice>,
    /// Set by a successful `InstanceStart`.
    start: Option<VmConfig>,
}

impl PreBoot {
    /// Starts from `base` (the command line's flags): its vCPUs and memory are the machine's
    /// until a `PUT /machine-config`.
    pub fn new(base: ConfigFile) -> Self {
        let machine = MachineConfig {
            vcpu_count: base.machine.vcpus.map_or(1, |v| v.min(255) as u8),
            mem_size_mib: base.machine.memory_mib.unwrap_or(DEFAULT_MEM_SIZE_MIB),
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        };
        PreBoot {
            base,
            boot: None,
            machine,
            balloon: None,
            start: None,
        }
    }

    /// The configuration file `InstanceStart` validates: the flags, overlaid with what was set
    /// here.
    fn config_file(&self) -> Result<ConfigFile, String> {
        let boot = self.boot.as_ref().ok_or(
            "Start microvm error: Cannot start microvm without kernel configuration.".to_owned(),
        )?;
        let mut over = ConfigFile::default();
        over.boot.kernel = Some(boot.kernel_image_path.clone());
        over.boot.initrd = boot.initrd_path.clone();
        over.boot.cmdline = Some(
            boot.boot_args
                .clone()
                .or_else(|| self.base.boot.cmdline.clone())
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
        );
        over.machine.vcpus = Some(u64::from(self.machine.vcpu_count));
        over.machine.memory_mib = Some(self.machine.mem_size_mib);
        if let Some(b) = &self.balloon {
            over.balloon = Some(BalloonFile {
                deflate_on_oom: Some(b.deflate_on_oom),
                stats: Some(b.stats_polling_interval_s > 0),
                stats_polling_interval_s: Some(u32::from(b.stats_polling_interval_s)),
                reporting: Some(b.free_page_reporting),
                hinting: Some(b.free_page_hinting),
                target_mib: Some(u64::from(b.amount_mib)),
                partial_release_ms: None,
            });
        }
        Ok(self.base.clone().overlay(over))
    }

    fn put_boot_source(&mut self, body: &[u8]) -> ApiResponse {
        match parse_body(body) {
            Ok(b) => self.set_boot_source(b),
            Err(refusal) => refusal,
        }
    }

    fn set_boot_source(&mut self, b: BootSource) -> ApiResponse {
        // Checked now, as Firecracker checks them.
        if let Err(e) = std::fs::File::open(&b.kernel_image_path) {
            return ApiResponse::fault(&format!(
                "Boot source error: The kernel file cannot be opened: {e}"
            ));
        }
        if let Some(p) = &b.initrd_path
            && let Err(e) = std::fs::File::open(p)
        {
            return ApiResponse::fault(&format!(
                "Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. {e}"
            ));
        }
        if let Some(args) = &b.boot_args
            && (args.contains('\0') || args.len() >= crate::layout::CMDLINE_MAX_SIZE)
        {
            return ApiResponse::fault(
                "Boot source error: The kernel command line is invalid: it has a NUL byte or is longer than 64 KiB",
            );
        }
        self.boot = Some(b);
        ApiResponse::no_content()
    }

    fn set_machine(&mut self, m: MachineConfig, cpu_template: Option<&str>) -> ApiResponse {
        if let Err(why) = check_machine(&m, cpu_template) {
            return ApiResponse::fault(&why);
        }
        if let Some(b) = &self.balloon
            && u64::from(b.amount_mib) > m.mem_size_mib
        {
            return ApiResponse::fault(
                "Machine config error: The memory size (MiB) is smaller than the previously set balloon device target size.",
            );
        }
        self.machine = m;
        ApiResponse::no_content()
    }

    fn put_machine(&mut self, body: &[u8]) -> ApiResponse {
        match parse_body(body) {
            Ok(p) => self.put_machine_typed(p),
            Err(refusal) => refusal,
        }
    }

    fn put_machine_typed(&mut self, p: MachineConfigPut) -> ApiResponse {
        let m = MachineConfig {
            vcpu_count: p.vcpu_count,
            mem_size_mib: p.mem_size_mib,
            smt: p.smt,
            track_dirty_pages: p.track_dirty_pages,
            huge_pages: p.huge_pages,
        };
        self.set_machine(m, p.cpu_template.as_deref())
    }

    fn patch_machine(&mut self, body: &[u8]) -> ApiResponse {
        let p: MachineConfigPatch = match parse_body(body) {
            Ok(p) => p,
            Err(refusal) => return refusal,
        };
        if p.vcpu_count.is_none()
            && p.mem_size_mib.is_none()
            && p.smt.is_none()
            && p.track_dirty_pages.is_none()
            && p.huge_pages.is_none()
            && p.cpu_template.is_none()
        {
            return ApiResponse::fault("Empty PATCH request.");
        }
        let old = self.machine;
        let m = MachineConfig {
            vcpu_count: p.vcpu_count.unwrap_or(old.vcpu_count),
            mem_size_mib: p.mem_size_mib.unwrap_or(old.mem_size_mib),
            smt: p.smt.unwrap_or(old.smt),
            track_dirty_pages: p.track_dirty_pages.unwrap_or(old.track_dirty_pages),
            huge_pages: p.huge_pages.unwrap_or(old.huge_pages),
        };
        self.set_machine(m, p.cpu_template.as_deref())
    }

    fn put_balloon(&mut self, body: &[u8]) -> ApiResponse {
        match parse_body(body) {
            Ok(b) => self.set_balloon(b),
            Err(refusal) => refusal,
        }
    }

    fn set_balloon(&mut self, b: BalloonDevice) -> ApiResponse {
        if u64::from(b.amount_mib) > self.machine.mem_size_mib {
            return ApiResponse::fault(
                "Balloon config error: Amount of pages requested is too large.",
            );
        }
        self.balloon = Some(b);
        ApiResponse::no_content()
    }

    fn action(&mut self, body: &[u8]) -> ApiResponse {
        let a: Action = match parse_body(body) {
            Ok(a) => a,
            Err(refusal) => return refusal,
        };
        match a.action_type {
            ActionType::InstanceStart => {
                let file = match self.config_file() {
                    Ok(f) => f,
                    Err(why) => return ApiResponse::fault(&why),
                };
                match VmConfig::validate(file) {
                    Ok(c) => {
                        self.start = Some(c);
                        ApiResponse::no_content()
                    }
                    Err(e) => ApiResponse::fault(&format!(
                        "Start microvm error: {}",
                        crate::error_line(&e)
                    )),
                }
            }
            ActionType::SendCtrlAltDel | ActionType::FlushMetrics => {
                ApiResponse::fault(NOT_BEFORE_START)
            }
        }
    }
}

/// Firecracker's `--config-file` format (its `VmmConfig`): the same bodies as the API, under
/// kebab-case keys. Keys ebb has nothing for must be absent, null or empty.
#[derive(Debug, Deserialize)]
struct FirecrackerConfig {
    #[serde(rename = "boot-source")]
    boot_source: BootSource,
    #[serde(rename = "machine-config", default)]
    machine_config: Option<MachineConfigPut>,
    #[serde(default)]
    balloon: Option<BalloonDevice>,
    drives: Vec<serde_json::Value>,
    #[serde(rename = "network-interfaces", default)]
    network_interfaces: Vec<serde_json::Value>,
    #[serde(default)]
    vsock: Option<serde_json::Value>,
    #[serde(default)]
    entropy: Option<serde_json::Value>,
    #[serde(default)]
    pmem: Vec<serde_json::Value>,
    #[serde(rename = "mmds-config", default)]
    mmds_config: Option<serde_json::Value>,
    #[serde(rename = "memory-hotplug", default)]
    memory_hotplug: Option<serde_json::Value>,
}

/// `GET /vm/config`: a configuration in Firecracker's file format, which `--config-file` reads
/// back (ebb's own settings, such as fault-around, are not in it).
pub fn firecracker_view(c: &VmConfig) -> serde_json::Value {
    let boot = BootSource {
        kernel_image_path: c.boot.kernel.clone(),
        initrd_path: c.boot.initrd.clone(),
        boot_args: Some(c.boot.cmdline.clone()),
    };
    let balloon = c.balloon.map(|b| BalloonDevice {
        amount_mib: u32::try_from(b.target_mib).unwrap_or(u32::MAX),
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: u16::try_from(b.stats_polling_interval_s).unwrap_or(u16::MAX),
        free_page_hinting: b.hinting,
        free_page_reporting: b.reporting,
    });
    vm_config_view(Some(&boot), &MachineConfig::of(c), balloon.as_ref())
}

/// Whether `text` is a Firecracker configuration file (it has a `boot-source`) rather than
/// ebb's own.
pub fn is_firecracker_config(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .is_some_and(|v| v.get("boot-source").is_some())
}

/// Reads a Firecracker configuration file into ebb's [`ConfigFile`], checked as the same
/// requests over the API would be; the error says what was refused.
pub fn firecracker_config(text: &str) -> Result<ConfigFile, String> {
    let fc: FirecrackerConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
    for (key, present) in [
        ("drives", !fc.drives.is_empty()),
        ("network-interfaces", !fc.network_interfaces.is_empty()),
        ("vsock", fc.vsock.is_some()),
        ("entropy", fc.entropy.is_some()),
        ("pmem", !fc.pmem.is_empty()),
        ("mmds-config", fc.mmds_config.is_some()),
        ("memory-hotplug", fc.memory_hotplug.is_some()),
    ] {
        if present {
            return Err(format!(
                "\"{key}\" must be empty or absent: ebb has no such device"
            ));
        }
    }
    let mut p = PreBoot::new(ConfigFile::default());
    let check = |r: ApiResponse| match r.fault_message() {
        Some(m) => Err(m.to_owned()),
        None => Ok(()),
    };
    if let Some(m) = fc.machine_config {
        check(p.put_machine_typed(m))?;
    }
    check(p.set_boot_source(fc.boot_source))?;
    if let Some(b) = fc.balloon {
        check(p.set_balloon(b))?;
    }
    p.config_file()
}

/// The endpoints before start.
pub struct PreBootApi(pub Arc<Mutex<PreBoot>>);

impl ApiHandler for PreBootApi {
    fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> ApiResponse {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if p.start.is_some() {
            // Started: the VM's server answers from now on; nothing here changes any more.
            return ApiResponse::fault(NOT_AFTER_START);
        }
        match (method, path) {
            ("GET", "/") => instance_info("Not started"),
            ("PUT", "/boot-source") => p.put_boot_source(body),
            ("GET", "/machine-config") => ApiResponse::json(&p.machine),
            ("PUT", "/machine-config") => p.put_machine(body),
            ("PATCH", "/machine-config") => p.patch_machine(body),
            ("PUT", "/balloon") => p.put_balloon(body),
            ("GET", "/balloon") => match &p.balloon {
                Some(b) => ApiResponse::json(b),
                None => ApiResponse::fault("Balloon config error: No balloon device found."),
            },
            ("PATCH", "/balloon" | "/balloon/statistics" | "/balloon/hinting/start")
            | ("PATCH", "/balloon/hinting/stop")
            | (
                "GET",
                "/balloon/statistics" | "/balloon/hinting/status" | "/memory" | "/metrics" | "/vm",
            ) => ApiResponse::fault(NOT_BEFORE_START),
            ("PUT", "/actions") => p.action(body),
            ("PUT", "/memory/reclaim") => ApiResponse::fault(NOT_BEFORE_START),
            ("GET", "/vm/config") => ApiResponse::ok(vm_config_view(
                p.boot.as_ref(),
                &p.machine,
                p.balloon.as_ref(),
            )),
            _ => ApiResponse::unknown(method, path),
        }
    }
}

/// Why waiting for the configuration ended without a VM to start.
#[derive(Debug, thiserror::Error)]
pub enum PreBootError {
    /// The API socket could not be opened.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
}

/// Serves `path` with the endpoints before start until `InstanceStart` succeeds; returns the
/// checked configuration and the still bound socket for the VM's server.
pub fn configure(base: ConfigFile, path: &Path) -> Result<(VmConfig, ApiListener), PreBootError> {
    let state = Arc::new(Mutex::new(PreBoot::new(base)));
    let server = ApiServer::bind(path, Box::new(PreBootApi(state.clone())))?;
    log::info!(
        "waiting for the configuration on {} (PUT /boot-source, /machine-config, /balloon, then PUT /actions InstanceStart)",
        path.display()
    );
    let mut em: EventManager<ApiServer> = EventManager::new().map_err(PreBootError::EventLoop)?;
    let id = em.add_subscriber(server);
    loop {
        em.run_with_timeout(100).map_err(PreBootError::EventLoop)?;
        let start = state.lock().unwrap_or_else(|e| e.into_inner()).start.take();
        if let Some(config) = start {
            let server = em.remove_subscriber(id).map_err(PreBootError::EventLoop)?;
            return Ok((config, server.into_listener()));
        }
    }
}

#[cfg(test)]
mod tests;
