//! The set-up's decision when the Debian archive has moved on, without network: `resources/fetch.sh`
//! runs for real (private apt lists, `apt-get download`, sha256 checks) against a local archive
//! of small packages this test builds. A pin that is gone resolves to the offered version, loudly;
//! a gone kernel pin resolves to the newest cloud kernel of the same or a later series; a kernel
//! lacking a needed option is refused with one line; a second checkout reuses the downloads.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ebb_harness::workspace_root;

/// A kernel config with every option ebb and the rig need.
const GOOD_CONFIG: &str = "CONFIG_PT_RECLAIM=y\nCONFIG_USERFAULTFD=y\nCONFIG_PAGE_REPORTING=y\n\
CONFIG_PVH=y\nCONFIG_KVM=m\nCONFIG_KVM_AMD=m\nCONFIG_VIRTIO_MMIO=m\nCONFIG_VIRTIO_BALLOON=m\n";

struct Archive {
    dir: PathBuf,
    packages: String,
}

impl Archive {
    fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("repo")).unwrap();
        Archive {
            dir: dir.to_path_buf(),
            packages: String::new(),
        }
    }

    /// Builds a package (with the given files) into the archive; returns its sha256.
    fn add(&mut self, name: &str, version: &str, files: &[(&str, &str)]) -> String {
        self.add_with_depends(name, version, "", files)
    }

    fn add_with_depends(
        &mut self,
        name: &str,
        version: &str,
        depends: &str,
        files: &[(&str, &str)],
    ) -> String {
        let depends = if depends.is_empty() {
            String::new()
        } else {
            format!("Depends: {depends}\n")
        };
        let stage = self.dir.join(format!("stage-{name}-{version}"));
        fs::create_dir_all(stage.join("DEBIAN")).unwrap();
        fs::write(
            stage.join("DEBIAN/control"),
            format!(
                "Package: {name}\nVersion: {version}\nArchitecture: amd64\n{depends}\
                 Maintainer: ebb <ebb@localhost>\nDescription: test package\n"
            ),
        )
        .unwrap();
        for (path, text) in files {
            let p = stage.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        let file = format!("{name}_{}_amd64.deb", version.replace(':', "%3a"));
        let deb = self.dir.join("repo").join(&file);
        run_ok(
            Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Zgzip", "--build"])
                .arg(&stage)
                .arg(&deb),
        );
        let sha = sha256(&deb);
        let size = fs::metadata(&deb).unwrap().len();
        write!(
            self.packages,
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\n{depends}\
             Filename: ./{file}\nSize: {size}\nSHA256: {sha}\nDescription: test package\n\n"
        )
        .unwrap();
        sha
    }

    /// A kernel in parts, as Debian's 7.x kernels come: an image package that depends, at its
    /// exact version, on a package holding the files under /usr/lib/modules/RELEASE.
    fn kernel_in_parts(&mut self, release: &str, version: &str, config: &str) {
        let part = format!("linux-modules-{release}");
        let config_path = format!("usr/lib/modules/{release}/config");
        self.add(&part, version, &[(config_path.as_str(), config)]);
        self.add_with_depends(
            &format!("linux-image-{release}"),
            version,
            &format!("kmod, {part} (= {version})"),
            &[],
        );
    }

    fn kernel(&mut self, release: &str, version: &str, config: &str) -> String {
        let config_path = format!("boot/config-{release}");
        self.add(
            &format!("linux-image-{release}"),
            version,
            &[(config_path.as_str(), config)],
        )
    }

    /// Writes the index and a lock file naming this archive as its only source.
    fn lock(&self, entries: &[String]) -> PathBuf {
        fs::write(self.dir.join("repo/Packages"), &self.packages).unwrap();
        let lock = self.dir.join("packages.lock");
        let mut text = format!(
            "# test lock\n# source: deb [trusted=yes] file:{} ./\n",
            self.dir.join("repo").display()
        );
        for e in entries {
            text.push_str(e);
            text.push('\n');
        }
        fs::write(&lock, text).unwrap();
        lock
    }
}

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

fn pin(name: &str, version: &str, sha: &str) -> String {
    format!("{name} {version} {sha} pool/main/x/{name}/{name}_{version}_amd64.deb")
}

const NO_SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

struct Fetch {
    ok: bool,
    stderr: String,
    resolved: String,
}

/// Runs resources/fetch.sh on `lock` with its own image cache and the download cache `dl`.
fn fetch(lock: &Path, dl: &Path, cache: &Path) -> Fetch {
    let out = Command::new("bash")
        .arg(workspace_root().join("resources/fetch.sh"))
        .env("EBB_LOCK_FILE", lock)
        .env("EBB_DOWNLOADS", dl)
        .env("EBB_CACHE", cache)
        .output()
        .unwrap();
    Fetch {
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        resolved: fs::read_to_string(cache.join("packages.resolved")).unwrap_or_default(),
    }
}

