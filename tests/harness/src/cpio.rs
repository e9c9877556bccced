//! A writer for the "newc" cpio format, used for the per-run archive appended to the L1
//! initramfs (Linux unpacks concatenated archives in order, later entries adding files).

use std::io::{self, Write};

/// Builds a newc archive in memory.
#[derive(Default)]
pub struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        CpioWriter {
            buf: Vec::new(),
            ino: 0x4000,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            namesize as u32,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Adds a directory (`name` without a leading slash).
    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, &[]);
    }

    /// Adds a regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | (perm & 0o7777), data);
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }

    /// Ends the archive and writes it to `w`.
    pub fn write_to(self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (name, mode, data) triples.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = b.len();
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let mut off = (110 + namesize).div_ceil(4) * 4;
            let data = b[off..off + size].to_vec();
            off = (off + size).div_ceil(4) * 4;
            assert_eq!((total - b.len() + off) % 4, 0);
            b = &b[off..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn round_trip() {
        let mut w = CpioWriter::new();
        w.dir("rig");
        w.file("rig/cmd", 0o644, b"echo hi\n");
        w.file("rig/a", 0o755, b"");
        w.file("rig/odd-name-len", 0o600, &[1, 2, 3, 4, 5]);
        let e = parse(&w.finish());
        assert_eq!(
            e,
            vec![
                ("rig".into(), 0o040755, vec![]),
                ("rig/cmd".into(), 0o100644, b"echo hi\n".to_vec()),
                ("rig/a".into(), 0o100755, vec![]),
                ("rig/odd-name-len".into(), 0o100600, vec![1, 2, 3, 4, 5]),
            ]
        );
    }
}
