//! Bounded capture of a console: a guest or L1 that prints without end must not exhaust the
//! host's memory. Lines are cut at [`MAX_LINE`] bytes; after [`MAX_LINES`] lines only a count and
//! the last lines are kept (markers are parsed as lines arrive, so none is lost).

use std::collections::VecDeque;
use std::io::{BufRead, ErrorKind};

use crate::protocol::Transcript;

/// Longest line kept, in bytes; longer lines are split.
pub const MAX_LINE: usize = 64 * 1024;
/// Lines kept from the start of the console.
pub const MAX_LINES: usize = 100_000;
/// Lines kept from its end once the limit is reached.
pub const KEEP_TAIL: usize = 200;

/// Reads `r` line by line (cut at `MAX_LINE` bytes), passing each to `sink` until it returns false.
pub fn read_lines(mut r: impl BufRead, mut sink: impl FnMut(String) -> bool) {
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok([]) => break,
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let room = MAX_LINE - line.len();
        let (take, complete) = match buf.iter().take(room).position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (
                buf.len().min(room),
                line.len() + buf.len().min(room) >= MAX_LINE,
            ),
        };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if complete {
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            line.clear();
            if !sink(text) {
                return;
            }
        }
    }
    if !line.is_empty() {
        sink(
            String::from_utf8_lossy(&line)
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        );
    }
}

/// The captured console and what was parsed from it.
#[derive(Default)]
pub struct Console {
    head: Vec<String>,
    tail: VecDeque<String>,
    dropped: u64,
    pub transcript: Transcript,
}

impl Console {
    /// Parses and stores one line.
    pub fn push(&mut self, line: String) {
        self.transcript.feed(&line);
        if crate::protocol::is_heartbeat(&line) {
            // L1's heartbeat: counted by the transcript, kept out of the console lines.
            return;
        }
        if self.head.len() < MAX_LINES {
            self.head.push(line);
            return;
        }
        self.dropped += 1;
        if self.tail.len() == KEEP_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The kept lines, with a note where lines were left out.
    pub fn into_lines(self) -> (Transcript, Vec<String>) {
        let mut v = self.head;
        if self.dropped > 0 {
            let left_out = self.dropped - self.tail.len() as u64;
            v.push(format!("[ebb-rig: {left_out} console lines left out]"));
            v.extend(self.tail);
        }
        (self.transcript, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_long_lines_and_keeps_the_last_partial_one() {
        let mut input = vec![b'a'; MAX_LINE + 10];
        input.extend_from_slice(b"\nshort\r\nend");
        let mut got = Vec::new();
        read_lines(&input[..], |l| {
            got.push(l);
            true
        });
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].len(), MAX_LINE);
        assert_eq!(got[1], "a".repeat(10));
        assert_eq!(got[2], "short");
        assert_eq!(got[3], "end");
    }

    #[test]
    fn caps_lines_but_parses_all_markers() {
        let mut c = Console::default();
        c.push("EBB-RIG-BEGIN".into());
        for i in 0..MAX_LINES + 500 {
            c.push(format!("line {i}"));
        }
        c.push("EBB-RIG-END status=4".into());
        let (t, lines) = c.into_lines();
        assert_eq!(t.status, Some(4));
        assert_eq!(lines.len(), MAX_LINES + 1 + KEEP_TAIL);
        assert!(lines[MAX_LINES].contains("console lines left out"));
        assert_eq!(
            lines.last().map(String::as_str),
            Some("EBB-RIG-END status=4")
        );
    }
}
