use std::fmt;

use thiserror::Error;

use crate::yaml::Pos;

/// One problem in one policy or endpoints file, printed as `FILE:LINE:COL: message`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every error found while loading; loading reports them all, not only the first.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct LoadErrors(pub Vec<PolicyError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors for one file while decoding continues past each one.
pub(crate) struct Diagnostics<'a> {
    pub file: &'a str,
    pub errors: Vec<PolicyError>,
}

impl<'a> Diagnostics<'a> {
    pub fn new(file: &'a str) -> Self {
        Diagnostics {
            file,
            errors: Vec::new(),
        }
    }

    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_string(),
            line: pos.line,
            col: pos.col,
            message: message.into(),
        });
    }
}
