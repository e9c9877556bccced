//! Reading what the driver put in a descriptor chain. Nothing here trusts the guest: every
//! length is bounded before anything is allocated, every buffer is read through vm-memory
//! (which refuses addresses outside guest RAM), and a malformed chain is reported as such
//! rather than half-used.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::frames::PageRange;
use crate::stats::BalloonStats;
use crate::{PAGE_SIZE, guest_stats};

/// Most frame numbers accepted in one inflate or deflate chain (1 GiB worth of pages; Linux
/// sends at most 256).
pub(crate) const MAX_FRAMES_PER_CHAIN: usize = 1 << 18;
/// Most bytes accepted in one statistics chain.
pub(crate) const MAX_STATS_BYTES: usize = guest_stats::MAX_ENTRIES * guest_stats::ENTRY_SIZE * 4;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Device-readable buffers of `chain`, as (address, length); write-only ones are counted and
/// skipped.
fn readable(chain: Chain<'_>, stats: &mut BalloonStats) -> Vec<(vm_memory::GuestAddress, u32)> {
    let mut out = Vec::new();
    for d in chain {
        if d.is_write_only() {
            stats.bad_descriptors += 1;
        } else {
            out.push((d.addr(), d.len()));
        }
    }
    out
}

/// The le32 frame numbers of an inflate or deflate chain, or `None` when the chain is
/// malformed (a buffer length that is not a multiple of 4, too many frames, or a buffer
/// outside guest memory); the caller counts the drop.
pub(crate) fn read_frames(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    stats: &mut BalloonStats,
) -> Option<Vec<u32>> {
    let bufs = readable(chain, stats);
    let mut total = 0usize;
    for &(_, len) in &bufs {
        if len % 4 != 0 {
            return None;
        }
        total = total.checked_add(len as usize / 4)?;
        if total > MAX_FRAMES_PER_CHAIN {
            return None;
        }
    }
    let mut frames = Vec::with_capacity(total);
    let mut chunk = [0u8; 4096];
    for (addr, len) in bufs {
        let mut done = 0u64;
        let len = u64::from(len);
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            let at = addr.0.checked_add(done)?;
            mem.read_slice(&mut chunk[..n], vm_memory::GuestAddress(at))
                .ok()?;
            frames.extend(
                chunk[..n]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            done += n as u64;
        }
    }
    Some(frames)
}

/// What a free page hinting chain carries.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hint {
    /// A command id (one device-readable buffer of 4 bytes): the start of a run, or STOP.
    Cmd(u32),
    /// Free blocks (device-writable buffers), checked like reported blocks.
    Blocks(Vec<PageRange>),
    /// Neither: mixed directions, a command of another size, a buffer that cannot be read.
    Bad,
}

/// Reads a free page hinting chain.
pub(crate) fn read_hint(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    stats: &mut BalloonStats,
) -> Hint {
    let descs: Vec<_> = chain.collect();
    if descs.iter().all(|d| d.is_write_only()) && !descs.is_empty() {
        return Hint::Blocks(ranges_of(
            descs.iter().map(|d| (d.addr().0, u64::from(d.len()))),
            ram_bytes,
            stats,
        ));
    }
    match descs.as_slice() {
        [d] if !d.is_write_only() && d.len() == 4 => {
            let mut b = [0u8; 4];
            match mem.read_slice(&mut b, d.addr()) {
                Ok(()) => Hint::Cmd(u32::from_le_bytes(b)),
                Err(_) => Hint::Bad,
            }
        }
        _ => Hint::Bad,
    }
}

/// Page ranges from (address, length) buffers: blocks that are empty, not 4 KiB aligned or not
/// inside `ram_bytes` are counted in `bad_ranges` and left out.
fn ranges_of(
    bufs: impl Iterator<Item = (u64, u64)>,
    ram_bytes: u64,
    stats: &mut BalloonStats,
) -> Vec<PageRange> {
    let mut out = Vec::new();
    for (gpa, len) in bufs {
        let inside = gpa.checked_add(len).is_some_and(|end| end <= ram_bytes);
        if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || !inside {
            stats.bad_ranges += 1;
            continue;
        }
        out.push(PageRange {
            first: gpa / PAGE_SIZE,
            pages: len / PAGE_SIZE,
        });
    }
    out
}

/// The free blocks of a reporting chain: each descriptor's address and length, in either
/// direction (Linux adds them as device-writable buffers; the data is never read or written).
/// Blocks that are empty, not 4 KiB aligned or not inside `ram_bytes` are counted in
/// `bad_ranges` and left out.
pub(crate) fn read_reported(
    chain: Chain<'_>,
    ram_bytes: u64,
    stats: &mut BalloonStats,
) -> Vec<PageRange> {
    ranges_of(
        chain.map(|d| (d.addr().0, u64::from(d.len()))),
        ram_bytes,
        stats,
    )
}

/// Merges reported blocks that touch or overlap into as few ranges as possible.
pub(crate) fn merge_ranges(mut ranges: Vec<PageRange>) -> Vec<PageRange> {
    ranges.sort_unstable_by_key(|r| r.first);
    let mut out: Vec<PageRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.first <= last.first + last.pages => {
                let end = (last.first + last.pages).max(r.first + r.pages);
                last.pages = end - last.first;
            }
            _ => out.push(r),
        }
    }
    out
}

/// The bytes of a statistics chain (device-readable buffers, at most `MAX_STATS_BYTES`),
/// or `None` when a buffer cannot be read.
pub(crate) fn read_stats(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    stats: &mut BalloonStats,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for (addr, len) in readable(chain, stats) {
        let room = MAX_STATS_BYTES - out.len();
        let n = (len as usize).min(room);
        let start = out.len();
        out.resize(start + n, 0);
        mem.read_slice(&mut out[start..], addr).ok()?;
        if out.len() == MAX_STATS_BYTES {
            break;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_ranges_merge() {
        let r = |first, pages| PageRange { first, pages };
        assert_eq!(
            merge_ranges(vec![
                r(1024, 512),
                r(0, 512),
                r(512, 512),
                r(4096, 1),
                r(4096, 4)
            ]),
            vec![r(0, 1536), r(4096, 4)]
        );
        assert!(merge_ranges(Vec::new()).is_empty());
    }
}
