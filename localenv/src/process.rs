//! Upstream components as child processes, each with its own log file.
//!
//! Two lifetimes: `Attached` processes die with their owner (tests: killed on drop, and via the
//! parent-death signal if the test process itself is killed); `Detached` ones outlive the command
//! that started them (`vkube dev up`) and are stopped later by pid, after checking the pid still
//! runs the same program.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, io_err};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifetime {
    Attached,
    Detached,
}

#[derive(Clone, Debug)]
pub struct ProcessSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl ProcessSpec {
    pub fn new(name: &str, program: impl Into<PathBuf>, log_dir: &Path) -> Self {
        ProcessSpec {
            name: name.into(),
            program: program.into(),
            args: vec![],
            env: vec![],
            log: log_dir.join(format!("{name}.log")),
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// What is written down about a detached process so a later command can stop it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Recorded {
    pub name: String,
    pub pid: u32,
    pub program: PathBuf,
    pub log: PathBuf,
}

#[derive(Debug)]
pub struct Process {
    pub spec: ProcessSpec,
    child: Child,
    lifetime: Lifetime,
}

impl Process {
    pub fn spawn(spec: ProcessSpec, lifetime: Lifetime) -> Result<Self> {
        if let Some(dir) = spec.log.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(io_err(format!("opening {}", spec.log.display())))?;
        let err_log = log.try_clone().map_err(io_err("duplicating a log handle"))?;
        let mut cmd = match lifetime {
            // setpriv asks the kernel to kill the process when its parent dies, then execs the
            // program (same pid), so no process outlives a killed test run.
            Lifetime::Attached if Path::new("/usr/bin/setpriv").exists() => {
                let mut c = Command::new("/usr/bin/setpriv");
                c.args(["--pdeathsig", "KILL", "--"]).arg(&spec.program);
                c
            }
            _ => Command::new(&spec.program),
        };
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // Its own process group: a Ctrl-C in the terminal that ran `vkube dev up` must not
            // reach the cluster it left running.
            .process_group(0);
        let child = cmd.spawn().map_err(io_err(format!("starting {}", spec.program.display())))?;
        tracing::debug!(name = %spec.name, pid = child.id(), "started");
        Ok(Process { spec, child, lifetime })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn record(&self) -> Recorded {
        Recorded {
            name: self.spec.name.clone(),
            pid: self.pid(),
            program: self.spec.program.clone(),
            log: self.spec.log.clone(),
        }
    }

    /// An error if the process has exited, with the tail of its log.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                component: self.spec.name.clone(),
                status: status.to_string(),
                log: self.spec.log.display().to_string(),
                tail: log_tail(&self.spec.log, 30),
            }),
            Err(e) => Err(io_err(format!("waiting for {}", self.spec.name))(e)),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the child.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(self.pid() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Leaves a detached process running and forgets it.
    pub fn detach(self) -> Recorded {
        let rec = self.record();
        std::mem::forget(self);
        rec
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Attached {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// Whether `pid` is alive and still runs `program` (pids are reused).
pub fn is_alive(rec: &Recorded) -> bool {
    let exe = std::fs::read_link(format!("/proc/{}/exe", rec.pid));
    // A binary replaced since (a rebuilt cache) shows as "<path> (deleted)".
    let runs_program = match exe {
        Ok(exe) => {
            let exe = PathBuf::from(exe.to_string_lossy().trim_end_matches(" (deleted)"));
            exe == rec.program || std::fs::canonicalize(&rec.program).is_ok_and(|p| p == exe)
        }
        Err(_) => false,
    };
    runs_program && !is_zombie(rec.pid)
}

/// Whether `pid` is a zombie or gone.
pub(crate) fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// Stops a recorded detached process: SIGTERM, SIGKILL after `grace`. True if it was running.
pub fn stop_recorded(rec: &Recorded, grace: Duration) -> bool {
    if !is_alive(rec) {
        return false;
    }
    let pid = Pid::from_raw(rec.pid as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_alive(rec) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(pid, Signal::SIGKILL);
    // A killed process always goes, but on a loaded machine tearing down a large one takes a
    // while: callers (and `vkube dev down`) promise it is gone when they return.
    let deadline = Instant::now() + Duration::from_secs(30);
    while is_alive(rec) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The last `lines` lines of a log file (for error messages and failed tests).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops any upstream component or vkube process whose command line mentions `dir` (left
/// behind by a run whose record was lost, e.g. a crash while starting). Other programs (a shell
/// whose command happens to name the directory) are never touched. Returns how many stopped.
pub fn stop_strays(dir: &Path, grace: Duration) -> usize {
    let upstream = crate::upstream::cache_root().join("upstream");
    let needle = dir.display().to_string();
    let me = std::process::id();
    let strays: Vec<Recorded> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !cmdline.contains(&needle) {
                return None;
            }
            let program = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let program = PathBuf::from(program.to_string_lossy().trim_end_matches(" (deleted)"));
            let ours = program.starts_with(&upstream) || program.file_name().is_some_and(|n| n == "vkube");
            if !ours {
                return None;
            }
            Some(Recorded { name: cmdline.chars().take(60).collect(), pid, program, log: PathBuf::new() })
        })
        .collect();
    strays.iter().filter(|r| stop_recorded(r, grace)).count()
}

const RECORDED: &str = "processes.json";
/// Children a recorded process supervises (`vkube run --supervise` writes it, same shape): left
/// running only if their supervisor was killed, and stopped after it.
const SUPERVISED: &str = "supervised.json";

/// The children a supervised control plane in `dir` has running.
pub fn read_supervised(dir: &Path) -> Vec<Recorded> {
    std::fs::read_to_string(dir.join(SUPERVISED)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// Stops whatever a killed supervisor left of its children in `dir`. Returns their names.
fn stop_supervised(dir: &Path) -> Vec<String> {
    read_supervised(dir)
        .iter()
        .rev()
        .filter(|r| stop_recorded(r, Duration::from_secs(10)))
        .map(|r| r.name.clone())
        .collect()
}

/// The detached processes recorded in `dir`.
pub fn read_recorded(dir: &Path) -> Result<Vec<Recorded>> {
    let path = dir.join(RECORDED);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::State { path, reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

pub fn write_recorded(dir: &Path, recorded: &[Recorded]) -> Result<()> {
    crate::host::write_json(&dir.join(RECORDED), &recorded)
}

/// Stops every process recorded in `dir`, newest first, and forgets them. Returns the names of
/// those that were running.
pub fn stop_all_recorded(dir: &Path) -> Result<Vec<String>> {
    let recorded = read_recorded(dir)?;
    let mut stopped = vec![];
    for rec in recorded.iter().rev() {
        if stop_recorded(rec, Duration::from_secs(10)) {
            stopped.push(rec.name.clone());
        }
    }
    if !recorded.is_empty() {
        write_recorded(dir, &[])?;
    }
    stopped.extend(stop_supervised(dir));
    Ok(stopped)
}

/// The processes of one environment (a host cluster, a local control plane), recorded in
/// `processes.json` in its directory as they start, and stopped newest first when the group is
/// dropped, unless it was detached.
pub struct ProcessGroup {
    dir: PathBuf,
    lifetime: Lifetime,
    processes: Vec<Process>,
    /// Nothing left to stop: left running on purpose (`detach`), or stopped already (`stop_all`;
    /// the directory's record may by then name a newer group's children).
    finished: bool,
}

impl ProcessGroup {
    pub fn new(dir: &Path, lifetime: Lifetime) -> Self {
        ProcessGroup { dir: dir.to_path_buf(), lifetime, processes: vec![], finished: false }
    }

    pub fn lifetime(&self) -> Lifetime {
        self.lifetime
    }

    /// Starts a process; fails at once if it exits right away (a bad flag, a port clash).
    pub fn spawn(&mut self, spec: ProcessSpec) -> Result<()> {
        let mut p = Process::spawn(spec, self.lifetime)?;
        std::thread::sleep(Duration::from_millis(50));
        p.check_running()?;
        self.processes.push(p);
        // Started again after a stop: its processes are stopped with it again.
        self.finished = false;
        self.write()
    }

    /// The first process that has exited, as an error with the tail of its log.
    pub fn check_running(&mut self) -> Result<()> {
        self.processes.iter_mut().try_for_each(Process::check_running)
    }

    /// Stops one process by name (SIGKILL when `kill`, else SIGTERM with a grace period).
    pub fn stop(&mut self, name: &str, kill: bool) {
        if let Some(i) = self.processes.iter().position(|p| p.name() == name) {
            let mut p = self.processes.remove(i);
            p.stop(if kill { Duration::ZERO } else { Duration::from_secs(10) });
        }
        let _ = self.write();
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes.iter().find(|p| p.name() == name).map(Process::pid)
    }

    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        self.processes.iter().map(|p| (p.name().to_string(), p.spec.log.clone())).collect()
    }

    /// Leaves the processes running, recorded in `processes.json`; `stop_all_recorded` on the
    /// directory stops them later.
    pub fn detach(mut self) {
        for p in std::mem::take(&mut self.processes) {
            p.detach();
        }
        self.finished = true;
        // The record stays as written by the last spawn: dropping an empty group leaves it alone.
    }

    fn write(&self) -> Result<()> {
        let recorded: Vec<Recorded> = self.processes.iter().map(Process::record).collect();
        write_recorded(&self.dir, &recorded)
    }
}

impl ProcessGroup {
    /// Stops every process, newest first, and what a supervisor among them left of its children
    /// (also when the supervisor was killed already: a test that fails between killing it and
    /// starting it again must not leave its etcd and API server running).
    pub fn stop_all(&mut self) {
        if self.finished {
            return;
        }
        if !self.processes.is_empty() {
            while let Some(mut p) = self.processes.pop() {
                p.stop(Duration::from_secs(5));
            }
            let _ = self.write();
        }
        stop_supervised(&self.dir);
        self.finished = true;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a supervisor's child: a process recorded in `supervised.json`.
    fn supervised_child(dir: &Path) -> (std::process::Child, Recorded) {
        let child = std::process::Command::new("sleep").arg("60").spawn().expect("sleep");
        let program = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
        let rec = Recorded { name: "etcd".into(), pid: child.id(), program, log: PathBuf::new() };
        std::fs::write(dir.join(SUPERVISED), serde_json::to_string(&[&rec]).unwrap()).unwrap();
        (child, rec)
    }

    #[test]
    fn a_killed_supervisors_children_go_with_the_group_unless_it_was_detached() {
        let dir = tempfile::tempdir().unwrap();
        // The supervisor was killed (no process left in the group): its child still goes.
        let (mut child, rec) = supervised_child(dir.path());
        assert!(is_alive(&rec));
        drop(ProcessGroup::new(dir.path(), Lifetime::Attached));
        let _ = child.wait();
        assert!(!is_alive(&rec), "the supervised child outlived its group");
        // Stopped once (a restart), then dropped after a new group started in the same directory:
        // the new group's children stay.
        let mut stopped = ProcessGroup::new(dir.path(), Lifetime::Attached);
        stopped.stop_all();
        let (mut child, rec) = supervised_child(dir.path());
        drop(stopped);
        assert!(is_alive(&rec), "a group stopped already stops nothing more");
        let _ = child.kill();
        let _ = child.wait();
        // Detached on purpose: left running.
        let (mut child, rec) = supervised_child(dir.path());
        ProcessGroup::new(dir.path(), Lifetime::Detached).detach();
        assert!(is_alive(&rec), "a detached group's children stay");
        let _ = child.kill();
        let _ = child.wait();
    }
}
