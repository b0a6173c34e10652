//! `kind = "exec"`: an engine gru does not ship, read and driven by running
//! commands (no shell). Each command is killed when it outlives the
//! adapter's timeout.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;

use super::Engine;
use super::adapter::{Adapter, Probe, Stage};
use super::http::excerpt;
use crate::config::{AdapterSection, Argv, ExecSection};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{key}: cannot run {argv}")]
    Spawn {
        key: &'static str,
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {argv} took more than {timeout:?} and was killed")]
    Timeout {
        key: &'static str,
        argv: String,
        timeout: Duration,
    },
    #[error("{key}: {argv} exited with {status}; stderr: {stderr}")]
    Failed {
        key: &'static str,
        argv: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{key}: {argv} printed {stdout}, expected a non-negative integer")]
    Garbage {
        key: &'static str,
        argv: String,
        stdout: String,
    },
}

/// The engine behind an `[engine.exec]` table.
pub struct ExecEngine(Adapter<ExecProbe>);

impl ExecEngine {
    /// Starts polling.
    pub fn start(section: &AdapterSection<ExecSection>) -> Self {
        let probe = ExecProbe {
            section: section.adapter.clone(),
            timeout: section.timeout,
        };
        ExecEngine(Adapter::start(
            probe,
            section.advertise,
            section.poll_interval,
        ))
    }

    /// The last failure, as logged; `None` after a good poll.
    pub fn last_error(&self) -> Option<String> {
        self.0.last_error()
    }
}

#[async_trait]
impl Engine for ExecEngine {
    fn address(&self) -> std::net::SocketAddr {
        self.0.address()
    }
    fn status(&self) -> super::EngineStatus {
        self.0.status()
    }
    fn drain(&self) {
        self.0.drain()
    }
    fn resume(&self) {
        self.0.resume()
    }
    fn can_shed(&self) -> bool {
        self.0.can_shed()
    }
    fn shed(&self, count: u64) -> u64 {
        self.0.shed(count)
    }
    async fn shutdown(&self, grace: Duration) {
        self.0.shutdown(grace).await
    }
}

pub(crate) struct ExecProbe {
    section: ExecSection,
    timeout: Duration,
}

/// How a command ended, when it ran to its end in time.
struct Ran {
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl ExecProbe {
    async fn run(&self, key: &'static str, argv: &Argv) -> Result<Ran, ExecError> {
        let mut command = tokio::process::Command::new(&argv.program);
        command
            .args(&argv.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Dropping the future on timeout kills the child (not its own
            // children: scripts should `exec` what may hang).
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| ExecError::Spawn {
            key,
            argv: argv.to_string(),
            source,
        })?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| ExecError::Timeout {
                key,
                argv: argv.to_string(),
                timeout: self.timeout,
            })?
            .map_err(|source| ExecError::Spawn {
                key,
                argv: argv.to_string(),
                source,
            })?;
        Ok(Ran {
            status: output.status,
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }

    /// Runs `argv`, which prints a non-negative integer.
    async fn number(&self, key: &'static str, argv: &Argv) -> Result<u64, ExecError> {
        let ran = self.succeed(key, argv).await?;
        std::str::from_utf8(&ran.stdout)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| ExecError::Garbage {
                key,
                argv: argv.to_string(),
                stdout: excerpt(&ran.stdout),
            })
    }

    /// Runs `argv`; a non-zero exit is an error.
    async fn succeed(&self, key: &'static str, argv: &Argv) -> Result<Ran, ExecError> {
        let ran = self.run(key, argv).await?;
        if ran.status.success() {
            Ok(ran)
        } else {
            Err(ExecError::Failed {
                key,
                argv: argv.to_string(),
                status: ran.status,
                stderr: excerpt(ran.stderr.trim_ascii()),
            })
        }
    }
}

#[async_trait]
impl Probe for ExecProbe {
    type Error = ExecError;

    async fn health(&self) -> Result<(), ExecError> {
        match &self.section.health {
            None => Ok(()),
            Some(argv) => self.succeed("engine.exec.health", argv).await.map(|_| ()),
        }
    }

    async fn queue_depth(&self) -> Result<u64, ExecError> {
        self.number("engine.exec.queue_depth", &self.section.queue_depth)
            .await
    }

    async fn connections(&self) -> Option<Result<u64, ExecError>> {
        let argv = self.section.connections.as_ref()?;
        Some(self.number("engine.exec.connections", argv).await)
    }

    fn can_shed(&self) -> bool {
        self.section.shed.is_some()
    }

    async fn shed(&self, count: u64) -> Result<(), ExecError> {
        let Some(shed) = &self.section.shed else {
            return Ok(());
        };
        let argv = shed.with_count(count);
        self.succeed("engine.exec.shed", &argv).await?;
        tracing::info!(argv = %argv, "engine command ran");
        Ok(())
    }

    async fn drained(&self, queue_depth: u64) -> Result<bool, ExecError> {
        match &self.section.drained {
            None => Ok(queue_depth == 0),
            Some(argv) => Ok(self
                .run("engine.exec.drained", argv)
                .await?
                .status
                .success()),
        }
    }

    fn actions(&self, stage: Stage) -> usize {
        match stage {
            Stage::Drain | Stage::Resume => 1,
            Stage::AfterDrained => 0,
        }
    }

    async fn act(&self, stage: Stage, _index: usize) -> Result<(), ExecError> {
        let (key, argv) = match stage {
            Stage::Drain => ("engine.exec.drain", &self.section.drain),
            Stage::Resume => ("engine.exec.resume", &self.section.resume),
            Stage::AfterDrained => return Ok(()),
        };
        self.succeed(key, argv).await?;
        tracing::info!(command = %key, argv = %argv, "engine command ran");
        Ok(())
    }
}
