//! `lines [--tee FILE]`: copies stdin to stdout one whole line per write(2), so output relayed
//! byte by byte (a guest's serial console) is not cut in the middle of a line by other writers
//! to the same terminal (the rig's sample lines). With `--tee`, also appends every line to FILE.

use std::io::{BufRead, Write};

use crate::args::Args;
use crate::error::ToolError;

/// Copies `input` to `out` (and `tee`), each line with a single `write_all` then a flush.
pub fn relay(
    input: impl BufRead,
    out: &mut impl Write,
    mut tee: Option<&mut dyn Write>,
) -> std::io::Result<u64> {
    let mut n = 0;
    for line in input.split(b'\n') {
        let mut line = line?;
        line.push(b'\n');
        out.write_all(&line)?;
        out.flush()?;
        if let Some(t) = tee.as_deref_mut() {
            t.write_all(&line)?;
            t.flush()?;
        }
        n += 1;
    }
    Ok(n)
}

/// The `lines` subcommand.
pub fn lines(argv: &[String]) -> Result<i32, ToolError> {
    let a = Args::parse(argv, &["tee"], &[])?;
    let io = |what: &str| {
        let what = what.to_string();
        move |source| ToolError::Io { what, source }
    };
    let mut file = match a.get_str("tee") {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io("open --tee file"))?,
        ),
        None => None,
    };
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    relay(
        stdin,
        &mut stdout,
        file.as_mut().map(|f| f as &mut dyn Write),
    )
    .map_err(io("relay lines"))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write call separately.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);

    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_write_per_line_and_tail_kept() {
        let mut out = Calls::default();
        let mut tee = Vec::new();
        let n = relay(&b"ab\r\ncd\nlast"[..], &mut out, Some(&mut tee)).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            out.0,
            vec![b"ab\r\n".to_vec(), b"cd\n".to_vec(), b"last\n".to_vec()]
        );
        assert_eq!(tee, b"ab\r\ncd\nlast\n");
    }
}
