//! Counters of what the balloon did and what it refused. Kept under the device lock, copied
//! out for the control API; never logged per page.

/// Everything the balloon counts since the VM started (device resets do not clear it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonStats {
    /// Pages the guest put into the balloon (valid, not already held).
    pub pages_inflated: u64,
    /// Pages the guest took back out of the balloon.
    pub pages_deflated: u64,
    /// Host bytes covered by release calls for inflated pages, as the backend reports them
    /// (ebb's memory layer may release more than the pages: a whole 2 MiB block once its
    /// table empties).
    pub bytes_released: u64,
    /// Runs of contiguous inflated pages (coalesced ranges handed to the backend).
    pub inflate_ranges: u64,
    /// Calls to the release backend (one per chain that had something to release).
    pub release_calls: u64,
    /// Free-page-reporting ranges released.
    pub reports_handled: u64,
    /// Bytes in those ranges.
    pub bytes_reported: u64,
    /// Host bytes covered by release calls for reported ranges.
    pub bytes_report_released: u64,
    /// Frame numbers outside guest RAM (inflate or deflate), dropped.
    pub bad_pfns: u64,
    /// Inflated frame numbers already in the balloon, dropped.
    pub duplicate_pfns: u64,
    /// Deflated frame numbers that were not in the balloon (nothing to do).
    pub deflate_not_held: u64,
    /// Reported ranges that were unaligned, empty or outside guest RAM, dropped.
    pub bad_ranges: u64,
    /// Descriptors of the wrong direction, skipped.
    pub bad_descriptors: u64,
    /// Chains dropped whole: unreadable buffers, lengths not a multiple of the element
    /// size, or longer than the device accepts.
    pub chains_dropped: u64,
    /// Chains returned to the guest, all queues.
    pub chains_used: u64,
    /// Backend calls that failed (the pages of a failed inflate stay counted as held).
    pub release_errors: u64,
    /// Statistics buffers received from the guest.
    pub stats_updates: u64,
    /// Statistics refreshes requested (buffer returned to the guest).
    pub stats_requests: u64,
    /// Interrupts that could not be raised.
    pub interrupt_errors: u64,
    /// Bytes of configuration-space writes outside `actual`, ignored.
    pub config_writes_refused: u64,
    /// Config-change interrupts raised for a new target.
    pub target_changes: u64,
    /// Queue notifications handled while active (activation's own pass included).
    pub notifications: u64,
    /// Nanoseconds spent handling them, releases included.
    pub notify_ns_total: u64,
    /// Longest single notification, in nanoseconds.
    pub notify_ns_max: u64,
    /// Free page hinting runs the host started.
    pub hint_runs: u64,
    /// Free blocks the guest hinted in a current run and the host released.
    pub hint_blocks: u64,
    /// Bytes of those blocks.
    pub bytes_hinted: u64,
    /// Hinted blocks ignored: no run was current, or they belonged to an older run.
    pub hints_ignored: u64,
}
