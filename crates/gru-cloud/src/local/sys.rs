//! What the local provider needs from the operating system beyond std and
//! tokio: tying a child's life to ours or detaching it into a session of its
//! own, signalling an instance's process group, and telling from `/proc`
//! whether a pid still names the process we recorded. All of the crate's
//! `unsafe` lives here.

use std::io;

use tokio::process::Command;

/// Makes the child spawned by `cmd` receive SIGTERM when the thread that
/// forks it dies, so no instance outlives its controller, not even one
/// killed with SIGKILL.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// not only when the process does. The caller must therefore spawn from a
/// thread that lives as long as the child should (never from
/// `spawn_blocking`, whose threads exit after an idle while). The group spawns
/// from a dedicated launcher thread for exactly this reason.
#[allow(unsafe_code)]
pub(super) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: `pre_exec` runs the closure in the forked child before exec,
    // where only async-signal-safe operations are allowed. The closure makes
    // two system calls (prctl, getppid), takes no lock and allocates nothing
    // (`last_os_error` and `from_raw_os_error` build an `io::Error` in place).
    unsafe {
        cmd.pre_exec(move || {
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            // If the parent died between fork and prctl, the signal has
            // already been missed: the child was adopted by someone else.
            // Give up instead of running unsupervised.
            if u32::try_from(libc::getppid()) != Ok(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Starts the child spawned by `cmd` in a new session (`setsid`), for
/// instances meant to outlive their controller: it leads its own process
/// group (group id = its pid, as [`signal_group`] expects) and has no
/// controlling terminal, so neither a Ctrl-C nor a hangup of the terminal
/// the controller runs in reaches it except through the controller.
///
/// Do not combine with `Command::process_group`: a process group leader
/// cannot call `setsid`.
#[allow(unsafe_code)]
pub(super) fn new_session(cmd: &mut Command) {
    // SAFETY: `pre_exec` runs the closure in the forked child before exec,
    // where only async-signal-safe operations are allowed. setsid(2) is one,
    // and the closure takes no lock and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process group led by `pid` (instances are spawned
/// with `process_group(0)` or [`new_session`], so the group id is the
/// instance's pid).
///
/// The caller must know the number is still ours: the pid of a child it has
/// not reaped yet, or of an adopted process whose start time it has just
/// checked (see [`proc_stat`]).
#[allow(unsafe_code)]
pub(super) fn signal_group(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // kill(-1, ..) would signal every process we may signal, and 0 our own
    // group: refuse anything that cannot be a child's pid.
    let pgid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 1)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: kill(2) takes two integers and touches none of our memory.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ProcStat {
    /// Field 22, `starttime`: clock ticks after boot at which the process
    /// started. A pid is reused only by a later process, so pid and start
    /// time together name one process for the whole boot.
    pub start_time: u64,
    /// The process has exited and waits to be reaped (a zombie).
    pub exited: bool,
}

/// Reads `/proc/<pid>/stat`; `None` when there is no such process (or no
/// `/proc`).
pub(super) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Parses one `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    // Field 2, the command name, is in parentheses and may itself contain
    // spaces and parentheses: fields 3 onwards start after the last ") ".
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    // Field 3 was the first; field 22 is 19 further on.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat {
        start_time,
        exited: matches!(state, "Z" | "X" | "x"),
    })
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): pids and start times
/// recorded in another boot name none of our processes.
pub(super) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_time_and_state_past_an_awkward_name() {
        let line = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 93 0 0 0 0 0 0 0 20 0 1 0 \
                    987654 2322432 229 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0\n";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                start_time: 987_654,
                exited: false
            })
        );
        let zombie = line.replace(") S ", ") Z ");
        assert_eq!(parse_stat(&zombie).map(|s| s.exited), Some(true));
        assert_eq!(parse_stat("4242 (cut short) S 1 2"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn reads_our_own_stat() {
        let ours = proc_stat(std::process::id()).expect("our own /proc entry");
        assert!(!ours.exited);
        assert_eq!(
            proc_stat(std::process::id()),
            Some(ours),
            "start time is stable"
        );
    }
}
