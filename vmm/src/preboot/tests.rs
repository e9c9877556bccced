//! Firecracker's configuration sequence against the handler, with the requests of its
//! getting-started guide and ballooning documentation.

use super::*;
#[allow(unused_imports)]
use crate::config::{BalloonFile, BootFile, MachineFile, MemoryFile};

fn kernel() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn api() -> (PreBootApi, Arc<Mutex<PreBoot>>) {
    let state = Arc::new(Mutex::new(PreBoot::new(ConfigFile::default())));
    (PreBootApi(state.clone()), state)
}

fn call(h: &mut PreBootApi, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let r = h.handle(method, path, body.as_bytes());
    (r.status, r.body.unwrap_or(serde_json::Value::Null))
}

/// Sends a request that must be carried out (204).
fn accepted(h: &mut PreBootApi, method: &str, path: &str, body: &str) {
    let (status, answer) = call(h, method, path, body);
    assert_eq!(status, 204, "{method} {path} {body}: {answer}");
}

fn fault(h: &mut PreBootApi, method: &str, path: &str, body: &str) -> String {
    let (status, body) = call(h, method, path, body);
    assert_eq!(status, 400, "{method} {path} {body}");
    body["fault_message"].as_str().unwrap().to_owned()
}

#[test]
fn firecrackers_sequence_configures_and_starts() {
    let (mut h, state) = api();
    let (s, info) = call(&mut h, "GET", "/", "");
    assert_eq!((s, info["state"].as_str()), (200, Some("Not started")));
    let (s, m) = call(&mut h, "GET", "/machine-config", "");
    assert_eq!(s, 200);
    assert_eq!(
        m,
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
            "track_dirty_pages": false, "huge_pages": "None"})
    );
    let boot = format!(
        r#"{{ "kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off" }}"#,
        kernel().display()
    );
    accepted(&mut h, "PUT", "/boot-source", &boot);
    accepted(
        &mut h,
        "PUT",
        "/machine-config",
        r#"{ "vcpu_count": 2, "mem_size_mib": 1024 }"#,
    );
    accepted(
        &mut h,
        "PUT",
        "/balloon",
        r#"{ "amount_mib": 64, "deflate_on_oom": false, "stats_polling_interval_s": 1 }"#,
    );
    let (s, b) = call(&mut h, "GET", "/balloon", "");
    assert_eq!(s, 200);
    assert_eq!(
        b,
        serde_json::json!({"amount_mib": 64, "deflate_on_oom": false,
            "stats_polling_interval_s": 1, "free_page_hinting": false, "free_page_reporting": false})
    );
    // What needs a running guest is refused before start.
    for (m, p, body) in [
        ("PATCH", "/balloon", r#"{"amount_mib": 1}"#),
        ("GET", "/balloon/statistics", ""),
        (
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": 2}"#,
        ),
        ("PATCH", "/balloon/hinting/start", ""),
        ("GET", "/balloon/hinting/status", ""),
        ("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
        ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
    ] {
        assert_eq!(fault(&mut h, m, p, body), NOT_BEFORE_START, "{m} {p}");
    }
    accepted(
        &mut h,
        "PUT",
        "/actions",
        r#"{ "action_type": "InstanceStart" }"#,
    );
    let c = state.lock().unwrap().start.clone().expect("started");
    assert_eq!((c.machine.vcpus, c.machine.memory_mib), (2, 1024));
    assert_eq!(c.boot.cmdline, "console=ttyS0 reboot=k panic=1 pci=off");
    assert_eq!(c.boot.kernel, kernel());
    let b = c.balloon.expect("a balloon");
    assert_eq!(
        (
            b.target_mib,
            b.stats,
            b.stats_polling_interval_s,
            b.reporting
        ),
        (64, true, 1, false)
    );
    // Once started, nothing here changes anything.
    assert_eq!(
        fault(
            &mut h,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 256}"#
        ),
        NOT_AFTER_START
    );
}

