//! ebb's other ways in and out, in one L1 boot of the rig: PVH boot of the ELF vmlinux, a guest
//! reset (exit 0), a guest panic (exit 2), SIGTERM (exit 130 with the report), and console input
//! from ebb's stdin reaching the guest. Needs `resources/setup.sh` (fails loudly otherwise).

use std::time::Duration;

use ebb_harness::{Job, Rig, RigFault, l1_shell_lib, static_ebb};

/// Host and guest are ordered by handshakes, never by sleeps: SIGTERM goes to ebb once its guest
/// says it runs, and the host types into ebb's stdin (a FIFO) once the guest says it is about to
/// read. The markers are computed in the guest (`$((40+2))`), so the command line the guest's init
/// echoes never matches them. ebb holds input until the guest's UART listens (devices/serial.rs),
/// so typing early would also arrive; the handshake keeps the test about the console, not timing.
const SCRIPT: &str = r#"
. "$EBB_RIG_INPUTS/ebb-l1-lib.sh"
E=./ebb; K=$EBB_L2_KERNEL; I=$EBB_L2_INITRAMFS
C="console=ttyS0 reboot=k panic=-1 quiet"
$E --pvh --no-track --kernel $EBB_L2_VMLINUX --initrd $I --vcpus 2 --memory-mib 256 --cmdline "$C -- echo pvh-cpus=\$(grep -c ^processor /proc/cpuinfo)"
echo "EXIT pvh=$?"
$E --no-track --kernel $K --initrd $I --memory-mib 256 --cmdline "$C -- reboot -f"
echo "EXIT reset=$?"
$E --no-track --kernel $K --initrd $I --memory-mib 256 --cmdline "$C -- echo c > /proc/sysrq-trigger"
echo "EXIT panic=$?"
OUT=/tmp/sigterm.out
$E --no-track --kernel $K --initrd $I --memory-mib 256 --cmdline "$C -- echo SIGTERM-READY-\$((40+2)); sleep 300" >$OUT 2>&1 & pid=$!
wait_for SIGTERM-READY-42 300 || echo "HANDSHAKE-FAILED sigterm"
kill -TERM $pid; wait $pid; st=$?
cat $OUT
echo "EXIT sigterm=$st"
OUT=/tmp/stdin.out; mkfifo /tmp/stdin.fifo
$E --no-track --kernel $K --initrd $I --memory-mib 256 --cmdline "$C -- echo STDIN-READY-\$((40+2)); read x < /dev/console; echo console-got=\$x" </tmp/stdin.fifo >$OUT 2>&1 & pid=$!
exec 3>/tmp/stdin.fifo
wait_for STDIN-READY-42 300 || echo "HANDSHAKE-FAILED stdin"
echo typed-into-ebb >&3
wait $pid; st=$?
exec 3>&-
cat $OUT
echo "EXIT stdin=$st"
"#;

#[test]
fn ebb_pvh_reset_panic_signal_and_stdin() {
    let rig = Rig::from_env().expect("rig images (run resources/setup.sh first)");
    let ebb = static_ebb().unwrap_or_else(|e| panic!("{e}"));
    // An L2 kernel oops on an int3 in code it just patched is the rig's emulation, not ebb
    // (docs/TESTING.md): run again, at most twice, said on stderr.
    let reruns = rig
        .l1_reruns("ebb_exits")
        .on(RigFault::GuestInt3Oops)
        .max_reruns(2);
    let out = rig
        .run_with(
            &Job::shell(SCRIPT)
                .input(&ebb)
                .input(l1_shell_lib())
                .timeout(Duration::from_secs(600)),
            &reruns,
        )
        .unwrap_or_else(|e| panic!("rig run failed: {e}"));
    let text = out.output_text();
    assert!(!text.contains("HANDSHAKE-FAILED"), "{text}");
    for (what, want) in [
        ("pvh", 0),
        ("reset", 0),
        ("panic", 2),
        ("sigterm", 130),
        ("stdin", 0),
    ] {
        let line = format!("EXIT {what}={want}");
        assert!(
            text.lines().any(|l| l.trim() == line),
            "expected {line:?}:\n{text}"
        );
    }
    assert!(
        text.contains("pvh-cpus=2"),
        "PVH guest sees 2 CPUs:\n{text}"
    );
    assert!(text.contains("guest requested a reset"), "{text}");
    assert!(text.contains("guest kernel panicked"), "{text}");
    assert!(text.contains("stopped by signal 15"), "{text}");
    assert!(
        text.contains("console-got=typed-into-ebb"),
        "stdin reaches the guest:\n{text}"
    );
    assert!(
        text.matches("---- ebb memory report ----").count() >= 5,
        "a report per run:\n{text}"
    );
}
