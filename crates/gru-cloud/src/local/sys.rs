//! The two system calls the local provider needs that neither std nor tokio
//! wraps: tying a child's life to ours, and signalling a child's process
//! group. All of the crate's `unsafe` lives here.

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

/// Sends `signal` to the process group led by the child `pid` (children are
/// spawned with `process_group(0)`, so the group id is the child's pid).
///
/// The caller must pass the pid of a child it has not reaped yet: only then
/// can the number not name someone else's group.
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
