//! The balloon device model: features, configuration space, queue dispatch and the state
//! shared with the control API.

use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::config_space::ConfigSpace;
use crate::frames::{FrameSet, PageRange, coalesce};
use crate::guest_stats::GuestStats;
use crate::queues::{Hint, merge_ranges, read_frames, read_hint, read_reported, read_stats};
use crate::stats::BalloonStats;
use crate::{
    CMD_ID_DONE, CMD_ID_STOP, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_REPORTING, F_STATS_VQ,
    PAGE_SIZE, QUEUE_SIZE, ReleaseBackend, ReleaseError,
};

/// Most chains taken from one queue per notification, so a driver that refills a queue as
/// fast as it is drained cannot hold the caller forever.
const MAX_CHAINS_PER_NOTIFY: usize = 4 * QUEUE_SIZE as usize;

/// What the host offers; each feature can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer the statistics queue (`VIRTIO_BALLOON_F_STATS_VQ`).
    pub stats: bool,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer free page reporting (`VIRTIO_BALLOON_F_REPORTING`).
    pub reporting: bool,
    /// Offer free page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`). Race-free only when every
    /// queue notification is handled before the notifying vCPU goes on (see
    /// [`Balloon::start_hinting`]).
    pub hinting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            stats: true,
            deflate_on_oom: false,
            reporting: false,
            hinting: false,
        }
    }
}

/// Why a balloon request was refused.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// Guest RAM cannot be described in 32-bit balloon page frame numbers.
    #[error(
        "guest RAM of {0} bytes is not a whole number of 4 KiB pages addressable by 32-bit frame numbers"
    )]
    BadRam(u64),
    /// The host asked for a balloon larger than guest RAM.
    #[error("a target of {requested} pages is more than guest RAM ({ram_pages} pages)")]
    TargetTooLarge {
        /// Requested pages.
        requested: u64,
        /// Pages of guest RAM.
        ram_pages: u64,
    },
    /// The driver made a different number of queues ready than its features need.
    #[error("the negotiated features need {expected} queues, the driver made {got} ready")]
    QueueCount {
        /// Queues the negotiated features need.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// Free page hinting was asked for, but the driver has not negotiated it (or it is not
    /// offered).
    #[error("free page hinting is not enabled")]
    HintingOff,
    /// A request needs the driver up.
    #[error("the device is not activated yet")]
    NotActive,
    /// A queue the device needs is not ready or lies outside guest memory.
    #[error("queue {0} is not ready or not inside guest memory")]
    QueueInvalid(usize),
}

/// What an interrupt tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyKind {
    /// Buffers were returned to a used ring.
    Queue,
    /// The configuration space changed (a new target).
    Config,
}

/// The device's way to interrupt the guest (the transport implements it).
pub trait Notifier: Send + Sync {
    /// Raises the interrupt for `kind`.
    fn notify(&self, kind: NotifyKind) -> std::io::Result<()>;
}

/// What each queue carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// Frames the guest gives up.
    Inflate,
    /// Frames the guest takes back.
    Deflate,
    /// The guest's statistics buffer.
    Stats,
    /// Free blocks the guest hints (free page hinting).
    Hinting,
    /// Free blocks the guest reports.
    Reporting,
}

/// The queues in driver order for `features`: inflate and deflate always, then one queue per
/// negotiated queue feature, with no gaps for features left out.
pub fn queue_roles(features: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if features & (1 << F_STATS_VQ) != 0 {
        roles.push(QueueRole::Stats);
    }
    if features & (1 << F_FREE_PAGE_HINT) != 0 {
        roles.push(QueueRole::Hinting);
    }
    if features & (1 << F_REPORTING) != 0 {
        roles.push(QueueRole::Reporting);
    }
    roles
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<(QueueRole, Queue)>,
    notifier: Arc<dyn Notifier>,
    /// Head of the statistics buffer the device holds until it wants fresh figures.
    held_stats: Option<u16>,
}

