//! Checks the hand-written userfaultfd uapi (struct layouts and ioctl numbers) by making the real
//! calls: register, a real thread faulting, ZEROPAGE/COPY, EEXIST, REMOVE events and the EAGAIN
//! that a pending remove causes. Fails loudly if userfaultfd is not available.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use guest_mm::sys::{
    Advice, HOST_PAGE_SIZE, Mapping, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_REMOVE, UFFD_PAGEFAULT_FLAG_WRITE, UffdIoError, UffdMsg, Userfaultfd,
    poll_readable,
};

const PAGE: u64 = HOST_PAGE_SIZE;

fn uffd() -> Userfaultfd {
    Userfaultfd::new(UFFD_FEATURE_EVENT_REMOVE)
        .expect("userfaultfd with UFFD_FEATURE_EVENT_REMOVE is required (run as root)")
}

fn wait_msg(u: &Userfaultfd) -> UffdMsg {
    let mut buf = [UffdMsg::default(); 1];
    for _ in 0..500 {
        poll_readable([u.raw()], 10).unwrap();
        if u.read_msgs(&mut buf).unwrap() == 1 {
            return buf[0];
        }
    }
    panic!("no userfaultfd message within 5 s");
}

#[test]
fn fault_zeropage_copy_eexist() {
    let u = uffd();
    let m = Mapping::anonymous(16 * PAGE, PAGE).unwrap();
    let base = m.as_ptr() as u64;
    let ioctls = u.register_missing(base, 16 * PAGE).unwrap();
    assert_ne!(
        ioctls, 0,
        "kernel reported no ioctls for the registered range"
    );

    // A read fault resolved with a zero page.
    let addr = base + 2 * PAGE + 100;
    let reader = thread::spawn(move || {
        // SAFETY: the address is inside the live 16-page mapping; the read blocks until the
        // fault is resolved below.
        unsafe { (addr as *const u8).read_volatile() }
    });
    let msg = wait_msg(&u);
    assert_eq!(msg.event(), UFFD_EVENT_PAGEFAULT);
    let (flags, fault_addr) = msg.pagefault();
    assert_eq!(flags & UFFD_PAGEFAULT_FLAG_WRITE, 0);
    assert_eq!(fault_addr & !(PAGE - 1), base + 2 * PAGE);
    assert_eq!(u.zeropage(base + 2 * PAGE, PAGE, false).unwrap(), PAGE);
    assert_eq!(reader.join().unwrap(), 0);

    // A write fault resolved with a copy of a pattern.
    let addr = base + 5 * PAGE;
    let writer = thread::spawn(move || {
        // SAFETY: inside the live mapping; blocks until resolved.
        unsafe { (addr as *mut u8).add(8).write_volatile(0x5a) };
    });
    let msg = wait_msg(&u);
    let (flags, fault_addr) = msg.pagefault();
    assert_ne!(flags & UFFD_PAGEFAULT_FLAG_WRITE, 0);
    assert_eq!(fault_addr & !(PAGE - 1), addr);
    let src = vec![0x11u8; PAGE as usize];
    assert_eq!(u.copy(addr, &src, false).unwrap(), PAGE);
    writer.join().unwrap();
    // SAFETY: inside the live mapping and now present.
    let (b0, b8) = unsafe {
        (
            (addr as *const u8).read_volatile(),
            (addr as *const u8).add(8).read_volatile(),
        )
    };
    assert_eq!((b0, b8), (0x11, 0x5a));

    // Filling a present page: EEXIST, contents untouched.
    assert!(matches!(
        u.copy(addr, &src, true),
        Err(UffdIoError::Exists { done: 0 })
    ));
    assert!(matches!(
        u.zeropage(addr, PAGE, true),
        Err(UffdIoError::Exists { .. })
    ));
    // A multi-page fill that meets a present page part way reports what it did.
    match u.zeropage(base + 3 * PAGE, 3 * PAGE, true) {
        Err(UffdIoError::Again { done }) => assert_eq!(done, 2 * PAGE),
        other => panic!("expected a partial fill, got {other:?}"),
    }
    u.wake(base, 16 * PAGE).unwrap();
    u.unregister(base, 16 * PAGE).unwrap();
}

#[test]
fn remove_event_and_eagain_while_pending() {
    let u = uffd();
    let m = Mapping::anonymous(16 * PAGE, PAGE).unwrap();
    let base = m.as_ptr() as u64;
    u.register_missing(base, 16 * PAGE).unwrap();
    let src = vec![0u8; 4 * PAGE as usize];
    u.copy(base, &src, true).unwrap();

    // madvise on a registered range blocks until the REMOVE event is read.
    let (tx, rx) = mpsc::channel();
    let m = std::sync::Arc::new(m);
    let m2 = m.clone();
    let t = thread::spawn(move || {
        m2.madvise(PAGE, 2 * PAGE, Advice::DontNeed).unwrap();
        tx.send(()).unwrap();
    });
    // Wait until the event is queued, then check the madvise is still blocked and that fills
    // elsewhere report EAGAIN while the event is pending.
    poll_readable([u.raw()], 5000).unwrap();
    thread::sleep(Duration::from_millis(50));
    assert!(
        rx.try_recv().is_err(),
        "madvise returned before its REMOVE event was read"
    );
    assert!(matches!(
        u.zeropage(base + 8 * PAGE, PAGE, true),
        Err(UffdIoError::Again { done: 0 })
    ));
    let msg = wait_msg(&u);
    assert_eq!(msg.event(), UFFD_EVENT_REMOVE);
    assert_eq!(msg.remove(), (base + PAGE, base + 3 * PAGE));
    rx.recv_timeout(Duration::from_secs(5))
        .expect("madvise did not finish after the event was read");
    t.join().unwrap();
    // Now fills work again, and the removed pages are missing again.
    u.zeropage(base + 8 * PAGE, PAGE, true).unwrap();
    u.zeropage(base + PAGE, 2 * PAGE, true).unwrap();
    assert!(matches!(
        u.zeropage(base, PAGE, true),
        Err(UffdIoError::Exists { .. })
    ));
}

#[test]
fn register_outside_any_mapping_fails() {
    let u = uffd();
    assert!(u.register_missing(PAGE, PAGE).is_err());
}