#[test]
fn refused_requests_change_nothing() {
    let (mut h, state) = api();
    accepted(
        &mut h,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 512}"#,
    );
    let before = call(&mut h, "GET", "/machine-config", "").1;
    for (body, starts) in [
        (
            r#"{"vcpu_count": 0, "mem_size_mib": 512}"#,
            "Machine config error: The number of vCPUs",
        ),
        (
            r#"{"vcpu_count": 33, "mem_size_mib": 512}"#,
            "Machine config error: The number of vCPUs",
        ),
        (
            r#"{"vcpu_count": 1, "mem_size_mib": 0}"#,
            "Machine config error: The memory size",
        ),
        (
            r#"{"vcpu_count": 2, "mem_size_mib": 512, "smt": true}"#,
            "Machine config error: ebb does not offer",
        ),
        (
            r#"{"vcpu_count": 2, "mem_size_mib": 512, "track_dirty_pages": true}"#,
            "Machine config error: ebb does not track",
        ),
        (
            r#"{"vcpu_count": 2, "mem_size_mib": 512, "cpu_template": "T2"}"#,
            "Machine config error: ebb has no CPU",
        ),
        (
            r#"{"vcpu_count": 2}"#,
            "An error occurred when deserializing the json body of a request: missing field `mem_size_mib`",
        ),
        (
            r#"{"vcpu_count": 2, "mem_size_mib": 512, "foo": 1}"#,
            "An error occurred when deserializing the json body of a request: unknown field `foo`",
        ),
        (
            r#"{"vcpu_count": 2, "mem_size_mib": 512, "huge_pages": "1G"}"#,
            "An error occurred when deserializing",
        ),
    ] {
        assert!(
            fault(&mut h, "PUT", "/machine-config", body).starts_with(starts),
            "{body}"
        );
    }
    assert_eq!(
        fault(&mut h, "PATCH", "/machine-config", "{}"),
        "Empty PATCH request."
    );
    assert_eq!(call(&mut h, "GET", "/machine-config", "").1, before);
    accepted(
        &mut h,
        "PATCH",
        "/machine-config",
        r#"{"mem_size_mib": 256}"#,
    );
    assert_eq!(
        call(&mut h, "GET", "/machine-config", "").1["mem_size_mib"],
        256
    );

    assert!(
        fault(
            &mut h,
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#
        )
        .starts_with("Boot source error: The kernel file cannot be opened: ")
    );
    let k = kernel();
    let bad_initrd = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "/nonexistent/initrd"}}"#,
        k.display()
    );
    assert!(
        fault(&mut h, "PUT", "/boot-source", &bad_initrd)
            .starts_with("Boot source error: The initrd")
    );
    assert!(
        fault(
            &mut h,
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "kernel_args": "x"}"#
        )
        .contains("unknown field `kernel_args`")
    );
    assert!(
        fault(&mut h, "GET", "/balloon", "") == "Balloon config error: No balloon device found."
    );
    for (body, starts) in [
        (
            r#"{"amount_mib": 257, "deflate_on_oom": true}"#,
            "Balloon config error: Amount of pages requested is too large.",
        ),
        (
            r#"{"amount_mib": 1}"#,
            "An error occurred when deserializing the json body of a request: missing field `deflate_on_oom`",
        ),
        (
            r#"{"amount_mib": 1, "deflate_on_oom": true, "target_mib": 1}"#,
            "An error occurred when deserializing the json body of a request: unknown field `target_mib`",
        ),
    ] {
        assert_eq!(
            &fault(&mut h, "PUT", "/balloon", body)[..starts.len()],
            starts,
            "{body}"
        );
    }
    assert!(fault(&mut h, "GET", "/balloon", "").contains("No balloon device found"));
    // A balloon larger than a later machine is refused, and the machine stays.
    accepted(
        &mut h,
        "PUT",
        "/balloon",
        r#"{"amount_mib": 200, "deflate_on_oom": true}"#,
    );
    assert!(
        fault(
            &mut h,
            "PATCH",
            "/machine-config",
            r#"{"mem_size_mib": 128}"#
        )
        .contains("smaller than the previously set balloon")
    );
    assert_eq!(
        call(&mut h, "GET", "/machine-config", "").1["mem_size_mib"],
        256
    );

    // Starting without a kernel, or with a bad action, is refused and starts nothing.
    assert_eq!(
        fault(
            &mut h,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#
        ),
        "Start microvm error: Cannot start microvm without kernel configuration."
    );
    assert!(
        fault(&mut h, "PUT", "/actions", r#"{"action_type": "Reboot"}"#)
            .contains("unknown variant `Reboot`")
    );
    assert!(
        fault(&mut h, "GET", "/nowhere", "")
            .starts_with("Invalid request method and/or path: GET nowhere.")
    );
    assert!(state.lock().unwrap().start.is_none());
}

#[test]
fn the_command_line_fills_what_the_api_leaves_out() {
    let base = ConfigFile {
        boot: BootFile {
            cmdline: Some("console=ttyS0 quiet".into()),
            ..Default::default()
        },
        machine: MachineFile {
            memory_mib: Some(512),
            vcpus: Some(2),
            ..Default::default()
        },
        memory: MemoryFile {
            fault_around: Some(512),
            ..Default::default()
        },
        ..ConfigFile::default()
    };
    let state = Arc::new(Mutex::new(PreBoot::new(base)));
    let mut h = PreBootApi(state.clone());
    let (_, m) = call(&mut h, "GET", "/machine-config", "");
    assert_eq!(
        (m["vcpu_count"].clone(), m["mem_size_mib"].clone()),
        (2.into(), 512.into())
    );
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel().display());
    accepted(&mut h, "PUT", "/boot-source", &boot);
    accepted(
        &mut h,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let c = state.lock().unwrap().start.clone().unwrap();
    assert_eq!(
        (c.machine.vcpus, c.machine.memory_mib, c.memory.fault_around),
        (2, 512, 512)
    );
    assert_eq!(c.boot.cmdline, "console=ttyS0 quiet");
    assert!(c.balloon.is_none());
}