/// The balloon: one per VM, kept behind a lock shared by the transport and the control API.
pub struct Balloon {
    config: BalloonConfig,
    ram_bytes: u64,
    backend: Arc<dyn ReleaseBackend>,
    acked: u64,
    space: ConfigSpace,
    frames: FrameSet,
    stats: BalloonStats,
    guest_stats: Option<GuestStats>,
    active: Option<Active>,
    hint: HintState,
}

/// Free page hinting, the host's side of a run.
#[derive(Debug, Default, Clone, Copy)]
struct HintState {
    /// The command id published: a run's id (2 and up), or STOP / DONE.
    host_cmd: u32,
    /// The last run id used (ids go up, wrapping past 2).
    last_run: u32,
    /// The command id the guest last sent.
    guest_cmd: Option<u32>,
    /// Answer the guest's STOP with DONE (it then takes its hinted pages back).
    ack_on_stop: bool,
}

impl Balloon {
    /// Checks that `ram_bytes` of guest RAM at guest-physical 0 can be ballooned.
    pub fn check_ram(ram_bytes: u64) -> Result<u64, BalloonError> {
        let pages = ram_bytes / PAGE_SIZE;
        if ram_bytes == 0 || !ram_bytes.is_multiple_of(PAGE_SIZE) || pages > u64::from(u32::MAX) {
            return Err(BalloonError::BadRam(ram_bytes));
        }
        Ok(pages)
    }

    /// A balloon over `ram_bytes` of guest RAM at guest-physical 0 that releases through
    /// `backend`.
    pub fn new(
        config: BalloonConfig,
        ram_bytes: u64,
        backend: Arc<dyn ReleaseBackend>,
    ) -> Result<Self, BalloonError> {
        let pages = Self::check_ram(ram_bytes)?;
        Ok(Balloon {
            config,
            ram_bytes,
            backend,
            acked: 0,
            space: ConfigSpace::default(),
            frames: FrameSet::new(pages),
            stats: BalloonStats::default(),
            guest_stats: None,
            active: None,
            hint: HintState::default(),
        })
    }

    /// The features switched on.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// Guest RAM covered, in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// Feature bits offered (the transport adds `VIRTIO_F_VERSION_1`).
    pub fn device_features(&self) -> u64 {
        let mut f = 0u64;
        if self.config.stats {
            f |= 1 << F_STATS_VQ;
        }
        if self.config.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.config.reporting {
            f |= 1 << F_REPORTING;
        }
        if self.config.hinting {
            f |= 1 << F_FREE_PAGE_HINT;
        }
        f
    }

    /// Records the features the driver accepted (bits not offered are dropped).
    pub fn ack_features(&mut self, features: u64) {
        self.acked = features & self.device_features();
    }

