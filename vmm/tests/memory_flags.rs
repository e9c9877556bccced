//! The guest-memory flags through the `ebb` binary: every combination of `--release-mode` with
//! guest RAM it cannot free is refused before anything starts, with one line on stderr that says
//! what the mode needs and what the flags gave, and exit status 1; whatever the reclaim strategy.
//! The combinations it accepts run in the rig (tests/harness/tests/ebb_combinations.rs).

use std::process::Command;

/// Runs `ebb` with `args` after a kernel that exists (the flags are checked before it is read);
/// returns (exit code, stdout, stderr).
fn ebb(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["--kernel", env!("CARGO_BIN_EXE_ebb")])
        .args(args)
        .output()
        .expect("run ebb");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Guest RAM as the flags make it: (flags, the kind of RAM, the release modes it refuses).
const RAM: [(&[&str], &str, [&str; 2]); 4] = [
    (&[], "memfd", ["dontneed", "free"]),
    (&["--no-thp"], "anonymous", ["punch-hole", "remove"]),
    (&["--no-track"], "anonymous", ["punch-hole", "remove"]),
    (
        &["--no-track", "--no-thp"],
        "anonymous",
        ["punch-hole", "remove"],
    ),
];

#[test]
fn every_impossible_release_mode_is_refused_with_one_line() {
    let mut refused = 0;
    for (ram, kind, modes) in RAM {
        for mode in modes {
            let needs = if kind == "memfd" {
                "anonymous"
            } else {
                "memfd"
            };
            for strategy in [None, Some("off"), Some("scan"), Some("count")] {
                let mut args = ram.to_vec();
                args.extend(["--release-mode", mode]);
                if let Some(s) = strategy {
                    args.extend(["--reclaim-strategy", s]);
                }
                let (code, stdout, stderr) = ebb(&args);
                let what = format!("ebb {}", args.join(" "));
                assert_eq!(code, Some(1), "{what}: exit status; stderr: {stderr}");
                assert_eq!(stdout, "", "{what}: nothing on stdout");
                assert_eq!(stderr.lines().count(), 1, "{what}: one line:\n{stderr}");
                let want = format!(
                    "ebb: release mode {mode} needs {needs} guest RAM, but this configuration \
                     has {kind} RAM"
                );
                assert!(
                    stderr.starts_with(&want),
                    "{what}:\n{stderr}\nwanted {want}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 8 * 4, "every impossible pair, with every strategy");
}

#[test]
fn unknown_modes_and_strategies_are_refused_with_one_line() {
    for args in [
        ["--release-mode", "madv-free"],
        ["--reclaim-strategy", "lazy"],
    ] {
        let (code, stdout, stderr) = ebb(&args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line:\n{stderr}");
        assert!(
            stderr.starts_with("ebb: invalid value") && stderr.contains(args[1]),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn an_impossible_mode_in_a_config_file_is_refused_the_same_way() {
    let path = std::env::temp_dir().join(format!("ebb-memory-flags-{}.json", std::process::id()));
    let kernel = env!("CARGO_BIN_EXE_ebb");
    std::fs::write(
        &path,
        format!(
            r#"{{"boot": {{"kernel": "{kernel}"}}, "memory": {{"thp": false, "release": "remove"}}}}"#
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["--config", path.to_str().unwrap()])
        .output()
        .expect("run ebb");
    std::fs::remove_file(&path).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
    assert!(
        stderr.starts_with(
            "ebb: release mode remove needs memfd guest RAM, but this configuration has anonymous RAM"
        ),
        "{stderr}"
    );
}
