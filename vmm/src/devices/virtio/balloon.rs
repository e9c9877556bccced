//! The virtio-balloon device wired into ebb: a thin [`VirtioDevice`] over the `balloon`
//! crate's device model, the release backend that hands ranges to [`VmMemory::discard`], the
//! `/balloon` API endpoints (Firecracker's), and the statistics polling thread.
//!
//! Threads and locks: the device model sits in one `Arc<Mutex<Balloon>>`. The transport
//! reaches it from a vCPU thread (config space, status) or the event-loop thread (queue
//! notifications, with the transport lock held); the API handler from the event-loop thread;
//! the polling thread on its timer. Nobody holding the balloon lock takes another lock, so
//! the order is always transport → balloon.
//!
//! A queue notification runs the release synchronously on the event-loop thread: an inflate
//! chain of 256 pages is one `discard_many` call over its runs of contiguous frames, which
//! returns only after guest-mm has dropped the leaves and freed emptied table pages.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use balloon::{
    Balloon, BalloonConfig, BalloonError, BalloonStats, Notifier, NotifyKind, PAGES_PER_MIB,
    PageRange, ReleaseBackend, ReleaseError, stat_name,
};
use serde_json::{Value, json};

use super::{ActivateContext, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::api::{ApiHandler, ApiResponse, NOT_AFTER_START, parse_body};
use crate::config::BalloonSettings;
use crate::memory::VmMemory;

/// The balloon state shared by the device, the API handler and the polling thread.
pub type SharedBalloon = Arc<Mutex<Balloon>>;

fn lock(b: &Mutex<Balloon>) -> MutexGuard<'_, Balloon> {
    // A panic elsewhere while holding the lock leaves counters at worst half-updated.
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives ballooned and reported ranges back through [`VmMemory::discard`].
pub struct MemoryRelease(pub Arc<VmMemory>);

impl ReleaseBackend for MemoryRelease {
    fn release(&self, gpa: u64, len: u64) -> Result<u64, ReleaseError> {
        self.0.discard(gpa, len).map_err(|e| ReleaseError {
            gpa,
            ranges: 1,
            source: Box::new(e),
        })
    }

    fn release_many(&self, ranges: &[PageRange]) -> Result<u64, ReleaseError> {
        let pairs = pairs(ranges);
        self.0
            .discard_many(&pairs)
            .map_err(|e| batch_error(&pairs, e))
    }

    fn inflate_many(&self, ranges: &[PageRange]) -> Result<u64, ReleaseError> {
        let pairs = pairs(ranges);
        self.0
            .discard_held(&pairs)
            .map_err(|e| batch_error(&pairs, e))
    }

    fn deflate_many(&self, ranges: &[PageRange]) -> Result<(), ReleaseError> {
        let pairs = pairs(ranges);
        self.0.unhold(&pairs).map_err(|e| batch_error(&pairs, e))
    }
}

fn pairs(ranges: &[PageRange]) -> Vec<(u64, u64)> {
    ranges.iter().map(|r| (r.gpa(), r.len())).collect()
}

fn batch_error(pairs: &[(u64, u64)], e: crate::memory::MemoryError) -> ReleaseError {
    ReleaseError {
        gpa: pairs.first().map_or(0, |r| r.0),
        ranges: pairs.len(),
        source: Box::new(e),
    }
}

struct IrqNotifier(Arc<dyn VirtioInterrupt>);

impl Notifier for IrqNotifier {
    fn notify(&self, kind: NotifyKind) -> std::io::Result<()> {
        let kind = match kind {
            NotifyKind::Queue => InterruptKind::Queue,
            NotifyKind::Config => InterruptKind::Config,
        };
        self.0.trigger(kind).map_err(|e| e.0)
    }
}

/// The balloon as the virtio-mmio transport sees it.
pub struct BalloonDevice {
    shared: SharedBalloon,
    queue_sizes: Vec<u16>,
}

impl BalloonDevice {
    /// A device over `shared`; its queue count is fixed by the features offered.
    pub fn new(shared: SharedBalloon) -> Self {
        let queue_sizes = lock(&shared).queue_sizes();
        BalloonDevice {
            shared,
            queue_sizes,
        }
    }
}

impl VirtioDevice for BalloonDevice {
    fn device_type(&self) -> u32 {
        balloon::DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        lock(&self.shared).device_features()
    }

    fn ack_features(&mut self, features: u64) {
        lock(&self.shared).ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.shared).read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.shared).write_config(offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let notifier = Arc::new(IrqNotifier(ctx.interrupt));
        lock(&self.shared)
            .activate(ctx.mem, ctx.queues, notifier)
            .map_err(|e| ActivateError::Device(e.to_string()))
    }

    fn queue_notify(&mut self, index: usize) {
        lock(&self.shared).queue_notify(index);
    }

    fn reset(&mut self) {
        lock(&self.shared).reset();
    }
}

