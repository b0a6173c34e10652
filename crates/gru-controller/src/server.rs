//! The gRPC server: MinionService, AdminService, grpc.health.v1 and
//! reflection (v1 and v1alpha), all behind TLS.

use std::future::Future;
use std::sync::Arc;

use gru_proto::v1::admin_service_server::AdminServiceServer;
use gru_proto::v1::minion_service_server::MinionServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::admin_api::{AdminApi, require_client_certificate};
use crate::config::{
    HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT, MAX_CONCURRENT_STREAMS, TlsFiles,
};
use crate::minion_api::MinionApi;
use crate::reconcile::Controller;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read TLS file {path}")]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS configuration")]
    Tls(#[source] tonic::transport::Error),
    #[error("invalid reflection descriptors")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("cannot read the join token {path}")]
    JoinToken {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resume from the store")]
    Store(#[source] crate::store::StoreError),
}

/// Reads the server's TLS identity and the CA that admin clients must be
/// signed by. Client certificates are optional at the TLS layer (minions
/// prove themselves in Join instead) and required for AdminService.
pub fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig, ServeError> {
    gru_proto::install_crypto_provider();
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServeError::TlsFile {
            path: path.to_owned(),
            source,
        })
    };
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
        .client_ca_root(Certificate::from_pem(read(&files.client_ca)?))
        .client_auth_optional(true))
}

/// Serves the controller's gRPC API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    controller: Arc<Controller>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let tls = server_tls(&controller.config.tls)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MinionServiceServer<MinionApi>>().await;
    health.set_serving::<AdminServiceServer<AdminApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(gru_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(ServeError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;

    let minion = MinionServiceServer::new(MinionApi {
        controller: controller.clone(),
    });
    let admin = AdminServiceServer::with_interceptor(
        AdminApi {
            controller: controller.clone(),
        },
        require_client_certificate,
    );
    Server::builder()
        .tls_config(tls)
        .map_err(ServeError::Tls)?
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(minion)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Serve)
}