    /// Balloon feature bits negotiated with the driver.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Maximum size of each queue the device may use: one per queue of the offered features.
    pub fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; queue_roles(self.device_features()).len()]
    }

    /// Reads configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.space.read(offset, data);
    }

    /// Writes configuration space (only `actual` is writable).
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.stats.config_writes_refused += self.space.write(offset, data) as u64;
    }

    /// Starts the device with the queues the driver set up. `queues` may hold more queues than
    /// the negotiated features need (a transport sized for every offered feature); the extra
    /// ones must not be ready. Buffers the driver queued before DRIVER_OK are handled here.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        notifier: Arc<dyn Notifier>,
    ) -> Result<(), BalloonError> {
        let roles = queue_roles(self.acked);
        let ready = queues.iter().filter(|q| q.ready()).count();
        if queues.len() < roles.len() || ready != roles.len() {
            return Err(BalloonError::QueueCount {
                expected: roles.len(),
                got: ready,
            });
        }
        let mut used = Vec::with_capacity(roles.len());
        for (i, (q, role)) in queues.into_iter().zip(roles).enumerate() {
            if !q.ready() || !q.is_valid(&mem) {
                return Err(BalloonError::QueueInvalid(i));
            }
            used.push((role, q));
        }
        let count = used.len();
        self.active = Some(Active {
            mem,
            queues: used,
            notifier,
            held_stats: None,
        });
        for i in 0..count {
            self.queue_notify(i);
        }
        Ok(())
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Returns to the state before activation. The host's target is kept; `actual`, the
    /// inflated set and a held statistics buffer are forgotten (the driver starts afresh).
    pub fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.space.actual = 0;
        self.space.free_page_hint_cmd_id = CMD_ID_STOP;
        self.hint = HintState::default();
        // A reset driver holds nothing: the memory layer may fill those pages freely again.
        let mut all = self.frames.take_all();
        tell_deflated(self.backend.as_ref(), &mut self.stats, &mut all);
    }

    /// The driver notified queue `index`. The time spent (releases included) is counted in
    /// `notify_ns_total` / `notify_ns_max`: it is time the caller's thread is held.
    pub fn queue_notify(&mut self, index: usize) {
        if self.active.is_none() {
            return;
        }
        let start = Instant::now();
        self.handle_notify(index);
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.notifications += 1;
        self.stats.notify_ns_total = self.stats.notify_ns_total.saturating_add(ns);
        self.stats.notify_ns_max = self.stats.notify_ns_max.max(ns);
    }

    fn handle_notify(&mut self, index: usize) {
        let Balloon {
            active,
            frames,
            stats,
            backend,
            guest_stats,
            ram_bytes,
            hint,
            space,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return;
        };
        let Some((role, _)) = active.queues.get(index) else {
            return;
        };
        let ctx = &mut Ctx {
            frames,
            stats,
            backend: backend.as_ref(),
            ram_bytes: *ram_bytes,
        };
        match *role {
            QueueRole::Inflate | QueueRole::Deflate => {
                let inflate = *role == QueueRole::Inflate;
                drain(active, index, ctx, |chain, mem, ctx| {
                    match read_frames(chain, mem, ctx.stats) {
                        Some(pfns) if inflate => ctx.inflate(pfns),
                        Some(pfns) => ctx.deflate(pfns),
                        None => ctx.stats.chains_dropped += 1,
                    }
                    true
                });
            }
            QueueRole::Hinting => {
                let mut stopped = false;
                drain(active, index, ctx, |chain, mem, ctx| {
                    match read_hint(chain, mem, ctx.ram_bytes, ctx.stats) {
                        Hint::Cmd(cmd) => {
                            hint.guest_cmd = Some(cmd);
                            stopped = cmd == CMD_ID_STOP;
                        }
                        // Only blocks of the run the host published are released: a block
                        // of an older run, or one sent after DONE, may be back in the guest's
                        // use already.
                        Hint::Blocks(blocks)
                            if hint.host_cmd > CMD_ID_DONE
                                && hint.guest_cmd == Some(hint.host_cmd) =>
                        {
                            ctx.hint(blocks);
                        }
                        Hint::Blocks(blocks) => ctx.stats.hints_ignored += blocks.len() as u64,
                        Hint::Bad => ctx.stats.chains_dropped += 1,
                    }
                    true
                });
                if stopped && hint.ack_on_stop && hint.host_cmd > CMD_ID_DONE {
                    hint.host_cmd = CMD_ID_DONE;
                    space.free_page_hint_cmd_id = CMD_ID_DONE;
                    if active.notifier.notify(NotifyKind::Config).is_err() {
                        stats.interrupt_errors += 1;
                    }
                }
            }
            QueueRole::Reporting => {
                drain(active, index, ctx, |chain, _, ctx| {
                    let ranges = read_reported(chain, ctx.ram_bytes, ctx.stats);
                    ctx.report(ranges);
                    true
                });
            }
            QueueRole::Stats => {
                let mut latest: Option<(u16, Option<Vec<u8>>)> = None;
                let mut returned = Vec::new();
                drain(active, index, ctx, |chain, mem, ctx| {
                    let head = chain.head_index();
                    let bytes = read_stats(chain, mem, ctx.stats);
                    if let Some((old, _)) = latest.replace((head, bytes)) {
                        returned.push(old);
                    }
                    false
                });
                let Some((head, bytes)) = latest else {
                    return;
                };
                // A driver sends one buffer at a time; any older one goes back unused.
                if let Some(old) = active.held_stats.replace(head) {
                    returned.push(old);
                }
                match bytes {
                    Some(b) => {
                        *guest_stats = Some(GuestStats::parse(&b, Instant::now()));
                        stats.stats_updates += 1;
                    }
                    None => stats.chains_dropped += 1,
                }
                give_back(active, index, &returned, stats);
            }
        }
    }

    /// Returns the held statistics buffer so the driver refills it with fresh figures.
    /// Returns false when there is none to return (no statistics queue, not active, or the
    /// driver has not sent the buffer back yet).
    pub fn request_stats(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(index) = active
            .queues
            .iter()
            .position(|(r, _)| *r == QueueRole::Stats)
        else {
            return false;
        };
        let Some(head) = active.held_stats.take() else {
            return false;
        };
        self.stats.stats_requests += 1;
        give_back(active, index, &[head], &mut self.stats);
        true
    }

    /// Starts a free page hinting run: publishes a new command id (2 and up) and tells the
    /// driver, which then hands over free 4 MiB blocks until it runs out or the id changes, and
    /// sends STOP. Each block is released as it arrives. Returns the run's id.
    ///
    /// The guest may take hinted blocks back to its allocator at any moment (its shrinker), so
    /// a block must be released before the guest can reuse it. The driver adds a block to the
    /// list its shrinker takes from only after its queue notification returns; the caller
    /// therefore must handle every notification of this queue before the notifying vCPU goes
    /// on (ebb's `--queue-notify vcpu`). Blocks that arrive for any other run than the current
    /// one are ignored, never released. With `acknowledge_on_stop`, the guest's STOP is
    /// answered with DONE, and the guest takes its blocks back.
    pub fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<u32, BalloonError> {
        let Some(active) = &self.active else {
            return Err(BalloonError::NotActive);
        };
        if self.acked & (1 << F_FREE_PAGE_HINT) == 0 {
            return Err(BalloonError::HintingOff);
        }
        let mut id = self.hint.last_run.wrapping_add(1);
        if id <= CMD_ID_DONE {
            id = CMD_ID_DONE + 1;
        }
        self.hint.last_run = id;
        self.hint.host_cmd = id;
        self.hint.ack_on_stop = acknowledge_on_stop;
        self.space.free_page_hint_cmd_id = id;
        self.stats.hint_runs += 1;
        if active.notifier.notify(NotifyKind::Config).is_err() {
            self.stats.interrupt_errors += 1;
        }
        Ok(id)
    }

    /// Ends hinting: publishes DONE, and the guest takes its hinted blocks back.
    pub fn stop_hinting(&mut self) -> Result<(), BalloonError> {
        let Some(active) = &self.active else {
            return Err(BalloonError::NotActive);
        };
        if self.acked & (1 << F_FREE_PAGE_HINT) == 0 {
            return Err(BalloonError::HintingOff);
        }
        self.hint.host_cmd = CMD_ID_DONE;
        self.space.free_page_hint_cmd_id = CMD_ID_DONE;
        if active.notifier.notify(NotifyKind::Config).is_err() {
            self.stats.interrupt_errors += 1;
        }
        Ok(())
    }

    /// The command id the host published and the one the guest last sent.
    pub fn hinting_status(&self) -> Result<(u32, Option<u32>), BalloonError> {
        if self.device_features() & (1 << F_FREE_PAGE_HINT) == 0 {
            return Err(BalloonError::HintingOff);
        }
        Ok((self.hint.host_cmd, self.hint.guest_cmd))
    }

    /// Sets the target size of the balloon and tells the driver.
    pub fn set_target_pages(&mut self, pages: u64) -> Result<(), BalloonError> {
        let ram_pages = self.ram_bytes / PAGE_SIZE;
        if pages > ram_pages {
            return Err(BalloonError::TargetTooLarge {
                requested: pages,
                ram_pages,
            });
        }
        // check_ram keeps ram_pages within u32.
        self.space.num_pages = pages as u32;
        self.stats.target_changes += 1;
        if let Some(active) = &self.active
            && active.notifier.notify(NotifyKind::Config).is_err()
        {
            self.stats.interrupt_errors += 1;
        }
        Ok(())
    }

    /// Target size in pages.
    pub fn target_pages(&self) -> u64 {
        u64::from(self.space.num_pages)
    }

    /// Pages the driver says it holds (`actual`).
    pub fn actual_pages(&self) -> u64 {
        u64::from(self.space.actual)
    }

    /// Pages the device saw inflated and not yet deflated.
    pub fn held_pages(&self) -> u64 {
        self.frames.held()
    }

    /// The counters.
    pub fn stats(&self) -> BalloonStats {
        self.stats
    }

    /// The guest's last statistics buffer.
    pub fn guest_stats(&self) -> Option<&GuestStats> {
        self.guest_stats.as_ref()
    }

    /// The role of queue `index` under the negotiated features.
    pub fn queue_role(&self, index: usize) -> Option<QueueRole> {
        queue_roles(self.acked).get(index).copied()
    }
}