/// What [`build`] makes: the device for the transport, the API handler, and the shared state.
pub struct BalloonParts {
    /// The device, for `Plugins::devices`.
    pub device: Box<dyn VirtioDevice>,
    /// The `/balloon` endpoints, for `Plugins::api`.
    pub api: Box<dyn ApiHandler>,
    /// The state both reach.
    pub shared: SharedBalloon,
    /// Seconds between statistics refreshes (0: only when the API asks), shared with the
    /// endpoints that change it.
    pub polling_interval_s: Arc<AtomicU32>,
}

/// Builds the balloon over `memory` with `settings`.
pub fn build(
    memory: &Arc<VmMemory>,
    settings: &BalloonSettings,
) -> Result<BalloonParts, BalloonError> {
    let config = BalloonConfig {
        stats: settings.stats,
        deflate_on_oom: settings.deflate_on_oom,
        reporting: settings.reporting,
        hinting: settings.hinting,
    };
    let backend = Arc::new(MemoryRelease(memory.clone()));
    let mut balloon = Balloon::new(config, memory.size() as u64, backend)?;
    // The driver reads it when it comes up.
    balloon.set_target_pages(settings.target_mib.saturating_mul(PAGES_PER_MIB))?;
    let shared = Arc::new(Mutex::new(balloon));
    let interval = Arc::new(AtomicU32::new(settings.stats_polling_interval_s));
    Ok(BalloonParts {
        device: Box::new(BalloonDevice::new(shared.clone())),
        api: Box::new(BalloonApi::new(shared.clone(), interval.clone())),
        shared,
        polling_interval_s: interval,
    })
}

/// Starts a thread that asks the guest for fresh statistics every `interval` seconds (read at
/// every tick, so `PATCH /balloon/statistics` changes it); it ends on its own once the balloon
/// is dropped. Returns once the thread has installed its seccomp filter.
pub fn spawn_stats_poller(
    shared: &SharedBalloon,
    interval: Arc<AtomicU32>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let weak: Weak<Mutex<Balloon>> = Arc::downgrade(shared);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("balloon-stats".into())
        .spawn(move || {
            let filtered = crate::seccomp::install(crate::seccomp::ThreadKind::Stats, 0);
            let ok = filtered.is_ok();
            let _ = ready_tx.send(filtered);
            if !ok {
                return;
            }
            let mut last = Instant::now();
            loop {
                let every = Duration::from_secs(u64::from(interval.load(Ordering::Relaxed)));
                std::thread::sleep(
                    every.clamp(Duration::from_millis(100), Duration::from_millis(500)),
                );
                let Some(b) = weak.upgrade() else {
                    return;
                };
                if !every.is_zero() && last.elapsed() >= every {
                    last = Instant::now();
                    lock(&b).request_stats();
                }
            }
        })?;
    match ready.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(std::io::Error::other(
            "the statistics thread ended before it started",
        )),
    }
}

/// Body of `PATCH /balloon` (Firecracker's `BalloonUpdateConfig`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonUpdate {
    amount_mib: u32,
}

/// Body of `PATCH /balloon/statistics` (Firecracker's `BalloonUpdateStatsConfig`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsUpdate {
    stats_polling_interval_s: u16,
}

/// `GET /balloon`: the device's configuration (Firecracker's `BalloonDeviceConfig`).
#[derive(serde::Serialize)]
struct BalloonConfigReply {
    /// The target, in MiB.
    amount_mib: u64,
    deflate_on_oom: bool,
    stats_polling_interval_s: u32,
    free_page_hinting: bool,
    free_page_reporting: bool,
}

/// The refusal of a hinting request when the balloon does not offer hinting.
const HINTING_OFF: &str =
    "Balloon update error: Balloon: Attempting to use hinting when not enabled";

/// Body of `PATCH /balloon/hinting/start` (optional; unknown fields are ignored, as
/// Firecracker ignores them).
#[derive(serde::Deserialize)]
struct StartHinting {
    #[serde(default = "yes")]
    acknowledge_on_stop: bool,
}

fn yes() -> bool {
    true
}

/// `GET /balloon/hinting/status`.
#[derive(serde::Serialize)]
struct HintingStatus {
    host_cmd: u32,
    guest_cmd: Option<u32>,
}

