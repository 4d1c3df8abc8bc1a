//! How every binary (`volmig`, `volmig-agent`, `volmig-operator`,
//! `kubectl-volmig`) reports the error it exits with: one line, `error: `
//! and the whole cause chain, whatever `RUST_BACKTRACE` says (a backtrace
//! is for bugs, and those panic).
//!
//! Many errors already say their cause in their own message (thiserror's
//! `"... : {source}"`, kube's nested errors), so joining every level of the
//! chain repeats it: a level whose message the line already holds adds
//! nothing and is left out. This only decides what to print; no decision
//! is ever taken on an error's text.

use std::error::Error;
use std::fmt::Write as _;

/// `err` and its causes on one line: each cause the messages before it did
/// not already say, after `": "`; line breaks inside a message become
/// spaces.
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut line = flat(&err.to_string());
    let mut cause = err.source();
    while let Some(c) = cause {
        let msg = flat(&c.to_string());
        if !msg.is_empty() && !line.contains(&msg) {
            let _ = write!(line, ": {msg}");
        }
        cause = c.source();
    }
    line
}

/// A message with its line breaks (and the indentation after them) as one
/// space each.
fn flat(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for (i, part) in msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(part);
    }
    out
}

/// The process's exit: nothing on success; on failure `error: ` and
/// [`one_line`] on stderr and exit code 1.
pub fn exit<E: AsRef<dyn Error + Send + Sync + 'static>>(
    r: Result<(), E>,
) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let e: &(dyn Error + 'static) = e.as_ref();
            eprintln!("error: {}", one_line(e));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        /// Says its cause, as thiserror's `{source}` does.
        #[error("state directory /x: {source}")]
        Says {
            #[source]
            source: std::io::Error,
        },
        /// Says nothing of it.
        #[error("serving volume v")]
        Silent(#[source] std::io::Error),
        #[error("invalid configuration: {0}")]
        Nested(#[from] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("invalid: {0}")]
    struct Inner(String);

    fn enoent() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let e = Outer::Says { source: enoent() };
        assert_eq!(one_line(&e), format!("state directory /x: {}", enoent()));
        let e = Outer::Nested(Inner("no volumes".into()));
        assert_eq!(
            one_line(&e),
            "invalid configuration: invalid: no volumes",
            "the inner message is said once"
        );
    }

    #[test]
    fn a_cause_not_said_is_appended() {
        let e = Outer::Silent(enoent());
        assert_eq!(one_line(&e), format!("serving volume v: {}", enoent()));
    }

    #[test]
    fn line_breaks_become_spaces() {
        let e = Inner("first\n  second\n".into());
        assert_eq!(one_line(&e), "invalid: first second");
    }
}
