//! Anonymous memory mappings: the only place in the guest tools that calls mmap, madvise or munmap.

use std::fmt;
use std::io;
use std::ptr::NonNull;

/// What failed while mapping or advising memory.
#[derive(Debug)]
pub enum MemError {
    /// `mmap` of an anonymous private mapping failed.
    Map { bytes: usize, source: io::Error },
    /// `madvise` failed.
    Advise {
        advice: &'static str,
        source: io::Error,
    },
    /// The request does not fit the mapping or is not page aligned.
    Range {
        offset: usize,
        len: usize,
        size: usize,
    },
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::Map { bytes, .. } => {
                write!(f, "cannot map {bytes} bytes of anonymous memory")
            }
            MemError::Advise { advice, .. } => write!(f, "madvise({advice}) failed"),
            MemError::Range { offset, len, size } => write!(
                f,
                "range {offset:#x}+{len:#x} is not page aligned or exceeds the {size:#x}-byte mapping"
            ),
        }
    }
}

impl std::error::Error for MemError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MemError::Map { source, .. } | MemError::Advise { source, .. } => Some(source),
            MemError::Range { .. } => None,
        }
    }
}

/// Size of a base page (4 KiB on x86_64).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 { 4096 } else { v as usize }
}

/// Huge page policy asked for a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thp {
    /// `MADV_NOHUGEPAGE`: every page is a 4 KiB page, so page tables are fully populated.
    Never,
    /// `MADV_HUGEPAGE`.
    Always,
    /// Leave the system default.
    Default,
}

/// A private anonymous mapping, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes (rounded up to a page) of zeroed anonymous memory.
    pub fn new(len: usize, thp: Thp) -> Result<Self, MemError> {
        let ps = page_size();
        let len = len.div_ceil(ps).max(1) * ps;
        // SAFETY: a fresh anonymous private mapping with a null hint does not alias any existing
        // Rust object; the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Map {
                bytes: len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(MemError::Map {
            bytes: len,
            source: io::Error::other("null mapping"),
        })?;
        let m = Mapping { ptr, len };
        match thp {
            Thp::Never => m.advise(0, len, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?,
            Thp::Always => m.advise(0, len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?,
            Thp::Default => {}
        }
        Ok(m)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Address of the first byte, as the process sees it.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The whole mapping as a byte slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live read/write mapping owned by self for its whole lifetime,
        // and the shared borrow of self keeps it from being mutated through as_mut_slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole mapping as a mutable byte slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; the exclusive borrow of self makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Gives `offset..offset+len` back to the kernel with `MADV_DONTNEED`; it reads as zero after.
    pub fn discard(&mut self, offset: usize, len: usize) -> Result<(), MemError> {
        self.advise(offset, len, libc::MADV_DONTNEED, "MADV_DONTNEED")
    }

    fn advise(
        &self,
        offset: usize,
        len: usize,
        advice: libc::c_int,
        name: &'static str,
    ) -> Result<(), MemError> {
        let ps = page_size();
        let end = offset.checked_add(len);
        if !offset.is_multiple_of(ps) || !len.is_multiple_of(ps) || end.is_none_or(|e| e > self.len)
        {
            return Err(MemError::Range {
                offset,
                len,
                size: self.len,
            });
        }
        // SAFETY: the range was checked to lie inside this mapping, which self owns. Callers that
        // discard hold &mut self (discard), so no slice into the range is alive across the call.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().add(offset).cast(), len, advice) };
        if r != 0 {
            return Err(MemError::Advise {
                advice: name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping created by mmap in new() and not unmapped before;
        // no reference into it outlives self.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_zeroes_and_checks_range() {
        let ps = page_size();
        let mut m = Mapping::new(4 * ps, Thp::Never).unwrap();
        m.as_mut_slice().fill(0xaa);
        m.discard(ps, 2 * ps).unwrap();
        let s = m.as_slice();
        assert_eq!(s[0], 0xaa);
        assert!(s[ps..3 * ps].iter().all(|&b| b == 0));
        assert_eq!(s[3 * ps], 0xaa);
        assert!(matches!(m.discard(1, ps), Err(MemError::Range { .. })));
        assert!(matches!(
            m.discard(3 * ps, 2 * ps),
            Err(MemError::Range { .. })
        ));
    }
}
