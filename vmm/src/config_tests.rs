use super::*;

fn existing_file() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn base() -> ConfigFile {
    let mut f = ConfigFile::default();
    f.boot.kernel = Some(existing_file());
    f
}

#[test]
fn fault_around_defaults_follow_the_page_size() {
    let file = |thp| {
        let mut f = base();
        f.memory.thp = thp;
        f
    };
    let c = VmConfig::validate(file(None)).unwrap();
    assert_eq!(c.memory.fault_around, DEFAULT_HUGE_FAULT_AROUND);
    let c = VmConfig::validate(file(Some(false))).unwrap();
    assert_eq!(
        c.memory.fault_around, 1,
        "4 KiB tracking stays exact by default"
    );
    let mut f = file(None);
    f.memory.fault_around = Some(8192);
    assert!(matches!(
        VmConfig::validate(f),
        Err(ConfigError::BadFaultAround(8192))
    ));
}

#[test]
fn defaults_fill_in() {
    let c = VmConfig::validate(base()).unwrap();
    assert_eq!(c.machine.vcpus, 1);
    assert_eq!(c.machine.memory_mib, 256);
    assert!(c.memory.track);
    assert_eq!(c.boot.cmdline, DEFAULT_CMDLINE);
}

#[test]
fn bad_values_are_refused() {
    assert!(matches!(
        VmConfig::validate(ConfigFile::default()),
        Err(ConfigError::MissingKernel)
    ));
    let mut nofile = ConfigFile::default();
    nofile.boot.kernel = Some("/nonexistent/kernel".into());
    assert!(matches!(
        VmConfig::validate(nofile),
        Err(ConfigError::KernelUnreadable { .. })
    ));
    for vcpus in [0, 33, u64::MAX] {
        let mut f = base();
        f.machine.vcpus = Some(vcpus);
        assert!(matches!(VmConfig::validate(f), Err(ConfigError::BadVcpus(v)) if v == vcpus));
    }
    for mib in [0, 63, 3073, u64::MAX] {
        let mut f = base();
        f.machine.memory_mib = Some(mib);
        assert!(matches!(VmConfig::validate(f), Err(ConfigError::BadMemory(m)) if m == mib));
    }
    let mut nul = base();
    nul.boot.cmdline = Some("a\0b".into());
    assert!(matches!(
        VmConfig::validate(nul),
        Err(ConfigError::BadCmdline(_))
    ));
}

#[test]
fn file_parses_and_overlays() {
    let text = r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 2, "memory_mib": 512,
        "hlt_in_guest": true}, "memory": {"track": false}}"#;
    let f = ConfigFile::parse(Path::new("x.json"), text).unwrap();
    assert_eq!(f.machine.vcpus, Some(2));
    let mut cli = ConfigFile::default();
    cli.machine.vcpus = Some(4);
    let merged = f.overlay(cli);
    assert_eq!(merged.machine.vcpus, Some(4));
    assert_eq!(merged.machine.memory_mib, Some(512));
    assert_eq!(merged.memory.track, Some(false));
    assert_eq!(merged.machine.hlt_in_guest, Some(true));
    assert_eq!(merged.boot.kernel.as_deref(), Some(Path::new("/k")));
}

