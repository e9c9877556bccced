//! Where the rig's images are: `$EBB_CACHE/images`, else `target/ebb-cache/images` in the
//! workspace (what `resources/setup.sh` writes), described by its `rig.env`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::RigError;

/// Paths of everything a rig run needs on the host.
#[derive(Clone, Debug)]
pub struct RigImages {
    /// Kernel booted as L1 (the same Debian cloud kernel as L2).
    pub l1_kernel: PathBuf,
    /// L1 initramfs (the per-run archive is appended to a copy of it).
    pub l1_initramfs: PathBuf,
    /// L2 guest kernel, bzImage.
    pub l2_kernel: PathBuf,
    /// L2 guest kernel, uncompressed ELF (PVH entry).
    pub l2_vmlinux: PathBuf,
    /// L2 guest initramfs.
    pub l2_initramfs: PathBuf,
    /// The static guest tools binary.
    pub guest_tools: PathBuf,
    /// `resources/rig-bin` (the rig's shell helpers, used directly in host mode).
    pub rig_bin: PathBuf,
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().nth(2).unwrap_or(here).to_path_buf()
}

/// `scripts/ebb-l1-lib.sh`: the shell helpers a job's script sources (as
/// `$EBB_RIG_INPUTS/ebb-l1-lib.sh`) to drive ebb, or to wait on a guest, in L1.
pub fn l1_shell_lib() -> PathBuf {
    workspace_root().join("scripts/ebb-l1-lib.sh")
}

/// The static `ebb` binary that jobs copy into L1: `$EBB_BIN` when set, otherwise built here from
/// the workspace (release, glibc linked statically, in the separate `--target` directory so the
/// default build's caches stay valid).
pub fn static_ebb() -> Result<PathBuf, RigError> {
    if let Some(p) = std::env::var_os("EBB_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    static_build(&["-p", "vmm"], "vmm", "ebb")
}

/// The static `ebb-memscan` (tests/harness/src/bin/ebb-memscan.rs) that the side-by-side
/// benchmark copies into L1, built like [`static_ebb`].
pub fn static_memscan() -> Result<PathBuf, RigError> {
    static_harness_bin("ebb-memscan")
}

/// A binary of this crate (`tests/harness/src/bin/NAME.rs`) built static for L1, like
/// [`static_ebb`].
pub fn static_harness_bin(name: &str) -> Result<PathBuf, RigError> {
    static_build(&["-p", "ebb-harness", "--bin", name], "ebb-harness", name)
}

/// Builds `what` (cargo package arguments) for the static target and returns the path of `bin`.
fn static_build(what: &[&str], package: &str, bin: &str) -> Result<PathBuf, RigError> {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(&root)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .args(["build", "--release", "-q"])
        .args(what)
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .status()
        .map_err(|source| RigError::Spawn {
            program: "cargo".into(),
            source,
        })?;
    if !status.success() {
        return Err(RigError::StaticBuild {
            package: package.into(),
            status: status.to_string(),
        });
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target_dir
        .join("x86_64-unknown-linux-gnu/release")
        .join(bin))
}

/// The images directory, chosen as `resources/lib.sh` chooses the cache: `$EBB_CACHE/images`,
/// else `$XDG_CACHE_HOME/ebb/images` when `EBB_USE_XDG_CACHE=1`, else
/// `<workspace>/target/ebb-cache/images`.
pub fn images_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("EBB_CACHE").filter(|c| !c.is_empty()) {
        return PathBuf::from(c).join("images");
    }
    if std::env::var("EBB_USE_XDG_CACHE").is_ok_and(|v| v == "1") {
        let xdg = std::env::var_os("XDG_CACHE_HOME")
            .filter(|c| !c.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
        if let Some(x) = xdg {
            return x.join("ebb/images");
        }
    }
    workspace_root().join("target/ebb-cache/images")
}

fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

impl RigImages {
    /// Reads `rig.env` from [`images_dir`] and checks that every file exists.
    pub fn locate() -> Result<Self, RigError> {
        Self::from_dir(&images_dir())
    }

    /// Reads `rig.env` in `dir` and checks that every file exists.
    pub fn from_dir(dir: &Path) -> Result<Self, RigError> {
        let env_path = dir.join("rig.env");
        let text = std::fs::read_to_string(&env_path).map_err(|_| RigError::ImageMissing {
            path: env_path.clone(),
        })?;
        let env = parse_env(&text);
        let get = |k: &str| -> Result<PathBuf, RigError> {
            let p = env
                .get(k)
                .map(PathBuf::from)
                .ok_or_else(|| RigError::ImageMissing {
                    path: env_path.join(k),
                })?;
            if p.exists() {
                Ok(p)
            } else {
                Err(RigError::ImageMissing { path: p })
            }
        };
        let rig_bin = workspace_root().join("resources/rig-bin");
        if !rig_bin.join("rig-job").exists() {
            return Err(RigError::ImageMissing {
                path: rig_bin.join("rig-job"),
            });
        }
        Ok(RigImages {
            l1_kernel: get("EBB_RIG_L1_KERNEL")?,
            l1_initramfs: get("EBB_RIG_L1_INITRAMFS")?,
            l2_kernel: get("EBB_L2_KERNEL")?,
            l2_vmlinux: get("EBB_L2_VMLINUX")?,
            l2_initramfs: get("EBB_L2_INITRAMFS")?,
            guest_tools: get("EBB_GUEST_TOOLS")?,
            rig_bin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_parsing() {
        let m = parse_env("# c\nA=/x\n B = /y \nnot a pair\n");
        assert_eq!(m.get("A").map(String::as_str), Some("/x"));
        assert_eq!(m.get("B").map(String::as_str), Some("/y"));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn missing_dir_is_a_clear_error() {
        let e = RigImages::from_dir(Path::new("/nonexistent/ebb")).unwrap_err();
        assert!(matches!(e, RigError::ImageMissing { .. }));
        assert!(e.to_string().contains("resources/setup.sh"));
    }
}
