//! What can go wrong in the registry, as one enum that transports map (gRPC codes today; HTTP
//! statuses for the REST and web APIs next) through [`RegistryError::kind`].

use rig_proxy::policy::{PolicyError, Protocol};

use super::wiring::WiringError;
use crate::spec::SpecError;

/// The class of a [`RegistryError`], for a transport to map to its own codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong (spec, selector, policy).
    Invalid,
    /// What the caller names does not exist.
    NotFound,
    /// What the caller would create exists already.
    AlreadyExists,
    /// The state of things does not allow it (still starting, a service failed, not observed).
    FailedPrecondition,
    /// rig's own failure (no port, a task died).
    Internal,
}

/// An error of the environment registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown spec format {0:?}: expected toml or json")]
    UnknownFormat(String),
    #[error(transparent)]
    Spec(#[from] Box<SpecError>),
    #[error("environment {0:?} is already running (rigctl down {0} first)")]
    AlreadyRunning(String),
    #[error("no environment named {name:?} (running: {})", list_or_none(running))]
    NoSuchEnvironment { name: String, running: Vec<String> },
    #[error("no environment is running (start one with `rigctl up FILE`)")]
    NoEnvironment,
    #[error("several environments are running ({}): name one with --env", .0.join(", "))]
    Ambiguous(Vec<String>),
    #[error("environment {0:?} is still starting")]
    StillStarting(String),
    /// A service did not start or did not become ready; `message` says which and why.
    #[error("{message}{}", last_lines(last_logs))]
    ServiceFailed {
        message: String,
        last_logs: Vec<String>,
    },
    #[error(transparent)]
    Wiring(#[from] WiringError),
    #[error(
        "no edge matches {pattern:?}{} in environment {env:?} (edges: {})",
        to.as_ref().map(|t| format!(" --to {t}")).unwrap_or_default(),
        list_or_none(known)
    )]
    NoSuchEdge {
        pattern: String,
        to: Option<String>,
        env: String,
        known: Vec<String>,
    },
    #[error("edge {0} is not observed (observe = false): there is no proxy to inject chaos into")]
    NotObserved(String),
    #[error("edge {edge} ({protocol}): {source}")]
    Policy {
        edge: String,
        protocol: Protocol,
        #[source]
        source: PolicyError,
    },
    #[error("edge {edge}: {message}")]
    Edge { edge: String, message: String },
    #[error("cannot allocate a {what}: {source}")]
    Port {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("start task failed: {0}")]
    Task(String),
}

impl RegistryError {
    pub fn kind(&self) -> ErrorKind {
        use RegistryError::*;
        match self {
            UnknownFormat(_) | Spec(_) | Ambiguous(_) | Policy { .. } | Edge { .. } => {
                ErrorKind::Invalid
            }
            Wiring(WiringError::Expand { .. }) => ErrorKind::Invalid,
            Wiring(WiringError::MissingAddress { .. }) | Port { .. } | Task(_) => {
                ErrorKind::Internal
            }
            NoSuchEnvironment { .. } | NoEnvironment | NoSuchEdge { .. } => ErrorKind::NotFound,
            AlreadyRunning(_) => ErrorKind::AlreadyExists,
            StillStarting(_) | ServiceFailed { .. } | NotObserved(_) => {
                ErrorKind::FailedPrecondition
            }
        }
    }
}

impl From<SpecError> for RegistryError {
    fn from(e: SpecError) -> Self {
        RegistryError::Spec(Box::new(e))
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

fn last_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from("\nlast log lines:\n");
    for l in lines {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_is_wrong_and_kinds_classify_them() {
        let e = RegistryError::NoSuchEnvironment {
            name: "shop".into(),
            running: vec![],
        };
        assert_eq!(
            e.to_string(),
            "no environment named \"shop\" (running: none)"
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = RegistryError::ServiceFailed {
            message: "service web exited with code 1 before it was ready".into(),
            last_logs: vec!["boom".into()],
        };
        assert_eq!(
            e.to_string(),
            "service web exited with code 1 before it was ready\nlast log lines:\n  boom\n"
        );
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let e = RegistryError::NoSuchEdge {
            pattern: "web/x".into(),
            to: Some("store".into()),
            env: "shop".into(),
            known: vec!["web/store".into()],
        };
        assert_eq!(
            e.to_string(),
            "no edge matches \"web/x\" --to store in environment \"shop\" (edges: web/store)"
        );
        assert_eq!(
            RegistryError::AlreadyRunning("shop".into()).kind(),
            ErrorKind::AlreadyExists
        );
    }
}