/// Why pages are released.
#[derive(Clone, Copy)]
enum Release {
    /// Inflated: held by the guest until it deflates.
    Inflate,
    /// Reported free: the guest may reuse them at any time.
    Report,
}

/// The parts of the device a chain handler may change.
struct Ctx<'a> {
    frames: &'a mut FrameSet,
    stats: &'a mut BalloonStats,
    backend: &'a dyn ReleaseBackend,
    ram_bytes: u64,
}

impl Ctx<'_> {
    fn inflate(&mut self, pfns: Vec<u32>) {
        let mut fresh = Vec::with_capacity(pfns.len());
        for pfn in pfns.into_iter().map(u64::from) {
            if !self.frames.contains(pfn) {
                self.stats.bad_pfns += 1;
            } else if !self.frames.insert(pfn) {
                self.stats.duplicate_pfns += 1;
            } else {
                fresh.push(pfn);
            }
        }
        self.stats.pages_inflated += fresh.len() as u64;
        let ranges = coalesce(&mut fresh);
        self.stats.inflate_ranges += ranges.len() as u64;
        if let Some(n) = self.release(&ranges, Release::Inflate) {
            self.stats.bytes_released += n;
        }
    }

    fn deflate(&mut self, pfns: Vec<u32>) {
        let mut back = Vec::with_capacity(pfns.len());
        for pfn in pfns.into_iter().map(u64::from) {
            if !self.frames.contains(pfn) {
                self.stats.bad_pfns += 1;
            } else if self.frames.remove(pfn) {
                self.stats.pages_deflated += 1;
                back.push(pfn);
            } else {
                self.stats.deflate_not_held += 1;
            }
        }
        tell_deflated(self.backend, self.stats, &mut back);
    }

    fn hint(&mut self, blocks: Vec<PageRange>) {
        self.stats.hint_blocks += blocks.len() as u64;
        let merged = merge_ranges(blocks);
        self.stats.bytes_hinted += merged.iter().map(PageRange::len).sum::<u64>();
        // Hinted blocks are free in the guest like reported ones: released, not held.
        if let Some(n) = self.release(&merged, Release::Report) {
            self.stats.bytes_released += n;
        }
    }

    fn report(&mut self, ranges: Vec<PageRange>) {
        self.stats.reports_handled += ranges.len() as u64;
        let merged = merge_ranges(ranges);
        self.stats.bytes_reported += merged.iter().map(PageRange::len).sum::<u64>();
        if let Some(n) = self.release(&merged, Release::Report) {
            self.stats.bytes_report_released += n;
        }
    }

    /// One backend call for all of a chain's ranges.
    fn release(&mut self, ranges: &[PageRange], kind: Release) -> Option<u64> {
        if ranges.is_empty() {
            return None;
        }
        self.stats.release_calls += 1;
        let res = match kind {
            Release::Inflate => self.backend.inflate_many(ranges),
            Release::Report => self.backend.release_many(ranges),
        };
        match res {
            Ok(n) => Some(n),
            Err(e) => {
                count_release_error(self.stats, &e);
                None
            }
        }
    }
}

