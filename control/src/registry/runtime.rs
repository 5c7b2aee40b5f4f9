//! How a service runs, as a trait: the orchestration in [`super::environments`] starts, watches
//! and stops services through [`Runtime`] and [`ServiceRuntime`] only, so a second way to run
//! them (containers) is another implementation, not a change to the orchestration.
//!
//! [`LocalProcesses`] is the implementation for local child processes ([`crate::supervisor`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::supervisor::{Child, LogOutput, ProcessSpec};

/// What to run for one service: the result of wiring.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The service's name.
    pub service: String,
    pub command: Vec<String>,
    pub cwd: PathBuf,
    pub env: BTreeMap<String, String>,
    /// How long a stop waits after asking politely before it forces.
    pub stop_grace: Duration,
}

/// Starts services.
pub trait Runtime: fmt::Debug + Send + Sync {
    /// Starts `launch`, its output going to `logs`. The error says, for the user, why it could
    /// not start (without naming the service: the caller does).
    fn start(&self, launch: &Launch, logs: LogOutput) -> Result<Arc<dyn ServiceRuntime>, String>;
}

/// One running service.
pub trait ServiceRuntime: fmt::Debug + Send + Sync {
    /// The operating system's process id of its main process, when it has one.
    fn pid(&self) -> Option<u32>;
    /// Its last lines of output, oldest first.
    fn recent_logs(&self) -> Vec<String>;
    /// Resolves when it has ended, with how it ended ("exited with code 1").
    fn wait_exit(&self) -> BoxFuture<'_, String>;
    /// Stops it (politely, then by force after its grace period) and everything it started;
    /// resolves with how it ended.
    fn stop(&self) -> BoxFuture<'_, String>;
}

/// Services as local child processes of rigd.
#[derive(Debug, Clone)]
pub struct LocalProcesses {
    /// Where the supervisor keeps its records of children.
    pub children_dir: PathBuf,
}

impl Runtime for LocalProcesses {
    fn start(&self, launch: &Launch, logs: LogOutput) -> Result<Arc<dyn ServiceRuntime>, String> {
        let spec = ProcessSpec {
            name: launch.service.clone(),
            argv: launch.command.clone(),
            cwd: Some(launch.cwd.clone()),
            env: launch.env.clone(),
            stop_grace: launch.stop_grace,
        };
        let child = Child::spawn_recorded(spec, logs, Some(&self.children_dir)).map_err(|e| {
            let why = e.to_string();
            let prefix = format!("service {}: ", launch.service);
            why.strip_prefix(&prefix).map(str::to_string).unwrap_or(why)
        })?;
        Ok(Arc::new(child))
    }
}

impl ServiceRuntime for Child {
    fn pid(&self) -> Option<u32> {
        Some(Child::pid(self))
    }

    fn recent_logs(&self) -> Vec<String> {
        Child::recent_logs(self)
            .into_iter()
            .map(|l| l.line)
            .collect()
    }

    fn wait_exit(&self) -> BoxFuture<'_, String> {
        Box::pin(async move { Child::wait_exit(self).await.to_string() })
    }

    fn stop(&self) -> BoxFuture<'_, String> {
        Box::pin(async move { Child::stop(self).await.to_string() })
    }
}