/// The `/balloon` endpoints, Firecracker's: `GET` and `PATCH /balloon`, `GET` and
/// `PATCH /balloon/statistics`, and the hinting endpoints (refused: not offered). ebb's own
/// figures of the device are in `GET /memory` ([`ApiHandler::memory_figures`]).
pub struct BalloonApi {
    shared: SharedBalloon,
    polling_interval_s: Arc<AtomicU32>,
}

impl BalloonApi {
    /// Endpoints over `shared`; `polling_interval_s` is the poller's interval.
    pub fn new(shared: SharedBalloon, polling_interval_s: Arc<AtomicU32>) -> Self {
        BalloonApi {
            shared,
            polling_interval_s,
        }
    }

    fn config(&self) -> ApiResponse {
        let b = lock(&self.shared);
        let offered = b.device_features();
        ApiResponse::json(&BalloonConfigReply {
            amount_mib: b.target_pages() / PAGES_PER_MIB,
            deflate_on_oom: offered & (1 << balloon::F_DEFLATE_ON_OOM) != 0,
            stats_polling_interval_s: self.polling_interval_s.load(Ordering::Relaxed),
            free_page_hinting: offered & (1 << balloon::F_FREE_PAGE_HINT) != 0,
            free_page_reporting: offered & (1 << balloon::F_REPORTING) != 0,
        })
    }

    /// ebb's figures of the device: target and size, pages held, features, counters.
    fn figures(&self) -> Value {
        let b = lock(&self.shared);
        let acked = b.acked_features();
        let offered = b.device_features();
        let feature = |f: u64, bit: u32| f & (1 << bit) != 0;
        let features = |f: u64| {
            json!({
                "stats": feature(f, balloon::F_STATS_VQ),
                "deflate_on_oom": feature(f, balloon::F_DEFLATE_ON_OOM),
                "reporting": feature(f, balloon::F_REPORTING),
                "hinting": feature(f, balloon::F_FREE_PAGE_HINT),
            })
        };
        json!({
            "active": b.is_active(),
            "guest_ram_mib": b.ram_bytes() >> 20,
            "target_mib": b.target_pages() / PAGES_PER_MIB,
            "target_pages": b.target_pages(),
            "actual_mib": b.actual_pages() / PAGES_PER_MIB,
            "actual_pages": b.actual_pages(),
            "held_pages": b.held_pages(),
            "offered": features(offered),
            "negotiated": features(acked),
            "stats_polling_interval_s": self.polling_interval_s.load(Ordering::Relaxed),
            "stats_age_ms": b.guest_stats().map(|g| g.received.elapsed().as_millis() as u64),
            "counters": counters_json(&b.stats()),
        })
    }

    fn set_amount(&self, body: &[u8]) -> ApiResponse {
        let req: BalloonUpdate = match parse_body(body) {
            Ok(r) => r,
            Err(refusal) => return refusal,
        };
        let mut b = lock(&self.shared);
        if !b.is_active() {
            return ApiResponse::fault("Balloon update error: Balloon: Device not activated yet.");
        }
        let ram_mib = b.ram_bytes() >> 20;
        match b.set_target_pages(u64::from(req.amount_mib) * PAGES_PER_MIB) {
            Ok(()) => {
                log::info!("balloon target set to {} MiB", req.amount_mib);
                ApiResponse::no_content()
            }
            Err(BalloonError::TargetTooLarge { .. }) => ApiResponse::fault(&format!(
                "Balloon update error: Balloon: Requested memory should be less than {ram_mib}MiB"
            )),
            Err(e) => ApiResponse::fault(&format!("Balloon update error: {e}")),
        }
    }

    fn statistics(&self) -> ApiResponse {
        let mut b = lock(&self.shared);
        if b.device_features() & (1 << balloon::F_STATS_VQ) == 0 {
            return ApiResponse::fault(
                "Internal VMM error: Balloon: Received stats query when stats are disabled.",
            );
        }
        // Every read also asks the guest for fresh figures: they come back on the event loop
        // after this request returns, and the next read shows them.
        b.request_stats();
        let (target, actual) = (b.target_pages(), b.actual_pages());
        let mut out = serde_json::Map::new();
        out.insert("target_pages".into(), target.into());
        out.insert("actual_pages".into(), actual.into());
        out.insert("target_mib".into(), (target / PAGES_PER_MIB).into());
        out.insert("actual_mib".into(), (actual / PAGES_PER_MIB).into());
        // Firecracker's names; tags it does not know are left out.
        for &(tag, val) in b.guest_stats().map_or(&[][..], |g| &g.entries) {
            if let Some(name) = stat_name(tag) {
                out.insert(name.into(), val.into());
            }
        }
        ApiResponse::ok(out.into())
    }

