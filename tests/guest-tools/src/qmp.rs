//! `qmp --socket PATH JSON...`: a minimal QMP client, so scripts in the rig can drive a QEMU peer
//! (e.g. its balloon) without other tools. Prints each reply line as `EBB-QMP <json>`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::args::Args;
use crate::error::ToolError;

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> ToolError + '_ {
    move |source| ToolError::Qmp {
        what: what.to_string(),
        source,
    }
}

/// Reads lines until a reply (`return` or `error`), skipping asynchronous events.
fn read_reply(r: &mut impl BufRead) -> Result<String, ToolError> {
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).map_err(io_err("read reply"))?;
        if n == 0 {
            return Err(ToolError::Qmp {
                what: "connection closed".into(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        if line.contains("\"return\"") || line.contains("\"error\"") || line.contains("\"QMP\"") {
            return Ok(line.trim_end().to_string());
        }
    }
}

/// Runs the commands given after the options; exit status 1 if any reply was an error.
pub fn qmp(argv: &[String]) -> Result<i32, ToolError> {
    let a = Args::parse(argv, &["socket", "timeout-secs"], &[])?;
    let path = a
        .get_str("socket")
        .ok_or_else(|| ToolError::Invalid("--socket is required".into()))?;
    let timeout: u64 = a.get("timeout-secs", 30)?;
    let s = UnixStream::connect(path).map_err(io_err("connect"))?;
    s.set_read_timeout(Some(Duration::from_secs(timeout)))
        .map_err(io_err("set timeout"))?;
    let mut w = s.try_clone().map_err(io_err("clone socket"))?;
    let mut r = BufReader::new(s);
    read_reply(&mut r)?;
    let mut failed = false;
    let cmds = std::iter::once(r#"{"execute":"qmp_capabilities"}"#.to_string())
        .chain(a.rest.iter().cloned());
    for (i, cmd) in cmds.enumerate() {
        writeln!(w, "{cmd}").map_err(io_err("send command"))?;
        let reply = read_reply(&mut r)?;
        failed |= reply.contains("\"error\"");
        if i > 0 {
            println!("EBB-QMP {reply}");
        }
    }
    Ok(i32::from(failed))
}