/// Tells the backend that `pfns` left the balloon, merged into runs.
fn tell_deflated(backend: &dyn ReleaseBackend, stats: &mut BalloonStats, pfns: &mut [u64]) {
    let ranges = coalesce(pfns);
    if !ranges.is_empty()
        && let Err(e) = backend.deflate_many(&ranges)
    {
        count_release_error(stats, &e);
    }
}

/// Counts a failed backend call; the 1st, 2nd, 4th, 8th... are logged, so a failure repeating
/// on every chain is visible without flooding the log.
fn count_release_error(stats: &mut BalloonStats, e: &ReleaseError) {
    stats.release_errors += 1;
    if stats.release_errors.is_power_of_two() {
        log_release_error(e, stats.release_errors);
    }
}

fn log_release_error(e: &ReleaseError, count: u64) {
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    log::warn!("balloon: {msg} (failure #{count})");
}

type ChainOf<'m> = virtio_queue::DescriptorChain<&'m GuestMemoryMmap>;

/// Pops every available chain of queue `index` (up to `MAX_CHAINS_PER_NOTIFY`) and hands
/// it to `handle`; when `handle` returns true the chain goes straight back to the used ring.
/// Interrupts the driver once if anything was returned.
fn drain<F>(active: &mut Active, index: usize, ctx: &mut Ctx<'_>, mut handle: F)
where
    F: for<'m> FnMut(ChainOf<'m>, &'m GuestMemoryMmap, &mut Ctx<'_>) -> bool,
{
    let Active {
        mem,
        queues,
        notifier,
        ..
    } = active;
    let Some((_, q)) = queues.get_mut(index) else {
        return;
    };
    let mut returned = false;
    for _ in 0..MAX_CHAINS_PER_NOTIFY {
        let Some(chain) = q.pop_descriptor_chain(&*mem) else {
            break;
        };
        let head = chain.head_index();
        if handle(chain, mem, ctx) {
            put_used(q, mem, head, ctx.stats);
            returned = true;
        }
    }
    if returned {
        signal(q, mem, notifier.as_ref(), ctx.stats);
    }
}

fn put_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, stats: &mut BalloonStats) {
    // A head index out of range is refused by virtio-queue; the chain is then lost to the
    // driver, which only hurts the driver.
    if q.add_used(mem, head, 0).is_ok() {
        stats.chains_used += 1;
    } else {
        stats.chains_dropped += 1;
    }
}

fn signal(q: &mut Queue, mem: &GuestMemoryMmap, notifier: &dyn Notifier, stats: &mut BalloonStats) {
    if q.needs_notification(mem).unwrap_or(true) && notifier.notify(NotifyKind::Queue).is_err() {
        stats.interrupt_errors += 1;
    }
}

fn give_back(active: &mut Active, index: usize, heads: &[u16], stats: &mut BalloonStats) {
    if heads.is_empty() {
        return;
    }
    let Active {
        mem,
        queues,
        notifier,
        ..
    } = active;
    let Some((_, q)) = queues.get_mut(index) else {
        return;
    };
    for &h in heads {
        put_used(q, mem, h, stats);
    }
    signal(q, mem, notifier.as_ref(), stats);
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
