//! Readiness for the service manager (systemd `Type=notify`): `READY=1`
//! once the process serves, `STOPPING=1` when it begins to stop.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
//! The variable is read once, by the binary, into a [`Notifier`]; without it
//! every call does nothing, so `gru dev`, the tests and other service
//! managers are unaffected. The controller uses it too (from the `gru`
//! binary); it lives here because this is the one library crate both
//! services' code paths already share, and it uses nothing else of it but
//! [`crate::error_chain`].

use std::ffi::{OsStr, OsString};
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
#[error("cannot notify the service manager at {socket:?}")]
pub struct NotifyError {
    socket: OsString,
    #[source]
    source: std::io::Error,
}

/// Sends state changes to the service manager, or nothing when there is
/// none. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    socket: Option<OsString>,
}

impl Notifier {
    /// The service manager named by `$NOTIFY_SOCKET`, if any.
    pub fn from_env() -> Notifier {
        Notifier::to_socket(std::env::var_os(NOTIFY_SOCKET))
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// A notifier for the socket `socket` (as `$NOTIFY_SOCKET` would name
    /// it); `None` or empty sends nothing.
    pub fn to_socket(socket: Option<impl Into<OsString>>) -> Notifier {
        Notifier {
            socket: socket.map(Into::into).filter(|s| !s.is_empty()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// `READY=1`: startup is finished; systemd completes the unit's start.
    pub fn ready(&self) {
        self.send("READY=1\n");
    }

    /// `STOPPING=1`: the service is shutting down (draining).
    pub fn stopping(&self) {
        self.send("STOPPING=1\n");
    }

    /// A failed notification is logged, not returned: the service works
    /// without it (systemd then times the start out and says why).
    fn send(&self, message: &str) {
        if let Some(socket) = &self.socket
            && let Err(e) = send(socket, message)
        {
            tracing::warn!(error = %crate::error_chain(&e), "service manager notification failed");
        }
    }
}

fn send(socket: &OsStr, message: &str) -> Result<(), NotifyError> {
    let err = |source| NotifyError {
        socket: socket.to_owned(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(err)?;
    send_to(&sock, socket, message.as_bytes()).map_err(err)?;
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_to(sock: &UnixDatagram, socket: &OsStr, message: &[u8]) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(message, &addr)
        }
        None => sock.send_to(message, socket),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_to(sock: &UnixDatagram, socket: &OsStr, message: &[u8]) -> std::io::Result<usize> {
    sock.send_to(message, socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receiver(dir: &std::path::Path) -> (UnixDatagram, std::path::PathBuf) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        (sock, path)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification within 5s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_ready_and_stopping_to_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sock, path) = receiver(dir.path());
        let n = Notifier::to_socket(Some(path.as_os_str()));
        assert!(n.is_enabled());
        n.ready();
        assert_eq!(recv(&sock), "READY=1\n");
        n.stopping();
        assert_eq!(recv(&sock), "STOPPING=1\n");
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_nothing_fails() {
        for n in [
            Notifier::disabled(),
            Notifier::to_socket(Some("")),
            Notifier::to_socket(None::<OsString>),
        ] {
            assert!(!n.is_enabled());
            n.ready();
            n.stopping();
        }
        // A socket nobody listens on: logged, not fatal.
        Notifier::to_socket(Some("/nonexistent/gru/notify.sock")).ready();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_names() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("gru-sd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Notifier::to_socket(Some(format!("@{name}"))).ready();
        assert_eq!(recv(&sock), "READY=1\n");
    }
}
