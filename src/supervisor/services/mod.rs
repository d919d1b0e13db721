//! The service chain of a Primary: started in order after promotion, stopped in reverse before
//! demotion, monitored; a failed monitor restarts the service and those after it, and the
//! failures are counted against `migration-threshold`.

pub mod plan;

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::ServiceConfig;
use plan::{script, Op, Script};

/// Longest a start, stop or monitor may run.
pub use crate::node::ha_report::{ServiceState, ServiceStatus};

const OP_TIMEOUT: Duration = Duration::from_secs(60);

struct Entry {
    config: ServiceConfig,
    label: String,
    state: ServiceState,
    failures: u32,
    last_error: Option<String>,
}

pub struct Chain {
    entries: Vec<Entry>,
    /// RDBD_RESOURCE, RDBD_NODE, RDBD_PEER for every script.
    env: BTreeMap<String, String>,
}

/// Runs one script; its stderr's last line is the error.
async fn run(script: &Script, env: &BTreeMap<String, String>) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(&script.script).envs(env).envs(&script.env).kill_on_drop(true);
    cmd.stdin(std::process::Stdio::null());
    let out = match tokio::time::timeout(OP_TIMEOUT, cmd.output()).await {
        Err(_) => return Err(format!("timed out after {OP_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("cannot run /bin/sh: {e}")),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    Err(match out.status.code() {
        Some(code) if last.is_empty() => format!("exit status {code}"),
        Some(code) => format!("exit status {code}: {last}"),
        None => "killed by a signal".into(),
    })
}

impl Chain {
    pub fn new(services: &[ServiceConfig], env: BTreeMap<String, String>) -> Self {
        let entries = services
            .iter()
            .map(|c| Entry {
                config: c.clone(),
                label: c.label(),
                state: ServiceState::Stopped,
                failures: 0,
                last_error: None,
            })
            .collect();
        Self { entries, env }
    }

    async fn op(&mut self, i: usize, op: Op) -> Result<(), String> {
        let Some(s) = script(&self.entries[i].config, op) else { return Ok(()) };
        let label = self.entries[i].label.clone();
        let result = run(&s, &self.env).await.map_err(|e| format!("{label} {}: {e}", op.as_str()));
        let entry = &mut self.entries[i];
        match (&result, op) {
            (Ok(()), Op::Start) => {
                entry.state = ServiceState::Running;
                info!(service = %label, "started");
            }
            (Ok(()), Op::Stop) => {
                entry.state = ServiceState::Stopped;
                info!(service = %label, "stopped");
            }
            (Ok(()), Op::Monitor) => {}
            (Err(e), _) => {
                entry.state = ServiceState::Failed;
                entry.last_error = Some(e.clone());
                warn!("{e}");
            }
        }
        result
    }

    /// Starts every service in order; on a failure stops those started, in reverse.
    pub async fn start_all(&mut self) -> Result<(), String> {
        for i in 0..self.entries.len() {
            if let Err(e) = self.op(i, Op::Start).await {
                self.entries[i].failures += 1;
                // The failed one too: it may have done half its work.
                let _ = self.stop_range(0..i + 1).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stops every service, in reverse order; the first failure is returned after trying all.
    pub async fn stop_all(&mut self) -> Result<(), String> {
        self.stop_from(0).await
    }

    /// Stops services `first..` in reverse (the last one first).
    async fn stop_from(&mut self, first: usize) -> Result<(), String> {
        self.stop_range(first..self.entries.len()).await
    }

    async fn stop_range(&mut self, range: std::ops::Range<usize>) -> Result<(), String> {
        let mut first_error = None;
        for i in range.rev() {
            if let Err(e) = self.op(i, Op::Stop).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Monitors the running chain. A failure counts against the service and restarts it with
    /// everything after it; `Err` if that restart failed too.
    pub async fn monitor(&mut self) -> Result<(), String> {
        for i in 0..self.entries.len() {
            if self.entries[i].state != ServiceState::Running {
                continue;
            }
            if let Err(e) = self.op(i, Op::Monitor).await {
                self.entries[i].failures += 1;
                warn!("restarting {} and what follows it: {e}", self.entries[i].label);
                self.stop_from(i).await?;
                for j in i..self.entries.len() {
                    self.op(j, Op::Start).await?;
                }
            }
        }
        Ok(())
    }

    /// The most failures of any one service since the last reset.
    pub fn failures(&self) -> u32 {
        self.entries.iter().map(|e| e.failures).max().unwrap_or(0)
    }

    pub fn reset_failures(&mut self) {
        for e in &mut self.entries {
            e.failures = 0;
        }
    }

    pub fn any_running(&self) -> bool {
        self.entries.iter().any(|e| e.state != ServiceState::Stopped)
    }

    pub fn status(&self) -> Vec<ServiceStatus> {
        self.entries
            .iter()
            .map(|e| ServiceStatus {
                service: e.label.clone(),
                state: e.state,
                failures: e.failures,
                last_error: e.last_error.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(name: &str, dir: &std::path::Path, monitor: bool) -> ServiceConfig {
        let flag = dir.join(name);
        let f = plan::quote(&flag.to_string_lossy());
        let log = plan::quote(&dir.join("log").to_string_lossy());
        ServiceConfig::Exec {
            name: name.into(),
            start: format!("test ! -e {f}.broken && touch {f} && echo start {name} >> {log}"),
            stop: format!("rm -f {f} && echo stop {name} >> {log}"),
            monitor: monitor.then(|| format!("test -e {f}")),
        }
    }

    fn log(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("log")).unwrap_or_default().lines().map(String::from).collect()
    }

    #[tokio::test]
    async fn started_in_order_stopped_in_reverse_and_a_failed_start_undone() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut chain =
            Chain::new(&[exec("a", d, true), exec("b", d, true), exec("c", d, false)], BTreeMap::new());
        chain.start_all().await.unwrap();
        chain.stop_all().await.unwrap();
        assert_eq!(log(d), ["start a", "start b", "start c", "stop c", "stop b", "stop a"]);
        std::fs::remove_file(d.join("log")).unwrap();
        std::fs::write(d.join("c.broken"), "").unwrap();
        let e = chain.start_all().await.unwrap_err();
        assert!(e.starts_with("exec:c start: exit status 1"), "{e}");
        assert_eq!(log(d), ["start a", "start b", "stop c", "stop b", "stop a"]);
        assert_eq!(chain.failures(), 1);
        assert!(!d.join("a").exists() && !d.join("b").exists());
    }

    #[tokio::test]
    async fn a_failed_monitor_restarts_the_service_and_those_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut chain =
            Chain::new(&[exec("a", d, true), exec("b", d, true), exec("c", d, true)], BTreeMap::new());
        chain.start_all().await.unwrap();
        chain.monitor().await.unwrap();
        std::fs::remove_file(d.join("log")).unwrap();
        std::fs::remove_file(d.join("b")).unwrap(); // b dies
        chain.monitor().await.unwrap();
        assert_eq!(log(d), ["stop c", "stop b", "start b", "start c"]);
        assert_eq!(chain.failures(), 1);
        let states: Vec<ServiceState> = chain.status().iter().map(|s| s.state).collect();
        assert_eq!(states, [ServiceState::Running; 3]);
        // It dies and cannot come back: the restart fails.
        std::fs::remove_file(d.join("b")).unwrap();
        std::fs::write(d.join("b.broken"), "").unwrap();
        assert!(chain.monitor().await.is_err());
        assert_eq!(chain.failures(), 2);
    }
}