fn resolved_version(resolved: &str, name: &str) -> Option<String> {
    resolved
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[0] == name)
        .map(|f| f[1].to_string())
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ebb-pins-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn gone_pins_resolve_to_what_the_suites_offer_loudly() {
    let dir = tempdir("drift");
    let mut a = Archive::new(&dir);
    let kept_sha = a.add("libkept1", "2.0-1", &[]);
    a.add("libgone1", "1.1-1", &[]);
    // Same series and a later one; an older series must never be chosen, nor a non-cloud flavour.
    a.kernel("6.17.9+deb13-cloud-amd64", "6.17.9-1", GOOD_CONFIG);
    a.kernel(
        "6.18.20+deb13-cloud-amd64",
        "6.18.20-1~bpo13+1",
        GOOD_CONFIG,
    );
    a.kernel_in_parts("7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1", GOOD_CONFIG);
    a.kernel("7.4.1+deb13-amd64", "7.4.1-1~bpo13+1", GOOD_CONFIG);
    let lock = a.lock(&[
        pin(
            "linux-image-6.18.15+deb13-cloud-amd64",
            "6.18.15-1~bpo13+1",
            NO_SHA,
        ),
        pin("libkept1", "2.0-1", &kept_sha),
        pin("libgone1", "1.0-1", NO_SHA),
    ]);
    let dl = dir.join("dl");
    let first = fetch(&lock, &dl, &dir.join("clone1"));
    assert!(first.ok, "fetch failed:\n{}", first.stderr);
    let drift: Vec<&str> = first
        .stderr
        .lines()
        .filter(|l| l.starts_with("pin drifted: "))
        .collect();
    assert_eq!(
        drift,
        [
            "pin drifted: linux-image-6.18.15+deb13-cloud-amd64 6.18.15-1~bpo13+1 -> \
             linux-image-7.3.4+deb13-cloud-amd64 7.3.4-1~bpo13+1",
            "pin drifted: libgone1 1.0-1 -> 1.1-1",
        ],
        "{}",
        first.stderr
    );
    assert_eq!(
        resolved_version(&first.resolved, "libkept1").as_deref(),
        Some("2.0-1")
    );
    assert_eq!(
        resolved_version(&first.resolved, "libgone1").as_deref(),
        Some("1.1-1")
    );
    // The newest cloud kernel of the same or a later series, with its part.
    for name in [
        "linux-image-7.3.4+deb13-cloud-amd64",
        "linux-modules-7.3.4+deb13-cloud-amd64",
    ] {
        assert_eq!(
            resolved_version(&first.resolved, name).as_deref(),
            Some("7.3.4-1~bpo13+1"),
            "{}",
            first.resolved
        );
    }
    // Every resolved file is in the download cache with its sha256.
    for l in first.resolved.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let file = dl.join("debs").join(Path::new(f[3]).file_name().unwrap());
        assert_eq!(sha256(&file), f[2], "{l}");
    }

    // A second checkout on the same machine downloads nothing and still says what drifted.
    let second = fetch(&lock, &dl, &dir.join("clone2"));
    assert!(second.ok, "{}", second.stderr);
    assert!(!second.stderr.contains("downloading"), "{}", second.stderr);
    assert_eq!(
        second
            .stderr
            .lines()
            .filter(|l| l.starts_with("pin drifted: "))
            .count(),
        2,
        "{}",
        second.stderr
    );
    assert_eq!(second.resolved, first.resolved);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_replacement_kernel_lacking_an_option_is_refused_with_one_line() {
    let dir = tempdir("refuse");
    let mut a = Archive::new(&dir);
    let lacking = GOOD_CONFIG.replace("CONFIG_PT_RECLAIM=y\n", "# CONFIG_PT_RECLAIM is not set\n");
    a.kernel_in_parts("7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1", &lacking);
    let lock = a.lock(&[pin(
        "linux-image-6.18.15+deb13-cloud-amd64",
        "6.18.15-1~bpo13+1",
        NO_SHA,
    )]);
    let out = fetch(&lock, &dir.join("dl"), &dir.join("clone"));
    assert!(
        !out.ok,
        "a kernel without PT_RECLAIM was accepted:\n{}",
        out.stderr
    );
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    assert!(
        errors[0].contains("linux-image-7.3.4+deb13-cloud-amd64")
            && errors[0].contains("CONFIG_PT_RECLAIM=y")
            && !errors[0].contains("CONFIG_USERFAULTFD"),
        "{}",
        out.stderr
    );
    assert!(
        out.resolved.is_empty(),
        "nothing is resolved after a refusal"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_pin_edited_to_a_gone_version_drifts_even_when_its_hash_is_cached() {
    let dir = tempdir("edited");
    let mut a = Archive::new(&dir);
    let sha = a.add("libkept1", "2.0-1", &[]);
    let dl = dir.join("dl");
    let good = a.lock(&[pin("libkept1", "2.0-1", &sha)]);
    assert!(fetch(&good, &dl, &dir.join("clone1")).ok);
    // The version no longer exists; the hash and pool path still name the cached file.
    let edited = a.lock(&[pin("libkept1", "2.0-9", &sha)]);
    let out = fetch(&edited, &dl, &dir.join("clone2"));
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr.contains("pin drifted: libkept1 2.0-9 -> 2.0-1"),
        "{}",
        out.stderr
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_pin_offered_with_another_sha256_is_refused() {
    let dir = tempdir("sha");
    let mut a = Archive::new(&dir);
    a.add("libkept1", "2.0-1", &[]);
    let lock = a.lock(&[pin("libkept1", "2.0-1", NO_SHA)]);
    let out = fetch(&lock, &dir.join("dl"), &dir.join("clone"));
    assert!(!out.ok, "{}", out.stderr);
    assert!(
        out.stderr.contains("offered with another sha256"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("pin drifted"), "{}", out.stderr);
    let _ = fs::remove_dir_all(&dir);
}
