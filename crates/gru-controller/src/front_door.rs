//! The controller's front door: it accepts TCP connections and runs their
//! TLS handshakes itself, each under a deadline and only so many at once,
//! and hands tonic finished TLS streams.
//!
//! A peer that connects and never finishes its handshake (a port scanner, a
//! load balancer health check pointed at the wrong port, a hostile client)
//! is dropped after [`HANDSHAKE_TIMEOUT`]; at most [`MAX_HANDSHAKES`] are in
//! progress, and further connections wait in the kernel's listen backlog
//! instead of taking a file descriptor each. Established connections (the
//! minions' Sessions) are not affected.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsFiles;
use crate::server::ServeError;

/// A TLS handshake not finished within this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many handshakes at once.
pub const MAX_HANDSHAKES: usize = 256;

/// The server's TLS settings: its identity, and the CAs that client
/// certificates must be signed by (the admins', and the minion CA). A client
/// certificate is optional at this layer (a minion's first Join has none
/// yet) and required by AdminService and the minions' Session.
pub fn tls_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    gru_proto::install_crypto_provider();
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServeError::TlsFile {
            path: path.to_owned(),
            source,
        })
    };
    let bad = |path: &std::path::Path, what: &'static str| {
        let path = path.to_owned();
        move |e: &dyn std::fmt::Display| ServeError::TlsPem {
            path: path.clone(),
            what,
            detail: e.to_string(),
        }
    };
    let certs = |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, ServeError> {
        let pem = read(path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(path, "PEM certificates")(&e))?;
        if certs.is_empty() {
            return Err(bad(path, "PEM certificates")(&"no certificate in the file"));
        }
        Ok(certs)
    };
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| bad(&files.key, "a PEM private key")(&e))?;
    let mut roots = RootCertStore::empty();
    for path in std::iter::once(&files.client_ca).chain(&files.minion_ca) {
        for ca in certs(path)? {
            roots
                .add(ca)
                .map_err(|e| bad(path, "a CA certificate")(&e))?;
        }
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(&files.client_ca, "a CA certificate")(&e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad(&files.key, "the key of the certificate")(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// How often the TLS files are checked for a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// The server's TLS settings as they are now: each new connection's
/// handshake uses the newest; connections already up keep theirs.
pub type TlsSource = watch::Receiver<Arc<rustls::ServerConfig>>;

/// Settings that never change (benchmarks, tests).
pub fn fixed(config: Arc<rustls::ServerConfig>) -> TlsSource {
    watch::channel(config).1
}

/// What a file looked like: its inode, size and modification time, if it
/// exists (a file replaced by a rename, as deploy tools do, has a new inode
/// even when its size and time happen to match).
type Seen = Vec<Option<(u64, u64, std::time::SystemTime)>>;

fn look(files: &TlsFiles) -> Seen {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key, &files.client_ca]
        .into_iter()
        .chain(&files.minion_ca)
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.ino(), m.len(), m.modified().ok()?))
        })
        .collect()
}

/// Serves `first` and reads the TLS files again on SIGHUP and whenever one
/// of them changes (checked every [`RELOAD_POLL`]): a set that loads
/// replaces the old for new connections; one that does not (a key that
/// does not match its certificate, a file half written) is logged once and
/// the old set kept, and it is tried again on the next change or SIGHUP.
/// `counted` is told of each attempt (loaded or not). Stops when every
/// [`TlsSource`] is dropped.
pub fn reloading(
    files: TlsFiles,
    first: Arc<rustls::ServerConfig>,
    counted: impl Fn(bool) + Send + 'static,
) -> TlsSource {
    let (tx, rx) = watch::channel(first);
    // Registered before the task runs: from here on SIGHUP no longer ends
    // the process.
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are reloaded when they change");
            None
        }
    };
    tracing::info!(
        cert = %files.cert.display(),
        "TLS files watched: a change, or SIGHUP, reloads them"
    );
    tokio::spawn(async move {
        let mut loaded = look(&files);
        let mut refused: Option<Seen> = None;
        let mut tick = tokio::time::interval(RELOAD_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = tick.tick() => {
                    let now = look(&files);
                    if now == loaded || refused.as_ref() == Some(&now) {
                        continue;
                    }
                    "a TLS file changed"
                }
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => "SIGHUP",
                _ = tx.closed() => return,
            };
            let now = look(&files);
            match tls_config(&files) {
                Ok(config) => {
                    tx.send_replace(config);
                    counted(true);
                    loaded = now;
                    refused = None;
                    tracing::info!(
                        cert = %files.cert.display(),
                        client_ca = %files.client_ca.display(),
                        "TLS certificate, key and client CA reloaded ({why}); new connections use them"
                    );
                }
                Err(e) => {
                    tracing::warn!(
                        "TLS files not reloaded ({why}), the ones loaded before stay in use: {}",
                        gru_core::error_chain(&e)
                    );
                    counted(false);
                    refused = Some(now);
                }
            }
        }
    });
    rx
}

/// Accepts on `listener` and yields the connections whose TLS handshake
/// finished, until the stream is dropped. Each handshake uses the newest
/// settings in `tls`.
pub fn incoming(
    listener: TcpListener,
    tls: TlsSource,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    tokio::spawn(accept(listener, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept(
    listener: TcpListener,
    tls: TlsSource,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, io::Error>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        // A slot first, then accept: while every slot is taken, new
        // connections wait in the listen backlog, holding no descriptor here.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            _ = tx.closed() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving
                    // the connections already open.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.borrow().clone());
        let tx = tx.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(slot);
            match handshake {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(tls)).await;
                }
                Ok(Err(e)) => refused(peer, &e.to_string()),
                Err(_) => refused(peer, "no TLS handshake within the deadline"),
            }
        });
    }
}

fn refused(peer: SocketAddr, why: &str) {
    tracing::debug!(%peer, why, "connection dropped before TLS was set up");
}