    fn set_stats_interval(&self, body: &[u8]) -> ApiResponse {
        let req: StatsUpdate = match parse_body(body) {
            Ok(r) => r,
            Err(refusal) => return refusal,
        };
        let new = u32::from(req.stats_polling_interval_s);
        let old = self.polling_interval_s.load(Ordering::Relaxed);
        if new == old {
            return ApiResponse::no_content();
        }
        let stats = lock(&self.shared).device_features() & (1 << balloon::F_STATS_VQ) != 0;
        if !stats || (old == 0) != (new == 0) {
            return ApiResponse::fault(
                "Balloon update error: Balloon: Statistics cannot be enabled/disabled after activation.",
            );
        }
        self.polling_interval_s.store(new, Ordering::Relaxed);
        lock(&self.shared).request_stats();
        ApiResponse::no_content()
    }
}

impl BalloonApi {
    /// `PATCH /balloon/hinting/start` (with its optional body) or `.../stop` (`None`).
    fn hinting(&self, start: Option<&[u8]>) -> ApiResponse {
        let ack = match start {
            Some(body) if !body.is_empty() => match parse_body::<StartHinting>(body) {
                Ok(s) => Some(s.acknowledge_on_stop),
                Err(refusal) => return refusal,
            },
            Some(_) => Some(true),
            None => None,
        };
        let mut b = lock(&self.shared);
        if b.device_features() & (1 << balloon::F_FREE_PAGE_HINT) == 0 {
            return ApiResponse::fault(HINTING_OFF);
        }
        let res = match ack {
            Some(ack) => b.start_hinting(ack).map(|id| {
                log::info!("free page hinting run {id} started");
            }),
            None => b.stop_hinting(),
        };
        match res {
            Ok(()) => ApiResponse::no_content(),
            Err(BalloonError::NotActive) => {
                ApiResponse::fault("Balloon update error: Balloon: Device not activated yet.")
            }
            Err(_) => ApiResponse::fault(HINTING_OFF),
        }
    }
}

fn counters_json(s: &BalloonStats) -> Value {
    json!({
        "pages_inflated": s.pages_inflated,
        "pages_deflated": s.pages_deflated,
        "bytes_released": s.bytes_released,
        "inflate_ranges": s.inflate_ranges,
        "release_calls": s.release_calls,
        "reports_handled": s.reports_handled,
        "bytes_reported": s.bytes_reported,
        "bytes_report_released": s.bytes_report_released,
        "bad_pfns": s.bad_pfns,
        "duplicate_pfns": s.duplicate_pfns,
        "deflate_not_held": s.deflate_not_held,
        "bad_ranges": s.bad_ranges,
        "bad_descriptors": s.bad_descriptors,
        "chains_dropped": s.chains_dropped,
        "chains_used": s.chains_used,
        "release_errors": s.release_errors,
        "stats_updates": s.stats_updates,
        "stats_requests": s.stats_requests,
        "interrupt_errors": s.interrupt_errors,
        "config_writes_refused": s.config_writes_refused,
        "target_changes": s.target_changes,
        "notifications": s.notifications,
        "notify_ns_total": s.notify_ns_total,
        "notify_ns_max": s.notify_ns_max,
        "hint_runs": s.hint_runs,
        "hint_blocks": s.hint_blocks,
        "bytes_hinted": s.bytes_hinted,
        "hints_ignored": s.hints_ignored,
    })
}

impl ApiHandler for BalloonApi {
    fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> ApiResponse {
        match (method, path) {
            ("GET", "/balloon") => self.config(),
            ("PATCH", "/balloon") => self.set_amount(body),
            ("PUT", "/balloon") => ApiResponse::fault(NOT_AFTER_START),
            ("GET", "/balloon/statistics") => self.statistics(),
            ("PATCH", "/balloon/statistics") => self.set_stats_interval(body),
            ("PATCH", "/balloon/hinting/start") => self.hinting(Some(body)),
            ("PATCH", "/balloon/hinting/stop") => self.hinting(None),
            ("GET", "/balloon/hinting/status") => match lock(&self.shared).hinting_status() {
                Ok((host_cmd, guest_cmd)) => ApiResponse::json(&HintingStatus {
                    host_cmd,
                    guest_cmd,
                }),
                Err(_) => ApiResponse::fault(HINTING_OFF),
            },
            _ => ApiResponse::unknown(method, path),
        }
    }

    fn memory_figures(&mut self) -> Option<(&'static str, Value)> {
        Some(("balloon", self.figures()))
    }
}

#[cfg(test)]
#[path = "balloon_tests.rs"]
mod tests;
