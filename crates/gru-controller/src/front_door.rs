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
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsFiles;
use crate::server::ServeError;

/// A TLS handshake not finished within this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many handshakes at once.
pub const MAX_HANDSHAKES: usize = 256;

/// The server's TLS settings: its identity, and the CA that admin clients'
/// certificates must be signed by. A client certificate is optional at this
/// layer (minions prove themselves in Join) and required by AdminService.
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
    for ca in certs(&files.client_ca)? {
        roots
            .add(ca)
            .map_err(|e| bad(&files.client_ca, "a CA certificate")(&e))?;
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

/// Accepts on `listener` and yields the connections whose TLS handshake
/// finished, until the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    tokio::spawn(accept(listener, TlsAcceptor::from(config), tx));
    ReceiverStream::new(rx)
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
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
        let acceptor = acceptor.clone();
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