#[test]
fn balloon_options() {
    assert_eq!(VmConfig::validate(base()).unwrap().balloon, None);
    let text = r#"{"balloon": {"stats_polling_interval_s": 5, "reporting": true}}"#;
    let f = ConfigFile::parse(Path::new("x.json"), text).unwrap();
    let b = VmConfig::validate(base().overlay(f))
        .unwrap()
        .balloon
        .unwrap();
    assert_eq!(
        b,
        BalloonSettings {
            deflate_on_oom: false,
            stats: true,
            stats_polling_interval_s: 5,
            reporting: true,
            hinting: false,
            target_mib: 0,
            partial_release_ms: DEFAULT_BALLOON_PARTIAL_RELEASE_MS,
        }
    );
    // An empty section adds the balloon with its defaults; a later layer's fields win.
    let on = ConfigFile::parse(Path::new("x.json"), r#"{"balloon": {}}"#).unwrap();
    let later =
        ConfigFile::parse(Path::new("y.json"), r#"{"balloon": {"reporting": false}}"#).unwrap();
    let b = VmConfig::validate(base().overlay(on).overlay(later))
        .unwrap()
        .balloon
        .unwrap();
    assert!(!b.reporting && b.stats);
    for (stats, s) in [(true, MAX_BALLOON_STATS_S + 1), (false, 1)] {
        let mut f = base();
        f.balloon = Some(BalloonFile {
            stats: Some(stats),
            stats_polling_interval_s: Some(s),
            ..BalloonFile::default()
        });
        assert!(matches!(
            VmConfig::validate(f),
            Err(ConfigError::BadBalloonStatsInterval(_))
        ));
    }
    let mut f = base();
    f.balloon = Some(BalloonFile {
        target_mib: Some(257),
        ..BalloonFile::default()
    });
    assert!(matches!(
        VmConfig::validate(f),
        Err(ConfigError::BadBalloonTarget(257, 256))
    ));
}

#[test]
fn a_checked_configuration_reads_back_as_the_same_vm() {
    let mut f = base();
    f.machine.vcpus = Some(3);
    f.memory.fault_around = Some(512);
    f.api_sock = Some("/run/ebb.sock".into());
    f.balloon = Some(BalloonFile {
        reporting: Some(true),
        target_mib: Some(64),
        ..BalloonFile::default()
    });
    let c = VmConfig::validate(f).unwrap();
    let text = serde_json::to_string(&c).unwrap();
    let again =
        VmConfig::validate(ConfigFile::parse(Path::new("vm.json"), &text).unwrap()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn malformed_file_is_refused() {
    for text in [
        "{",
        r#"{"machine": {"vcpus": "two"}}"#,
        r#"{"unknown": 1}"#,
        r#"{"machine": {"kernel": "/k"}}"#,
        r#"{"vcpus": 2}"#,
        "[]",
    ] {
        assert!(
            matches!(
                ConfigFile::parse(Path::new("x.json"), text),
                Err(ConfigError::FileMalformed { .. })
            ),
            "{text}"
        );
    }
}

#[test]
fn release_modes_must_free_the_ram_they_get() {
    // (track, thp, mode, accepted)
    for (track, thp, mode, ok) in [
        (true, true, ReleaseChoice::PunchHole, true),
        (true, true, ReleaseChoice::Remove, true),
        (true, true, ReleaseChoice::Dontneed, false),
        (true, true, ReleaseChoice::Free, false),
        (true, false, ReleaseChoice::Dontneed, true),
        (true, false, ReleaseChoice::Free, true),
        (true, false, ReleaseChoice::PunchHole, false),
        (false, true, ReleaseChoice::Free, true),
        (false, true, ReleaseChoice::Remove, false),
    ] {
        let mut f = base();
        f.memory.track = Some(track);
        f.memory.thp = Some(thp);
        f.memory.release = Some(mode);
        let r = VmConfig::validate(f);
        assert_eq!(r.is_ok(), ok, "{track} {thp} {mode:?}: {r:?}");
        if let Err(e) = r {
            assert!(e.to_string().starts_with("release mode "), "{e}");
        }
    }
    // Defaults follow the RAM; the strategy defaults to count.
    let c = VmConfig::validate(base()).unwrap();
    assert_eq!(
        (c.memory.release, c.memory.strategy),
        (ReleaseChoice::PunchHole, ReclaimStrategy::Count)
    );
    let mut f = base();
    f.memory.thp = Some(false);
    f.memory.strategy = Some(ReclaimStrategy::Scan);
    let c = VmConfig::validate(f).unwrap();
    assert_eq!(
        (c.memory.release, c.memory.strategy),
        (ReleaseChoice::Dontneed, ReclaimStrategy::Scan)
    );
    let f = ConfigFile::parse(
        Path::new("x.json"),
        r#"{"memory": {"strategy": "off", "release": "punch-hole"}}"#,
    )
    .unwrap();
    assert_eq!(f.memory.strategy, Some(ReclaimStrategy::Off));
}
