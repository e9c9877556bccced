//! Why a workload could not run.

use std::fmt;

use crate::args::ArgError;
use crate::mem::MemError;

/// What failed in a guest tool command.
#[derive(Debug)]
pub enum ToolError {
    /// Bad command line.
    Args(ArgError),
    /// Mapping or advising memory failed.
    Mem(MemError),
    /// A QMP exchange failed.
    Qmp {
        what: String,
        source: std::io::Error,
    },
    /// Reading or writing a stream or file failed.
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Unknown subcommand.
    UnknownCommand(String),
    /// An option value out of range.
    Invalid(String),
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolError::Args(_) => write!(f, "bad arguments"),
            ToolError::Mem(_) => write!(f, "memory operation failed"),
            ToolError::Qmp { what, .. } => write!(f, "QMP: {what}"),
            ToolError::Io { what, .. } => write!(f, "cannot {what}"),
            ToolError::UnknownCommand(c) => write!(f, "unknown command '{c}'"),
            ToolError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ToolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ToolError::Args(e) => Some(e),
            ToolError::Mem(e) => Some(e),
            ToolError::Qmp { source, .. } | ToolError::Io { source, .. } => Some(source),
            ToolError::UnknownCommand(_) | ToolError::Invalid(_) => None,
        }
    }
}

impl From<ArgError> for ToolError {
    fn from(e: ArgError) -> Self {
        ToolError::Args(e)
    }
}

impl From<MemError> for ToolError {
    fn from(e: MemError) -> Self {
        ToolError::Mem(e)
    }
}
