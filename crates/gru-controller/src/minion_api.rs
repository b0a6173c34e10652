//! `gru.v1.MinionService`: Join and the long-lived Session. Converts between
//! the wire types and the registry's at this edge.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use gru_cloud::InstanceId;
use gru_proto::v1 as pb;
use pb::minion_service_server::MinionService;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Subject;
use crate::identity::Signers;
use crate::pki::{Ca, MinionCertificate, minion_uri, parse_minion_uri, uri_safe};
use crate::reconcile::Controller;
use crate::registry::EventKind;
use crate::registry::{Command, Report, SessionRefusal};

/// How long a new Session may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands queued for one minion before sends start failing.
pub const SESSION_COMMAND_BUFFER: usize = 16;

pub struct MinionApi {
    pub controller: Arc<Controller>,
    /// Issues each minion its client certificate (`[minion_ca]`).
    pub ca: Arc<Ca>,
    /// AWS's certificates for identity documents (`[[identity_signer]]`).
    pub signers: Arc<Signers>,
}

/// The fleet and instance named by the minion certificate a connection
/// presents: `Ok(None)` without a client certificate (or with an admin's),
/// `Err` when it does not parse.
#[allow(clippy::result_large_err)]
fn presented<T>(request: &Request<T>) -> Result<Option<(String, String)>, Status> {
    let Some(der) = request.peer_certs().and_then(|c| c.first().cloned()) else {
        return Ok(None);
    };
    let subject = Subject::from_der(der.as_ref()).map_err(Status::unauthenticated)?;
    Ok(subject
        .minion_uri
        .as_deref()
        .and_then(|uri| parse_minion_uri(uri).map(|(f, i)| (f.to_owned(), i.to_owned()))))
}