#[test]
fn firecrackers_config_file_is_read_like_its_requests() {
    let k = kernel();
    let text = format!(
        r#"{{ "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1", "initrd_path": null}},
            "drives": [],
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false, "huge_pages": "None"}},
            "balloon": {{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1, "free_page_hinting": false, "free_page_reporting": false}},
            "logger": null, "metrics": null }}"#,
        k.display()
    );
    assert!(is_firecracker_config(&text));
    let c = VmConfig::validate(firecracker_config(&text).unwrap()).unwrap();
    assert_eq!((c.machine.vcpus, c.machine.memory_mib), (2, 1024));
    assert_eq!(c.boot.cmdline, "console=ttyS0 reboot=k panic=1");
    assert_eq!(c.balloon.unwrap().stats_polling_interval_s, 1);
    // Through ConfigFile::parse, as --config-file reads it.
    let parsed = ConfigFile::parse(Path::new("vm.json"), &text).unwrap();
    assert_eq!(VmConfig::validate(parsed).unwrap(), c);

    let no_drives = text.replace(r#""drives": [],"#, "");
    assert!(
        firecracker_config(&no_drives)
            .unwrap_err()
            .contains("missing field `drives`")
    );
    let a_drive = text.replace(r#""drives": []"#, r#""drives": [{"drive_id": "rootfs"}]"#);
    assert!(
        firecracker_config(&a_drive)
            .unwrap_err()
            .contains("\"drives\" must be empty")
    );
    let smt = text.replace(r#""smt": false"#, r#""smt": true"#);
    assert!(
        firecracker_config(&smt)
            .unwrap_err()
            .contains("ebb does not offer")
    );
    let big = text.replace(r#""amount_mib": 0"#, r#""amount_mib": 2048"#);
    assert!(firecracker_config(&big).unwrap_err().contains("too large"));
    let e = ConfigFile::parse(Path::new("vm.json"), &a_drive).unwrap_err();
    assert!(
        e.to_string().contains("vm.json (Firecracker's format)"),
        "{e}"
    );
    assert!(!is_firecracker_config(r#"{"kernel": "/k"}"#));
}

#[test]
fn get_vm_config_reads_back_as_a_config_file() {
    let (mut h, state) = api();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 quiet"}}"#,
        kernel().display()
    );
    accepted(&mut h, "PUT", "/boot-source", &boot);
    accepted(
        &mut h,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 3, "mem_size_mib": 768}"#,
    );
    accepted(
        &mut h,
        "PUT",
        "/balloon",
        r#"{"amount_mib": 100, "deflate_on_oom": true, "free_page_reporting": true}"#,
    );
    let (s, before) = call(&mut h, "GET", "/vm/config", "");
    assert_eq!(s, 200);
    assert_eq!(before["machine-config"]["vcpu_count"], 3);
    accepted(
        &mut h,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let started = state.lock().unwrap().start.clone().unwrap();
    // What the running VM answers, fed back as a config file, is the same VM.
    let view = firecracker_view(&started);
    let again = VmConfig::validate(firecracker_config(&view.to_string()).unwrap()).unwrap();
    assert_eq!(again, started);
    assert_eq!(view["balloon"], before["balloon"]);
    assert_eq!(view["machine-config"], before["machine-config"]);
}

#[test]
fn free_page_hinting_is_offered_with_inline_notification_only() {
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel().display());
    let hinted = r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#;
    let (mut h, state) = api();
    accepted(&mut h, "PUT", "/boot-source", &boot);
    accepted(&mut h, "PUT", "/balloon", hinted);
    accepted(
        &mut h,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert!(
        state
            .lock()
            .unwrap()
            .start
            .clone()
            .unwrap()
            .balloon
            .unwrap()
            .hinting
    );
    // ebb started with --queue-notify event-loop: a hinted block could be reused before the
    // event loop releases it, so the start is refused.
    let base = ConfigFile {
        machine: MachineFile {
            queue_notify: Some(crate::config::QueueNotify::EventLoop),
            ..Default::default()
        },
        ..ConfigFile::default()
    };
    let state = Arc::new(Mutex::new(PreBoot::new(base)));
    let mut h = PreBootApi(state.clone());
    accepted(&mut h, "PUT", "/boot-source", &boot);
    accepted(&mut h, "PUT", "/balloon", hinted);
    assert!(
        fault(
            &mut h,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#
        )
        .contains("needs --queue-notify vcpu")
    );
    assert!(state.lock().unwrap().start.is_none());
}
