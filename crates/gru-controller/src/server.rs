//! The gRPC server: MinionService, AdminService, grpc.health.v1 and
//! reflection (v1 and v1alpha), all behind TLS.

use std::future::Future;
use std::sync::Arc;

use gru_proto::v1::admin_service_server::AdminServiceServer;
use gru_proto::v1::minion_service_server::MinionServiceServer;
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::admin_api::{AdminApi, require_client_certificate};
use crate::config::{HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT, MAX_CONCURRENT_STREAMS};
use crate::front_door;
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
    #[error("{path}: expected {what}: {detail}")]
    TlsPem {
        path: std::path::PathBuf,
        what: &'static str,
        detail: String,
    },
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
    #[error(
        "{path}: expected AWS's RSA certificate for identity documents of region {region}: {detail}"
    )]
    IdentitySigner {
        path: std::path::PathBuf,
        region: String,
        detail: String,
    },
    #[error("cannot load the CA for minion certificates")]
    MinionCa(#[source] crate::pki::PkiError),
    #[error("cannot resume from the store")]
    Store(#[source] crate::store::StoreError),
}

/// Serves the controller's gRPC API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    controller: Arc<Controller>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let minion_ca = &controller.config.minion_ca;
    let ca = crate::pki::Ca::load_or_create(
        &minion_ca.cert,
        &minion_ca.key,
        "gru controller: minion CA",
    )
    .map_err(ServeError::MinionCa)?;
    let mut signers = crate::identity::Signers::aws();
    for s in &controller.config.identity_signers {
        let bad = |detail: String| ServeError::IdentitySigner {
            path: s.cert.clone(),
            region: s.region.clone(),
            detail,
        };
        let pem = std::fs::read(&s.cert).map_err(|e| bad(e.to_string()))?;
        signers.add_pem(&s.region, &pem).map_err(bad)?;
    }
    let tls = {
        let counter = controller.clone();
        front_door::reloading(
            controller.config.tls.clone(),
            front_door::tls_config(&controller.config.tls)?,
            move |loaded| counter.tls_reloaded(loaded),
        )
    };
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
        ca: Arc::new(ca),
        signers: Arc::new(signers),
    });
    let admin = AdminServiceServer::with_interceptor(
        AdminApi {
            controller: controller.clone(),
        },
        require_client_certificate,
    );
    // TLS is the front door's: tonic gets finished TLS streams (and reads
    // the admin's client certificate from them).
    Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(minion)
        .add_service(admin)
        .serve_with_incoming_shutdown(front_door::incoming(listener, tls), shutdown)
        .await
        .map_err(ServeError::Serve)
}