fn certificate_to_pb(c: MinionCertificate) -> pb::Certificate {
    pb::Certificate {
        certificate_pem: c.cert_pem,
        not_after_unix: c.not_after_unix,
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerCommand, Status>> + Send>>;

fn to_pb(c: Command) -> pb::ControllerCommand {
    use pb::controller_command::Command as C;
    let command = match c {
        Command::Drain { deadline, reason } => C::Drain(pb::Drain {
            deadline_ms: deadline.as_millis() as u64,
            reason,
        }),
        Command::Resume => C::Resume(pb::Resume {}),
        Command::Shed { count, reason } => C::Shed(pb::ShedConnections { count, reason }),
        Command::Certificate(c) => C::Certificate(certificate_to_pb(c)),
    };
    pb::ControllerCommand {
        command: Some(command),
    }
}

fn from_pb(r: pb::MinionReport) -> Report {
    Report {
        seq: r.seq,
        queue_depth: r.queue_depth,
        in_flight: r.in_flight,
        processed_total: r.processed_total,
        failed_total: r.failed_total,
        open_connections: r.open_connections,
        healthy: r.health == pb::EngineHealth::Healthy as i32,
        draining: r.draining,
        drained: r.drained,
        can_shed: r.can_shed,
    }
}

/// Compares without stopping at the first differing byte.
fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl MinionApi {
    /// Logs a refused Join (who tried, as what) and records it in the
    /// fleet's event log as a security event; returns its status.
    fn refuse_join(&self, req: &pb::JoinRequest, status: Status) -> Status {
        tracing::warn!(
            fleet = %req.fleet,
            instance = %req.instance_id,
            "Join refused: {}",
            status.message()
        );
        if let Some(fleet) = self.controller.fleet(&req.fleet) {
            fleet.registry().emit(
                &req.fleet,
                None,
                EventKind::Security,
                format!("Join as {} refused: {}", req.instance_id, status.message()),
            );
        }
        status
    }

    /// Checks a Join with an instance identity document: its signature,
    /// the fleet's rules, and that the instance is in the fleet's group now.
    async fn check_identity(
        &self,
        fleet: &crate::reconcile::Fleet,
        req: &pb::JoinRequest,
        iid: &pb::InstanceIdentity,
    ) -> Result<(), Status> {
        let Some(rules) = &fleet.runtime.config.identity else {
            return Err(Status::failed_precondition(format!(
                "fleet {:?} takes the join token, not identity documents (no [fleet.identity])",
                req.fleet
            )));
        };
        let doc = self
            .signers
            .verify(&iid.document, &iid.signature)
            .map_err(|r| Status::unauthenticated(r.to_string()))?;
        rules
            .check(&doc, &req.instance_id, jiff::Timestamp::now())
            .map_err(|r| Status::permission_denied(r.to_string()))?;
        let group = fleet
            .runtime
            .group
            .describe()
            .await
            .map_err(|e| Status::unavailable(format!("cannot check the fleet's group: {e}")))?;
        let member = group
            .instances
            .iter()
            .find(|i| i.id.0 == req.instance_id)
            .filter(|i| i.lifecycle != gru_cloud::InstanceLifecycle::Terminating);
        if member.is_none() {
            return Err(Status::permission_denied(format!(
                "instance {} is not in fleet {:?}'s group (or is terminating)",
                req.instance_id, req.fleet
            )));
        }
        let running = fleet
            .runtime
            .group
            .running(&gru_cloud::InstanceId(req.instance_id.clone()))
            .await
            .map_err(|e| Status::unavailable(format!("cannot check the instance: {e}")))?;
        if !running {
            return Err(Status::permission_denied(format!(
                "instance {} is not running",
                req.instance_id
            )));
        }
        Ok(())
    }

    /// Records the identity-document join of `req`'s instance: refused if it
    /// joined so before. The last check before the registry's join, so a
    /// Join refused for anything else does not use the document up.
    fn claim_identity(&self, req: &pb::JoinRequest) -> Result<(), Status> {
        match self
            .controller
            .claim_identity_join(&req.instance_id, &req.fleet)
        {
            Ok(None) => Ok(()),
            Ok(Some(at_ms)) => Err(Status::permission_denied(format!(
                "instance {} already joined with its identity document at {}; a document is \
                 accepted once (the minion rejoins with its certificate; `gru minion forget {}` \
                 allows a deliberate re-join)",
                req.instance_id,
                jiff::Timestamp::from_millisecond(at_ms)
                    .map_or_else(|_| at_ms.to_string(), |t| t.to_string()),
                req.instance_id
            ))),
            Err(e) => Err(Status::unavailable(format!(
                "cannot record the join: {}",
                crate::reconcile::error_chain(&e)
            ))),
        }
    }
}

#[tonic::async_trait]
impl MinionService for MinionApi {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let shown = presented(&request)?;
        let req = request.into_inner();
        let ctrl = &self.controller;
        let Some(fleet) = ctrl.fleet(&req.fleet) else {
            return Err(Status::not_found(format!(
                "unknown fleet {:?}; this controller runs {}",
                req.fleet,
                ctrl.fleets()
                    .map(|f| format!("{:?}", f.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let rt = &fleet.runtime;
        if !uri_safe(&req.instance_id) {
            return Err(Status::invalid_argument(format!(
                "instance_id {:?} is not an instance id (letters, digits, '-', '_' and '.')",
                req.instance_id
            )));
        }
        // A certificate shown must be this instance's, whatever else proves it.
        let mine = shown
            .as_ref()
            .is_some_and(|(f, i)| *f == req.fleet && *i == req.instance_id);
        if let Some((f, i)) = shown.as_ref().filter(|_| !mine) {
            return Err(self.refuse_join(
                &req,
                Status::permission_denied(format!(
                    "this connection's certificate is for {}, not {}",
                    minion_uri(f, i),
                    minion_uri(&req.fleet, &req.instance_id)
                )),
            ));
        }
        let by_identity = rt.config.identity.is_some();
        match &req.identity {
            Some(pb::join_request::Identity::JoinToken(_)) if by_identity => {
                return Err(self.refuse_join(
                    &req,
                    Status::permission_denied(format!(
                        "fleet {:?} takes instance identity documents, not the join token",
                        req.fleet
                    )),
                ));
            }
            Some(pb::join_request::Identity::InstanceIdentity(iid)) => {
                if let Err(status) = self.check_identity(fleet, &req, iid).await {
                    return Err(self.refuse_join(&req, status));
                }
            }
            Some(pb::join_request::Identity::JoinToken(t))
                if !ctrl.join_token.is_empty() && token_matches(t, &ctrl.join_token) => {}
            Some(pb::join_request::Identity::JoinToken(_)) => {
                return Err(self.refuse_join(&req, Status::unauthenticated("join token rejected")));
            }
            Some(pb::join_request::Identity::Certificate(_)) if mine => {}
            Some(pb::join_request::Identity::Certificate(_)) => {
                return Err(self.refuse_join(
                    &req,
                    Status::unauthenticated(
                        "a certificate join needs the connection to present this minion's certificate",
                    ),
                ));
            }
            None => return Err(Status::unauthenticated("no identity proof in JoinRequest")),
        }
        if req.csr_pem.is_empty() {
            return Err(Status::invalid_argument(
                "csr_pem is empty: the agent must send a certificate request for its key (an agent older than this controller?)",
            ));
        }
        let engine_address = req.engine_address.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "engine_address {:?} is not an address like 10.0.0.5:2575",
                req.engine_address
            ))
        })?;
        let metrics_address = match req.metrics_address.as_str() {
            "" => None,
            a => Some(a.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "metrics_address {a:?} is not an address like 10.0.0.5:9465"
                ))
            })?),
        };
        let instance = InstanceId(req.instance_id.clone());
        // An identity join checked the group already (check_identity).
        let checked = matches!(
            req.identity,
            Some(pb::join_request::Identity::InstanceIdentity(_))
        );
        let known = fleet.registry().minion_by_instance(&instance).is_some();
        if !known && !checked {
            let group =
                rt.group.describe().await.map_err(|e| {
                    Status::unavailable(format!("cannot check the fleet's group: {e}"))
                })?;
            if !group.instances.iter().any(|i| i.id == instance) {
                return Err(Status::failed_precondition(format!(
                    "instance {instance} is not in fleet {:?}'s group",
                    req.fleet
                )));
            }
        }
        let certificate = self
            .ca
            .issue_minion(
                &req.csr_pem,
                &req.fleet,
                &req.instance_id,
                ctrl.config.minion_ca.lifetime,
            )
            .map_err(Status::invalid_argument)?;
        if matches!(
            req.identity,
            Some(pb::join_request::Identity::InstanceIdentity(_))
        ) {
            self.claim_identity(&req)
                .map_err(|status| self.refuse_join(&req, status))?;
        }
        let (minion_id, session_token) = {
            let mut reg = fleet.registry();
            let joined = reg
                .join(&req.fleet, &instance, engine_address, crate::now())
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            if let Some(m) = reg.minion_mut(&joined.0) {
                m.metrics_address = metrics_address;
            }
            joined
        };
        fleet.wake();
        Ok(Response::new(pb::JoinResponse {
            minion_id,
            session_token,
            settings: Some(pb::Settings {
                report_interval_ms: ctrl.config.report_interval.as_millis() as u32,
            }),
            certificate: Some(certificate_to_pb(certificate)),
        }))
    }

    type SessionStream = CommandStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let Some((cert_fleet, cert_instance)) = presented(&request)? else {
            return Err(Status::unauthenticated(
                "a Session needs the minion's certificate from Join on its connection",
            ));
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no SessionHello within 10s"))??;
        let hello = match first.and_then(|m| m.body) {
            Some(pb::session_message::Body::Hello(h)) => h,
            Some(pb::session_message::Body::Report(_) | pb::session_message::Body::Renew(_)) => {
                return Err(Status::failed_precondition(
                    "out of order: the first Session message must be a SessionHello",
                ));
            }
            None => return Err(Status::invalid_argument("empty Session message")),
        };
        let ctrl = self.controller.clone();
        // The minion's fleet, found once: from here on the Session's
        // reports touch that fleet's state only.
        let Some(fleet) = ctrl.fleet_of(&hello.minion_id).cloned() else {
            return Err(Status::not_found(format!(
                "no minion {:?}; join first",
                hello.minion_id
            )));
        };
        let owner = fleet
            .registry()
            .find(&hello.minion_id)
            .map(|m| (m.fleet.clone(), m.instance.0.clone()));
        if owner.as_ref() != Some(&(cert_fleet.clone(), cert_instance.clone())) {
            let why = format!(
                "this connection's certificate is for {}, not minion {:?}",
                minion_uri(&cert_fleet, &cert_instance),
                hello.minion_id
            );
            tracing::warn!(minion = %hello.minion_id, "Session refused: {why}");
            return Err(Status::permission_denied(why));
        }
        let (tx, rx) = mpsc::channel(SESSION_COMMAND_BUFFER);
        let attached = fleet.registry().attach_session(
            &hello.minion_id,
            &hello.session_token,
            tx.clone(),
            ctrl.config.drain_deadline,
            crate::now(),
        );
        let (generation, resend) = match attached {
            Ok(a) => a,
            Err(SessionRefusal::UnknownMinion) => {
                return Err(Status::not_found(format!(
                    "no minion {:?}; join first",
                    hello.minion_id
                )));
            }
            Err(SessionRefusal::BadToken) => {
                return Err(Status::unauthenticated(
                    "session token does not match the last Join",
                ));
            }
            Err(SessionRefusal::Retired(state)) => {
                return Err(Status::failed_precondition(format!(
                    "minion {} is {state}; it takes no new session",
                    hello.minion_id
                )));
            }
        };
        if let Some(cmd) = resend {
            let _ = tx.try_send(Ok(cmd));
        }
        let id: Arc<str> = hello.minion_id.into();
        let ca = self.ca.clone();
        let lifetime = ctrl.config.minion_ca.lifetime;
        let span = tracing::info_span!("session", minion = %id);
        let reader = async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::SessionMessage {
                        body: Some(pb::session_message::Body::Report(r)),
                    })) => {
                        let sent_at = r.sent_at_unix_us;
                        fleet.report(&id, generation, from_pb(r), crate::now(), sent_at);
                    }
                    Ok(Some(pb::SessionMessage {
                        body: Some(pb::session_message::Body::Renew(r)),
                    })) => {
                        match ca.issue_minion(&r.csr_pem, &cert_fleet, &cert_instance, lifetime) {
                            Ok(c) => {
                                tracing::info!(minion = %id, not_after_unix = c.not_after_unix, "minion certificate renewed");
                                let _ = tx.send(Ok(Command::Certificate(c))).await;
                            }
                            Err(why) => {
                                let _ = tx.send(Err(Status::invalid_argument(why))).await;
                                break;
                            }
                        }
                    }
                    Ok(Some(pb::SessionMessage {
                        body: Some(pb::session_message::Body::Hello(_)),
                    })) => {
                        let _ = tx
                            .send(Err(Status::failed_precondition(
                                "out of order: SessionHello sent twice in one Session",
                            )))
                            .await;
                        break;
                    }
                    Ok(Some(pb::SessionMessage { body: None })) => {
                        let _ = tx
                            .send(Err(Status::invalid_argument("empty Session message")))
                            .await;
                        break;
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(minion = %id, error = %status, "session ended");
                        break;
                    }
                }
            }
            fleet.registry().detach_session(&id, generation);
        };
        tokio::spawn(tracing::Instrument::instrument(reader, span));
        let stream = ReceiverStream::new(rx).map(|r| r.map(to_pb));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }
}
