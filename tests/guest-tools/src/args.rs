//! A small `--key value` / `--flag` parser: the guest tools depend on nothing but libc.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// What was wrong with the command line.
#[derive(Debug, PartialEq, Eq)]
pub enum ArgError {
    /// An argument that is not `--name`.
    Positional(String),
    /// An option this command does not know.
    Unknown(String),
    /// An option that takes a value had none.
    MissingValue(String),
    /// A value that does not parse.
    BadValue { name: String, value: String },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Positional(a) => write!(f, "unexpected argument '{a}'"),
            ArgError::Unknown(a) => write!(f, "unknown option '--{a}'"),
            ArgError::MissingValue(a) => write!(f, "option '--{a}' needs a value"),
            ArgError::BadValue { name, value } => write!(f, "bad value '{value}' for '--{name}'"),
        }
    }
}

impl std::error::Error for ArgError {}

/// Parsed options of one subcommand.
#[derive(Debug, Default)]
pub struct Args {
    values: BTreeMap<String, String>,
    flags: Vec<String>,
    /// Arguments after a bare `--`.
    pub rest: Vec<String>,
}

impl Args {
    /// Parses `argv`: `valued` lists options that take a value, `flags` those that do not.
    pub fn parse(argv: &[String], valued: &[&str], flags: &[&str]) -> Result<Self, ArgError> {
        let mut out = Args::default();
        let mut it = argv.iter();
        while let Some(a) = it.next() {
            if a == "--" {
                out.rest = it.cloned().collect();
                break;
            }
            let Some(name) = a.strip_prefix("--") else {
                return Err(ArgError::Positional(a.clone()));
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            if valued.contains(&name) {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| ArgError::MissingValue(name.into()))?,
                };
                out.values.insert(name.to_string(), v);
            } else if flags.contains(&name) && inline.is_none() {
                out.flags.push(name.to_string());
            } else {
                return Err(ArgError::Unknown(name.to_string()));
            }
        }
        Ok(out)
    }

    /// The value of `--name`, parsed, or `default`.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T, ArgError> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| ArgError::BadValue {
                name: name.into(),
                value: v.clone(),
            }),
        }
    }

    /// The raw string value of `--name`.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Whether `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_values_flags_and_rest() {
        let a = Args::parse(
            &v(&["--mib", "64", "--thp", "--secs=2", "--", "x"]),
            &["mib", "secs"],
            &["thp"],
        )
        .unwrap();
        assert_eq!(a.get("mib", 0u64).unwrap(), 64);
        assert_eq!(a.get("secs", 0u64).unwrap(), 2);
        assert_eq!(a.get("other", 7u64).unwrap(), 7);
        assert!(a.flag("thp"));
        assert_eq!(a.rest, v(&["x"]));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            Args::parse(&v(&["--nope"]), &[], &[]).unwrap_err(),
            ArgError::Unknown("nope".into())
        );
        assert_eq!(
            Args::parse(&v(&["--mib"]), &["mib"], &[]).unwrap_err(),
            ArgError::MissingValue("mib".into())
        );
        assert!(matches!(
            Args::parse(&v(&["pos"]), &[], &[]),
            Err(ArgError::Positional(_))
        ));
        let a = Args::parse(&v(&["--mib", "x"]), &["mib"], &[]).unwrap();
        assert!(matches!(a.get("mib", 0u64), Err(ArgError::BadValue { .. })));
    }
}
