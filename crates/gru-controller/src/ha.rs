//! Several controllers, one leading (DESIGN.md "High availability"): what a
//! controller knows of the lease it leads or waits under ([`Leadership`]),
//! and the server a standby runs while it waits ([`serve_standby`]).
//!
//! The lease itself lives with the store that holds it (gru-aws's DynamoDB
//! lease); this module knows it only through [`Leadership`].
//!
//! Invariants: a standby changes nothing and serves no minion. It answers
//! `ControllerStatus` and `WhoAmI`, and every other call with UNAVAILABLE
//! and, when it knows one, the leader's address in the [`LEADER_METADATA`]
//! metadata, so minions and the CLI can follow the leader.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use gru_proto::v1 as pb;
use gru_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use gru_proto::v1::minion_service_server::{MinionService, MinionServiceServer};
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Caller;
use crate::config::{ControllerConfig, HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT};
use crate::front_door;
use crate::server::ServeError;

/// The response metadata key in which a standby names the leader's address
/// (`https://host:port`).
pub const LEADER_METADATA: &str = "gru-leader";

/// What a controller knows of the lease, for `gru controller status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseStatus {
    /// This controller's name.
    pub controller: String,
    /// Whether this controller holds the lease now.
    pub leading: bool,
    /// The holder's name and advertised address, as last read; empty when
    /// none holds it.
    pub leader: String,
    pub leader_address: String,
    /// When the holder took the lease, by its clock (unix ms).
    pub leader_since_ms: i64,
    pub version: u64,
    pub duration_ms: i64,
    /// "dynamodb:<table>".
    pub store: String,
}

/// Registers `gru_controller_leading`: 1 on the controller that leads (and
/// on a controller with a store of its own), 0 on a standby.
pub fn register_leading(registry: &mut prometheus_client::registry::Registry, leading: bool) {
    let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    gauge.set(i64::from(leading));
    registry.register(
        "gru_controller_leading",
        "Whether this controller leads (1) or stands by (0)",
        gauge,
    );
}

/// What a standby serves on its metrics address until it leads: that it
/// is up, which gru it is, and that it does not lead.
pub fn standby_metrics_site() -> gru_proto::metrics::Site {
    let mut prom = prometheus_client::registry::Registry::default();
    gru_proto::metrics::register_build_info(&mut prom, "controller");
    register_leading(&mut prom, false);
    gru_proto::metrics::Site::new(prom)
}

/// A lease a controller leads or waits under.
pub trait Leadership: Send + Sync + 'static {
    /// What is known now (no I/O).
    fn status(&self) -> LeaseStatus;
}

impl From<LeaseStatus> for pb::ControllerStatusResponse {
    fn from(s: LeaseStatus) -> Self {
        pb::ControllerStatusResponse {
            controller: s.controller,
            leading: s.leading,
            leader: s.leader,
            leader_address: s.leader_address,
            leader_since_unix_ms: s.leader_since_ms,
            lease_version: s.version,
            lease_duration_ms: s.duration_ms,
            store: s.store,
        }
    }
}

/// Serves a standby's gRPC API on `listener` until `shutdown` resolves:
/// the same TLS and client-certificate checks as the leader's, and answers
/// that point at the leader (see the module's invariants).
pub async fn serve_standby(
    config: &ControllerConfig,
    listener: TcpListener,
    leadership: Arc<dyn Leadership>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let tls = front_door::fixed(front_door::tls_config(&config.tls)?);
    let standby = Standby {
        config: Arc::new(config.clone()),
        leadership,
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<MinionServiceServer<Standby>>()
        .await;
    health
        .set_not_serving::<AdminServiceServer<Standby>>()
        .await;
    Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(MinionServiceServer::new(standby.clone()))
        .add_service(AdminServiceServer::new(standby))
        .serve_with_incoming_shutdown(front_door::incoming(listener, tls), shutdown)
        .await
        .map_err(ServeError::Serve)
}

#[derive(Clone)]
struct Standby {
    config: Arc<ControllerConfig>,
    leadership: Arc<dyn Leadership>,
}

type Never<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Standby {
    /// UNAVAILABLE, naming the leader (in the message and the metadata).
    fn elsewhere(&self) -> Status {
        let s = self.leadership.status();
        if s.leader_address.is_empty() {
            return Status::unavailable(format!(
                "controller {} is a standby and no controller leads at the moment; try again shortly",
                s.controller
            ));
        }
        let mut status = Status::unavailable(format!(
            "controller {} is a standby; the leader is {} at {}",
            s.controller, s.leader, s.leader_address
        ));
        if let Ok(v) = MetadataValue::try_from(s.leader_address.as_str()) {
            status.metadata_mut().insert(LEADER_METADATA, v);
        }
        status
    }

    #[allow(clippy::result_large_err)]
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        crate::admin_api::caller(request, &self.config.access)
    }

    #[allow(clippy::result_large_err)]
    fn admin<T, R>(&self, request: &Request<T>) -> Result<R, Status> {
        self.caller(request)?;
        Err(self.elsewhere())
    }
}

#[tonic::async_trait]
impl MinionService for Standby {
    async fn join(
        &self,
        _request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        Err(self.elsewhere())
    }

    type SessionStream = Never<pb::ControllerCommand>;

    async fn session(
        &self,
        _request: Request<Streaming<pb::SessionMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(self.elsewhere())
    }
}

#[tonic::async_trait]
impl AdminService for Standby {
    async fn list_fleets(
        &self,
        request: Request<pb::ListFleetsRequest>,
    ) -> Result<Response<pb::ListFleetsResponse>, Status> {
        self.admin(&request)
    }
    async fn list_minions(
        &self,
        request: Request<pb::ListMinionsRequest>,
    ) -> Result<Response<pb::ListMinionsResponse>, Status> {
        self.admin(&request)
    }
    async fn get_minion(
        &self,
        request: Request<pb::GetMinionRequest>,
    ) -> Result<Response<pb::Minion>, Status> {
        self.admin(&request)
    }
    async fn scale(
        &self,
        request: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        self.admin(&request)
    }
    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::Minion>, Status> {
        self.admin(&request)
    }
    async fn pause(
        &self,
        request: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        self.admin(&request)
    }
    async fn resume(
        &self,
        request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        self.admin(&request)
    }

    type WatchEventsStream = Never<pb::Event>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.admin(&request)
    }
    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::Decision>, Status> {
        self.admin(&request)
    }
    async fn forget_minion(
        &self,
        request: Request<pb::ForgetMinionRequest>,
    ) -> Result<Response<pb::ForgetMinionResponse>, Status> {
        self.admin(&request)
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        Ok(Response::new(crate::admin_api::who_am_i(
            self.caller(&request)?,
        )))
    }

    async fn controller_status(
        &self,
        request: Request<pb::ControllerStatusRequest>,
    ) -> Result<Response<pb::ControllerStatusResponse>, Status> {
        let caller = self.caller(&request)?;
        caller
            .may("ControllerStatus")
            .map_err(Status::permission_denied)?;
        Ok(Response::new(self.leadership.status().into()))
    }
}
