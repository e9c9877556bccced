//! The one machine-readable line each workload prints: `EBB-RESULT <name> key=value ...`.

use std::fmt::Write as _;

/// A result line under construction.
pub struct Report {
    line: String,
}

impl Report {
    /// Starts `EBB-RESULT <name>`.
    pub fn new(name: &str) -> Self {
        Report {
            line: format!("EBB-RESULT {name}"),
        }
    }

    /// Adds `key=value` (values must not contain spaces).
    pub fn kv(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        let _ = write!(self.line, " {key}={value}");
        self
    }

    /// Prints the line on stdout.
    pub fn print(self) {
        println!("{}", self.line);
    }

    /// The line as text.
    #[cfg(test)]
    pub fn as_str(&self) -> &str {
        &self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_line() {
        let r = Report::new("touch").kv("mib", 4).kv("ns_per_page", 1.5);
        assert_eq!(r.as_str(), "EBB-RESULT touch mib=4 ns_per_page=1.5");
    }
}
