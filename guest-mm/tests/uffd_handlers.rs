//! The handler threads with a simple resolver: real toucher threads fault on a registered
//! mapping, deferred faults are retried, remove events reach the resolver, and dropping the
//! handlers stops them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use guest_mm::sys::{
    Advice, HOST_PAGE_SIZE, Mapping, UFFD_FEATURE_EVENT_REMOVE, UFFD_PAGEFAULT_FLAG_WRITE,
    UffdIoError, Userfaultfd,
};
use guest_mm::uffd::{FaultHandlers, FaultOutcome, FaultResolver, HandlerControl};

const PAGE: u64 = HOST_PAGE_SIZE;
const PAGES: u64 = 256;

/// Zero-fills faults; defers the first attempt at every page whose index is a multiple of 3.
struct Simple {
    base: u64,
    first_seen: Mutex<Vec<bool>>,
    resolved: AtomicU64,
    removes: Mutex<Vec<(u64, u64)>>,
    zero: Vec<u8>,
}

impl FaultResolver for Simple {
    fn fault(&self, uffd: &Userfaultfd, flags: u64, addr: u64) -> FaultOutcome {
        let page = (addr - self.base) / PAGE;
        {
            let mut seen = self.first_seen.lock().unwrap();
            if page.is_multiple_of(3) && !seen[page as usize] {
                seen[page as usize] = true;
                return FaultOutcome::Deferred;
            }
        }
        let dst = addr & !(PAGE - 1);
        let r = if flags & UFFD_PAGEFAULT_FLAG_WRITE != 0 {
            uffd.copy(dst, &self.zero, false)
        } else {
            uffd.zeropage(dst, PAGE, false)
        };
        match r {
            Ok(_) => {
                self.resolved.fetch_add(1, Ordering::Relaxed);
                FaultOutcome::Resolved
            }
            Err(UffdIoError::Exists { .. }) => {
                uffd.wake(dst, PAGE).unwrap();
                FaultOutcome::Resolved
            }
            Err(UffdIoError::Again { .. }) => FaultOutcome::Deferred,
            Err(UffdIoError::Failed(_)) => FaultOutcome::Failed,
        }
    }

    fn remove(&self, start: u64, end: u64) {
        self.removes.lock().unwrap().push((start, end));
    }
}

#[test]
fn handlers_resolve_defer_retry_and_see_removes() {
    let uffd = Arc::new(
        Userfaultfd::new(UFFD_FEATURE_EVENT_REMOVE).expect("userfaultfd is required (run as root)"),
    );
    let map = Arc::new(Mapping::anonymous(PAGES * PAGE, 2 << 20).unwrap());
    map.madvise(0, PAGES * PAGE, Advice::NoHugePage).unwrap();
    let base = map.as_ptr() as u64;
    uffd.register_missing(base, PAGES * PAGE).unwrap();
    let resolver = Arc::new(Simple {
        base,
        first_seen: Mutex::new(vec![false; PAGES as usize]),
        resolved: AtomicU64::new(0),
        removes: Mutex::new(Vec::new()),
        zero: vec![0; PAGE as usize],
    });
    let ctl = Arc::new(HandlerControl::new(2).unwrap());
    let handlers = FaultHandlers::start(uffd.clone(), ctl.clone(), resolver.clone(), None).unwrap();

    let t0 = Instant::now();
    let touchers: Vec<_> = (0..4u64)
        .map(|t| {
            thread::spawn(move || {
                for p in (t..PAGES).step_by(4) {
                    let a = (base + p * PAGE) as *mut u64;
                    // SAFETY: the page lies inside the live registered mapping; each toucher
                    // writes only its own pages.
                    unsafe {
                        if p.is_multiple_of(2) {
                            a.write_volatile(p);
                        } else {
                            assert_eq!(a.read_volatile(), 0);
                        }
                    }
                }
            })
        })
        .collect();
    for t in touchers {
        t.join().unwrap();
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
    for p in (0..PAGES).step_by(2) {
        // SAFETY: inside the mapping, present now.
        let v = unsafe { ((base + p * PAGE) as *const u64).read_volatile() };
        assert_eq!(v, p);
    }
    // Counters are bumped just after the fill has woken the toucher: settle first.
    assert!(
        ctl.settle(Duration::from_secs(5)),
        "handlers did not settle"
    );
    let c = ctl.counts();
    assert_eq!(resolver.resolved.load(Ordering::Relaxed), PAGES);
    assert!(c.deferred >= PAGES / 3, "deferred {} faults", c.deferred);
    assert!(c.retries >= c.deferred);
    assert_eq!(ctl.pending_retries(), 0);

    // A remove event reaches the resolver, and the madvise returns (a handler read it).
    map.madvise(8 * PAGE, 4 * PAGE, Advice::DontNeed).unwrap();
    ctl.quiesce();
    assert_eq!(
        *resolver.removes.lock().unwrap(),
        [(base + 8 * PAGE, base + 12 * PAGE)]
    );
    assert_eq!(ctl.counts().remove_events, 1);

    let t0 = Instant::now();
    drop(handlers);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "handlers did not stop promptly"
    );
}
