//! `ebb-memscan PID`: how much memory a VMM process holds on the host, how much of it is guest
//! RAM, and how much of that is zeros. Prints one line, `host_kB=N guest_kB=N guest_zero_kB=N`.
//!
//! `host_kB` is VmRSS plus the guest RAM the host holds for the process that VmRSS leaves out:
//! for ebb, the pages of its guest memfd that no mapping of ebb maps yet.
//!
//! For ebb, guest RAM is a memfd (`memfd:ebb-guest-ram`): every page in the file counts, mapped
//! by ebb or not (a block fill puts pages in the file that ebb maps only when the guest touches
//! them, so VmRSS leaves them out). The file is opened through `/proc/PID/fd`, its residency read
//! with `mincore` on a read-only mapping of it, and only resident pages are read, so nothing is
//! allocated. For any other VMM, guest RAM is its largest anonymous read-write mapping (QEMU's
//! default RAM): the pages present in it (`/proc/PID/pagemap`) count, read through
//! `/proc/PID/mem`.
//!
//! Used by the side-by-side benchmark (scripts/bench-l1.sh) to show the floor every VMM that keeps
//! the guest's data pays: its non-zero pages.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

const PAGE: usize = 4096;

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0)
}

/// (resident pages, zero pages) of ebb's guest memfd.
fn scan_memfd(pid: &str) -> Result<Option<(u64, u64)>, String> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    for e in entries.flatten() {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        if !target.to_string_lossy().contains("memfd:ebb-guest-ram") {
            continue;
        }
        let f = File::open(e.path()).map_err(|err| format!("{}: {err}", e.path().display()))?;
        let len = f.metadata().map_err(|e| e.to_string())?.len() as usize;
        if len == 0 {
            return Ok(Some((0, 0)));
        }
        // SAFETY: a fresh read-only shared mapping of the file, unmapped below; nothing is
        // written through it and it is never dereferenced (only handed to mincore).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let mut v = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: `p` maps `len` bytes; `v` has one byte per page.
        let rc = unsafe { libc::mincore(p, len, v.as_mut_ptr()) };
        let err = std::io::Error::last_os_error();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
        if rc != 0 {
            return Err(format!("mincore: {err}"));
        }
        let (mut res, mut zero) = (0, 0);
        let mut buf = vec![0u8; PAGE];
        for (i, r) in v.iter().enumerate() {
            if r & 1 == 0 {
                continue;
            }
            res += 1;
            // pread of a resident page of a shmem file only copies it.
            f.read_exact_at(&mut buf, (i * PAGE) as u64)
                .map_err(|e| format!("reading the memfd: {e}"))?;
            if is_zero(&buf) {
                zero += 1;
            }
        }
        return Ok(Some((res, zero)));
    }
    Ok(None)
}

/// VmRSS and the Rss of the mappings of ebb's guest memfd, in kB, from /proc/PID/smaps.
fn rss_kb(pid: &str) -> Result<(u64, u64), String> {
    let smaps = File::open(format!("/proc/{pid}/smaps")).map_err(|e| e.to_string())?;
    let (mut total, mut guest) = (0, 0);
    let mut in_guest = false;
    for line in BufReader::new(smaps).lines().map_while(Result::ok) {
        let mut it = line.split_whitespace();
        let first = it.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_guest = line.contains("memfd:ebb-guest-ram");
        } else if first == "Rss:" {
            let kb: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kb;
            if in_guest {
                guest += kb;
            }
        }
    }
    Ok((total, guest))
}

/// (present pages, zero pages) of the process's largest anonymous read-write mapping.
fn scan_anon(pid: &str) -> Result<(u64, u64), String> {
    let maps = File::open(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
    let mut best = (0u64, 0u64);
    for line in BufReader::new(maps).lines().map_while(Result::ok) {
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms)) = (it.next(), it.next()) else {
            continue;
        };
        let path = it.nth(3);
        if !perms.starts_with("rw") || path.is_some() {
            continue;
        }
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        if e - s > best.1 - best.0 {
            best = (s, e);
        }
    }
    let (start, end) = best;
    let mut pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(|e| e.to_string())?;
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let pages = ((end - start) / PAGE as u64) as usize;
    let mut entries = vec![0u8; pages * 8];
    pagemap
        .seek(SeekFrom::Start(start / PAGE as u64 * 8))
        .and_then(|_| pagemap.read_exact(&mut entries))
        .map_err(|e| format!("pagemap: {e}"))?;
    let (mut res, mut zero) = (0, 0);
    let mut buf = vec![0u8; PAGE];
    for (i, e) in entries.chunks_exact(8).enumerate() {
        let e = u64::from_ne_bytes(e.try_into().unwrap_or([0; 8]));
        if e & (1 << 63) == 0 {
            continue;
        }
        res += 1;
        mem.read_exact_at(&mut buf, start + (i * PAGE) as u64)
            .map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
        if is_zero(&buf) {
            zero += 1;
        }
    }
    Ok((res, zero))
}

fn main() {
    let Some(pid) = std::env::args().nth(1) else {
        eprintln!("usage: ebb-memscan PID");
        std::process::exit(2);
    };
    let r = match scan_memfd(&pid) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => scan_anon(&pid),
        Err(e) => Err(e),
    };
    let r = r.and_then(|(res, zero)| rss_kb(&pid).map(|(rss, mapped)| (res, zero, rss, mapped)));
    match r {
        Ok((res, zero, rss, mapped)) => {
            // Guest pages in ebb's memfd that no mapping maps are not in VmRSS; for anonymous
            // guest RAM, mapped == 0 and every present page is already in VmRSS.
            let unmapped = if mapped > 0 {
                (res * 4).saturating_sub(mapped)
            } else {
                0
            };
            println!(
                "host_kB={} guest_kB={} guest_zero_kB={}",
                rss + unmapped,
                res * 4,
                zero * 4
            );
        }
        Err(e) => {
            eprintln!("ebb-memscan: {e}");
            std::process::exit(1);
        }
    }
}
