//! Per-page checksummed patterns for the `integrity` workload.
//!
//! A page filled for address `A` and generation `G` holds, as little-endian u64 words:
//! word 0 = `A`, word 1 = `G`, words 2..n-1 = a stream derived from (`A`, `G`, index), and the
//! last word = a checksum over all the others. Verifying tells apart a page that came back
//! zeroed (lost), one that is intact but belongs to another address or generation (stale or
//! misplaced), and one whose bytes were damaged (corrupt).

/// Verdict for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Exactly the expected contents.
    Good,
    /// Every byte is zero: the data was dropped.
    Zeroed,
    /// Self-consistent, but written for another address or generation.
    Stale,
    /// The checksum or the stream does not match.
    Corrupt,
}

const WORD: usize = 8;
const K_STREAM: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn seed(addr: u64, generation: u64) -> u64 {
    mix(addr ^ mix(generation.wrapping_add(K_STREAM)))
}

fn stream_word(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64).wrapping_mul(K_STREAM)
}

fn checksum(words: impl Iterator<Item = u64>) -> u64 {
    words.fold(0x6a09_e667_f3bc_c908, |acc, w| {
        (acc ^ w).rotate_left(23).wrapping_mul(0x100_0000_01b3)
    })
}

fn read_word(page: &[u8], i: usize) -> u64 {
    let mut b = [0u8; WORD];
    b.copy_from_slice(&page[i * WORD..(i + 1) * WORD]);
    u64::from_le_bytes(b)
}

fn write_word(page: &mut [u8], i: usize, v: u64) {
    page[i * WORD..(i + 1) * WORD].copy_from_slice(&v.to_le_bytes());
}

/// Fills `page` (a multiple of 8 bytes, at least 32) with the pattern for `addr` and `generation`.
pub fn fill(page: &mut [u8], addr: u64, generation: u64) {
    let n = page.len() / WORD;
    debug_assert!(n >= 4 && page.len().is_multiple_of(WORD));
    let s = seed(addr, generation);
    write_word(page, 0, addr);
    write_word(page, 1, generation);
    for i in 2..n - 1 {
        write_word(page, i, stream_word(s, i));
    }
    let sum = checksum((0..n - 1).map(|i| read_word(page, i)));
    write_word(page, n - 1, sum);
}

/// Checks `page` against the pattern for `addr` and `generation`.
pub fn verify(page: &[u8], addr: u64, generation: u64) -> PageState {
    let n = page.len() / WORD;
    let s = seed(addr, generation);
    let intact = (2..n - 1).all(|i| read_word(page, i) == stream_word(s, i))
        && read_word(page, 0) == addr
        && read_word(page, 1) == generation
        && read_word(page, n - 1) == checksum((0..n - 1).map(|i| read_word(page, i)));
    if intact {
        return PageState::Good;
    }
    if page.iter().all(|&b| b == 0) {
        return PageState::Zeroed;
    }
    // Consistent with the address and generation it claims, but not with ours.
    let (a, g) = (read_word(page, 0), read_word(page, 1));
    let s2 = seed(a, g);
    let self_consistent = (2..n - 1).all(|i| read_word(page, i) == stream_word(s2, i))
        && read_word(page, n - 1) == checksum((0..n - 1).map(|i| read_word(page, i)));
    if self_consistent {
        PageState::Stale
    } else {
        PageState::Corrupt
    }
}

/// Counts of page verdicts over a region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub good: u64,
    pub zeroed: u64,
    pub stale: u64,
    pub corrupt: u64,
}

impl Tally {
    /// Adds one verdict.
    pub fn add(&mut self, s: PageState) {
        match s {
            PageState::Good => self.good += 1,
            PageState::Zeroed => self.zeroed += 1,
            PageState::Stale => self.stale += 1,
            PageState::Corrupt => self.corrupt += 1,
        }
    }

    /// Pages that are not exactly as written.
    pub fn bad(&self) -> u64 {
        self.zeroed + self.stale + self.corrupt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 4096;

    #[test]
    fn fresh_page_verifies() {
        let mut p = vec![0u8; PS];
        fill(&mut p, 0x7f00_1234_5000, 3);
        assert_eq!(verify(&p, 0x7f00_1234_5000, 3), PageState::Good);
    }

    #[test]
    fn zero_page_is_zeroed() {
        let p = vec![0u8; PS];
        assert_eq!(verify(&p, 0x1000, 1), PageState::Zeroed);
    }

    #[test]
    fn other_address_or_generation_is_stale() {
        let mut p = vec![0u8; PS];
        fill(&mut p, 0x2000, 1);
        assert_eq!(verify(&p, 0x3000, 1), PageState::Stale);
        assert_eq!(verify(&p, 0x2000, 2), PageState::Stale);
    }

    #[test]
    fn any_single_bit_flip_is_detected() {
        let mut p = vec![0u8; PS];
        fill(&mut p, 0xdead_b000, 9);
        for byte in (0..PS).step_by(61) {
            for bit in [0u8, 3, 7] {
                let mut q = p.clone();
                q[byte] ^= 1 << bit;
                assert_ne!(
                    verify(&q, 0xdead_b000, 9),
                    PageState::Good,
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn swapped_pages_are_found() {
        let mut a = vec![0u8; PS];
        let mut b = vec![0u8; PS];
        fill(&mut a, 0x10_000, 1);
        fill(&mut b, 0x11_000, 1);
        assert_eq!(verify(&b, 0x10_000, 1), PageState::Stale);
        assert_eq!(verify(&a, 0x11_000, 1), PageState::Stale);
    }

    #[test]
    fn tally_counts_bad() {
        let mut t = Tally::default();
        for s in [
            PageState::Good,
            PageState::Zeroed,
            PageState::Stale,
            PageState::Corrupt,
        ] {
            t.add(s);
        }
        assert_eq!(
            t,
            Tally {
                good: 1,
                zeroed: 1,
                stale: 1,
                corrupt: 1
            }
        );
        assert_eq!(t.bad(), 3);
    }

    #[test]
    fn patterns_differ_between_pages() {
        let mut a = vec![0u8; PS];
        let mut b = vec![0u8; PS];
        fill(&mut a, 0x10_000, 1);
        fill(&mut b, 0x11_000, 1);
        // Only word 1 (the shared generation) may be equal.
        let same: Vec<usize> = (0..PS / 8)
            .filter(|&i| a[i * 8..i * 8 + 8] == b[i * 8..i * 8 + 8])
            .collect();
        assert_eq!(same, vec![1]);
    }
}
