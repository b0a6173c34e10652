//! `gru.v1.AdminService`, the operator's API. Every call needs a client
//! certificate signed by the controller's CA (checked by
//! [`require_client_certificate`]) and the role [`crate::access::CALLS`]
//! names for it, which the config's `[access]` rules give the certificate
//! (checked first in each call, by [`AdminApi::authorize`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use gru_core::MinionState;
use gru_proto::v1 as pb;
use pb::admin_service_server::AdminService;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::access::{self, Caller, Subject};
use crate::reconcile::{Controller, Fleet, RegistryGuard};
use crate::registry::{Event, MinionRecord, PinOverride, RECENT_EVENTS, Registry, summary};
use crate::store::Origin;

/// The most events one `gru events --since` answers with (the newest).
pub const EVENTS_SINCE_LIMIT: usize = 100_000;
use gru_core::policy::PinStatus;

pub struct AdminApi {
    pub controller: Arc<Controller>,
}

/// Interceptor: refuses admin calls without a verified client certificate.
/// The TLS layer has already checked the certificate against the CA; here we
/// only insist that there was one.
#[allow(clippy::result_large_err)]
pub fn require_client_certificate(req: Request<()>) -> Result<Request<()>, Status> {
    match req.peer_certs() {
        Some(certs) if !certs.is_empty() => Ok(req),
        _ => Err(Status::unauthenticated(
            "admin calls need a client certificate signed by the controller's CA",
        )),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn minion_to_pb(m: &MinionRecord, now: Instant) -> pb::Minion {
    let r = m.last_report.unwrap_or_default();
    pb::Minion {
        id: m.id.clone(),
        fleet: m.fleet.clone(),
        instance_id: m.instance.0.clone(),
        state: m.state().as_str().to_owned(),
        engine_address: m.engine_address.map(|a| a.to_string()).unwrap_or_default(),
        queue_depth: r.queue_depth,
        in_flight: r.in_flight,
        processed_total: r.processed_total,
        failed_total: r.failed_total,
        open_connections: r.open_connections,
        last_report_age_ms: m
            .last_report_at
            .map(|t| now.saturating_duration_since(t).as_millis() as u64),
        state_age_ms: now.saturating_duration_since(m.state_since).as_millis() as u64,
        history: m
            .history
            .iter()
            .map(|h| pb::Transition {
                from: h.from.as_str().to_owned(),
                to: h.to.as_str().to_owned(),
                at_unix_ms: unix_ms(h.at),
                reason: h.reason.clone(),
            })
            .collect(),
        lb_connections_at_deregistration: m.lb_connections_at_deregistration,
        lb_connections_at_drain_start: m.lb_connections_at_drain_start,
        drain_reason: m
            .drain
            .as_ref()
            .map(|d| d.reason.clone())
            .unwrap_or_default(),
    }
}

fn fleet_to_pb(reg: &Registry, name: &str, provider: &str) -> Option<pb::Fleet> {
    let f = reg.fleet_state(name)?;
    let bounds = f.config.bounds();
    let mut fleet = pb::Fleet {
        name: name.to_owned(),
        provider: provider.to_owned(),
        min: bounds.min,
        max: bounds.max,
        paused: f.paused.is_some(),
        pinned: f.pin.as_ref().map(|p| p.pin.desired),
        pinned_until_unix_ms: f
            .pin
            .as_ref()
            .and_then(|p| p.pin.until)
            .map(|t| t.as_millisecond().max(0) as u64),
        paused_by: f.paused.as_ref().map(|o| o.by.clone()).unwrap_or_default(),
        paused_at_unix_ms: f.paused.as_ref().map(|o| o.at_ms.max(0) as u64),
        pinned_by: f
            .pin
            .as_ref()
            .map(|p| p.origin.by.clone())
            .unwrap_or_default(),
        group_desired: f.group.as_ref().map_or(0, |g| g.desired),
        ..Default::default()
    };
    match &f.last_decision {
        Some(d) => {
            fleet.desired = d.desired;
            fleet.reason = summary(&d.explanation);
            fleet.active_window = d
                .explanation
                .window
                .as_ref()
                .map(|w| w.name.clone())
                .unwrap_or_default();
        }
        None => fleet.reason = "no decision yet".to_owned(),
    }
    let p = reg.picture(name, crate::now());
    fleet.capacity = p.capacity as u32;
    fleet.queue_depth = p.queued;
    fleet.in_flight = p.in_flight;
    fleet.in_service = p.in_state("in_service") as u32;
    fleet.draining =
        (p.in_state("draining") + p.in_state("drained") + p.in_state("terminating")) as u32;
    Some(fleet)
}

fn decision_to_pb(fleet: &str, e: &gru_core::policy::Explanation) -> pb::Decision {
    let source = e.source_name();
    let pin = match e.pin {
        PinStatus::None => "none".to_owned(),
        PinStatus::Active(p) => format!("active: {}", p.desired),
        PinStatus::Expired(p) => format!("expired: {}", p.desired),
    };
    pb::Decision {
        fleet: fleet.to_owned(),
        at_unix_ms: e.at.as_millisecond().max(0) as u64,
        desired: e.desired,
        capacity: e.capacity,
        applied: e.applied,
        summary: summary(e),
        text: e.to_string(),
        minions_reporting: e.load.minions,
        queued: e.load.queued,
        in_flight: e.load.in_flight,
        rate_per_s: e.load.rate_per_s,
        active_window: e
            .window
            .as_ref()
            .map(|w| w.name.clone())
            .unwrap_or_default(),
        paused: e.paused,
        pin,
        recommendations: e
            .recommendations
            .iter()
            .map(|r| pb::Recommendation {
                rule: r.rule.clone(),
                desired: r.desired,
                detail: r.detail.clone(),
            })
            .collect(),
        source,
        target: e.target,
        clips: e
            .clips
            .iter()
            .map(|c| pb::ClipStep {
                kind: c.kind.as_str().to_owned(),
                before: c.before,
                after: c.after,
                detail: c.detail.clone(),
            })
            .collect(),
    }
}

fn event_to_pb(e: &Event) -> pb::Event {
    let (from, to) = e
        .transition
        .map(|(f, t)| (f.as_str().to_owned(), t.as_str().to_owned()))
        .unwrap_or_default();
    pb::Event {
        at_unix_ms: unix_ms(e.at),
        fleet: e.fleet.clone(),
        minion_id: e.minion.clone().unwrap_or_default(),
        kind: e.kind.as_str().to_owned(),
        message: e.message.clone(),
        from,
        to,
        actor: e.actor.clone().unwrap_or_default(),
    }
}

impl AdminApi {
    #[allow(clippy::result_large_err)]
    fn fleet(&self, name: &str) -> Result<pb::Fleet, Status> {
        let f = self
            .controller
            .fleet(name)
            .ok_or_else(|| self.unknown_fleet(name))?;
        let provider = f.runtime.config.provider.name();
        fleet_to_pb(&f.registry(), name, provider).ok_or_else(|| self.unknown_fleet(name))
    }

    /// The registry of fleet `name`, or the error that names the fleets.
    #[allow(clippy::result_large_err)]
    fn registry_of(&self, name: &str) -> Result<RegistryGuard<'_>, Status> {
        self.controller
            .fleet(name)
            .map(|f| f.registry())
            .ok_or_else(|| self.unknown_fleet(name))
    }

    /// The fleet of minion `id` (an id or an instance id).
    #[allow(clippy::result_large_err)]
    fn fleet_of(&self, id: &str) -> Result<&Fleet, Status> {
        self.controller
            .fleet_of(id)
            .map(|f| f.as_ref())
            .ok_or_else(|| Status::not_found(format!("no minion {id:?}")))
    }

    fn unknown_fleet(&self, name: &str) -> Status {
        let known: Vec<_> = self
            .controller
            .fleets()
            .map(|f| format!("{:?}", f.name()))
            .collect();
        Status::not_found(format!("no fleet {name:?}; fleets: {}", known.join(", ")))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_fleets(
        &self,
        request: Request<pb::ListFleetsRequest>,
    ) -> Result<Response<pb::ListFleetsResponse>, Status> {
        self.authorize(&request, "ListFleets")?;
        let names: Vec<String> = self
            .controller
            .fleets()
            .map(|f| f.name().to_owned())
            .collect();
        let fleets = names
            .iter()
            .map(|n| self.fleet(n))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListFleetsResponse { fleets }))
    }

    async fn list_minions(
        &self,
        request: Request<pb::ListMinionsRequest>,
    ) -> Result<Response<pb::ListMinionsResponse>, Status> {
        self.authorize(&request, "ListMinions")?;
        let req = request.into_inner();
        if !req.fleet.is_empty() && self.controller.fleet(&req.fleet).is_none() {
            return Err(self.unknown_fleet(&req.fleet));
        }
        let now = crate::now();
        let mut listed = Vec::new();
        // One fleet at a time, each under its own lock.
        for f in self
            .controller
            .fleets()
            .filter(|f| req.fleet.is_empty() || f.name() == req.fleet)
        {
            let reg = f.registry();
            let mut minions: Vec<&MinionRecord> = reg
                .minions()
                .filter(|m| req.include_gone || m.state() != MinionState::Gone)
                .collect();
            minions.sort_by_key(|m| m.created);
            listed.extend(minions.into_iter().map(|m| minion_to_pb(m, now)));
        }
        Ok(Response::new(pb::ListMinionsResponse { minions: listed }))
    }

    async fn get_minion(
        &self,
        request: Request<pb::GetMinionRequest>,
    ) -> Result<Response<pb::Minion>, Status> {
        self.authorize(&request, "GetMinion")?;
        let id = request.into_inner().id;
        let reg = self.fleet_of(&id)?.registry();
        let m = reg
            .find(&id)
            .ok_or_else(|| Status::not_found(format!("no minion {id:?}")))?;
        Ok(Response::new(minion_to_pb(m, crate::now())))
    }

    async fn scale(
        &self,
        request: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        let actor = self.authorize(&request, "Scale")?.identity;
        let req = request.into_inner();
        {
            let mut reg = self.registry_of(&req.fleet)?;
            let now_ms = unix_ms(SystemTime::now()) as i64;
            let f = reg
                .fleet_state_mut(&req.fleet)
                .ok_or_else(|| self.unknown_fleet(&req.fleet))?;
            let origin = Origin {
                by: actor.clone(),
                at_ms: now_ms,
            };
            let message = match req.target {
                Some(pb::scale_request::Target::Desired(n)) => {
                    let b = f.config.bounds();
                    if n < b.min || n > b.max {
                        return Err(Status::invalid_argument(format!(
                            "fleet {:?} allows {}..={} minions, not {n}",
                            req.fleet, b.min, b.max
                        )));
                    }
                    let until = match req.until_unix_ms {
                        None => None,
                        Some(ms) => {
                            Some(jiff::Timestamp::from_millisecond(ms as i64).map_err(|_| {
                                Status::invalid_argument(format!(
                                    "until_unix_ms {ms} is not a time"
                                ))
                            })?)
                        }
                    };
                    if let Some(t) = until
                        && t.as_millisecond() <= now_ms
                    {
                        return Err(Status::invalid_argument(format!(
                            "the pin would end at {t}, which is not in the future"
                        )));
                    }
                    f.pin = Some(PinOverride {
                        pin: gru_core::policy::Pin { desired: n, until },
                        origin,
                    });
                    match until {
                        Some(t) => format!("pinned at {n} until {t}"),
                        None => format!("pinned at {n}"),
                    }
                }
                Some(pb::scale_request::Target::Auto(_)) => {
                    f.pin = None;
                    "pin released: sized by the policy again".to_owned()
                }
                None => {
                    return Err(Status::invalid_argument(
                        "ScaleRequest needs desired or auto",
                    ));
                }
            };
            reg.persist_fleet(&req.fleet);
            reg.emit_admin(&req.fleet, None, &actor, message);
        }
        self.controller.wake(&req.fleet);
        Ok(Response::new(self.fleet(&req.fleet)?))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::Minion>, Status> {
        let actor = self.authorize(&request, "Drain")?.identity;
        let req = request.into_inner();
        let owner = self.fleet_of(&req.id)?;
        let fleet = {
            let mut reg = owner.registry();
            let m = reg
                .find(&req.id)
                .ok_or_else(|| Status::not_found(format!("no minion {:?}", req.id)))?;
            let (id, fleet, state) = (m.id.clone(), m.fleet.clone(), m.state());
            if !state.counts_as_capacity()
                && !state.is_draining()
                && state != MinionState::Unhealthy
            {
                return Err(Status::failed_precondition(format!(
                    "minion {id} is {state}; nothing to drain"
                )));
            }
            let reason = if req.replace {
                "drained by an operator, to be replaced"
            } else {
                "drained by an operator"
            };
            reg.choose_for_drain(&id, !req.replace, reason, crate::now())
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            reg.emit_admin(&fleet, Some(&id), &actor, format!("drain asked: {reason}"));
            fleet
        };
        self.controller.wake(&fleet);
        let reg = owner.registry();
        let m = reg
            .find(&req.id)
            .ok_or_else(|| Status::not_found(format!("no minion {:?}", req.id)))?;
        Ok(Response::new(minion_to_pb(m, crate::now())))
    }

    async fn pause(
        &self,
        request: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        let actor = self.authorize(&request, "Pause")?.identity;
        let name = request.into_inner().fleet;
        self.set_paused(&name, true, &actor)?;
        Ok(Response::new(self.fleet(&name)?))
    }

    async fn resume(
        &self,
        request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        let actor = self.authorize(&request, "Resume")?.identity;
        let name = request.into_inner().fleet;
        self.set_paused(&name, false, &actor)?;
        Ok(Response::new(self.fleet(&name)?))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::Decision>, Status> {
        self.authorize(&request, "Explain")?;
        let name = request.into_inner().fleet;
        let reg = self.registry_of(&name)?;
        let f = reg
            .fleet_state(&name)
            .ok_or_else(|| self.unknown_fleet(&name))?;
        let d = f.last_decision.as_ref().ok_or_else(|| {
            Status::unavailable(format!(
                "fleet {name:?} has no decision yet; try again in a moment"
            ))
        })?;
        Ok(Response::new(decision_to_pb(&name, &d.explanation)))
    }

    async fn forget_minion(
        &self,
        request: Request<pb::ForgetMinionRequest>,
    ) -> Result<Response<pb::ForgetMinionResponse>, Status> {
        let actor = self.authorize(&request, "ForgetMinion")?.identity;
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "id is empty: a minion or instance id",
            ));
        }
        let known = self.controller.fleet_of(&id).and_then(|f| {
            f.registry()
                .find(&id)
                .map(|m| (m.fleet.clone(), m.id.clone(), m.instance.0.clone()))
        });
        let instance = known.as_ref().map_or(id.clone(), |(_, _, i)| i.clone());
        let fleet = self
            .controller
            .forget_identity_join(&instance)
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot forget {instance}: {}",
                    crate::reconcile::error_chain(&e)
                ))
            })?;
        let fleet_name = fleet
            .as_deref()
            .or(known.as_ref().map(|(f, _, _)| f.as_str()));
        if let Some(f) = fleet_name.and_then(|n| self.controller.fleet(n)) {
            f.registry().emit_admin(
                f.name(),
                known.as_ref().map(|(_, m, _)| m.as_str()),
                &actor,
                format!(
                    "forgot the identity join of {instance}: it may join with its identity document again"
                ),
            );
        }
        Ok(Response::new(pb::ForgetMinionResponse {
            instance_id: instance,
            forgotten: fleet.is_some(),
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        Ok(Response::new(who_am_i(self.caller(&request)?)))
    }

    async fn controller_status(
        &self,
        request: Request<pb::ControllerStatusRequest>,
    ) -> Result<Response<pb::ControllerStatusResponse>, Status> {
        self.authorize(&request, "ControllerStatus")?;
        Ok(Response::new(self.controller.leadership().into()))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.authorize(&request, "WatchEvents")?;
        let req = request.into_inner();
        if !req.fleet.is_empty() && self.controller.fleet(&req.fleet).is_none() {
            return Err(self.unknown_fleet(&req.fleet));
        }
        // Subscribe before copying the backlog so nothing falls in between.
        let live = self.controller.events.subscribe();
        let since = req.since_unix_ms.map_or(UNIX_EPOCH, |ms| {
            UNIX_EPOCH + std::time::Duration::from_millis(ms)
        });
        let limit = if req.since_unix_ms.is_some() {
            EVENTS_SINCE_LIMIT
        } else {
            RECENT_EVENTS
        };
        let backlog: Vec<pb::Event> = self
            .controller
            .events_since(since, &req.fleet, limit)
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot read the event log: {}",
                    gru_core::error_chain(&e)
                ))
            })?
            .iter()
            .map(event_to_pb)
            .collect();
        let head = futures::stream::iter(backlog.into_iter().map(Ok));
        if !req.follow {
            return Ok(Response::new(Box::pin(head)));
        }
        let fleet = req.fleet;
        let tail = futures::stream::unfold(live, move |mut live| {
            let fleet = fleet.clone();
            async move {
                loop {
                    match live.recv().await {
                        Ok(e) if fleet.is_empty() || e.fleet == fleet => {
                            return Some((Ok(event_to_pb(&e)), live));
                        }
                        Ok(_) => continue,
                        Err(RecvError::Lagged(n)) => {
                            let warn = pb::Event {
                                at_unix_ms: unix_ms(SystemTime::now()),
                                kind: "warning".to_owned(),
                                message: format!("{n} events dropped: this watcher fell behind"),
                                ..Default::default()
                            };
                            return Some((Ok(warn), live));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
        });
        let stream: EventStream = Box::pin(futures::StreamExt::chain(head, tail));
        Ok(Response::new(stream))
    }
}

impl AdminApi {
    /// Who is calling (the subject of the client certificate the TLS layer
    /// verified), refused with PermissionDenied unless its role allows
    /// `call`. A refusal is logged, as a warning: who tried what.
    #[allow(clippy::result_large_err)]
    fn authorize<T>(&self, request: &Request<T>, call: &str) -> Result<Caller, Status> {
        let caller = self.caller(request)?;
        caller.may(call).map_err(|why| {
            tracing::warn!(caller = %caller.identity, call, "admin call refused: {why}");
            Status::permission_denied(why)
        })?;
        Ok(caller)
    }

    #[allow(clippy::result_large_err)]
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        caller(request, &self.controller.config.access)
    }

    #[allow(clippy::result_large_err)]
    fn set_paused(&self, name: &str, paused: bool, actor: &str) -> Result<(), Status> {
        let mut reg = self.registry_of(name)?;
        let f = reg
            .fleet_state_mut(name)
            .ok_or_else(|| self.unknown_fleet(name))?;
        if f.paused.is_some() != paused {
            f.paused = paused.then(|| Origin {
                by: actor.to_owned(),
                at_ms: unix_ms(SystemTime::now()) as i64,
            });
            let msg = if paused {
                "paused: decisions are computed and shown, not applied"
            } else {
                "resumed: decisions are applied again"
            };
            reg.persist_fleet(name);
            reg.emit_admin(name, None, actor, msg.to_owned());
        }
        drop(reg);
        self.controller.wake(name);
        Ok(())
    }
}

/// Who made `request`, by its client certificate, under `access`.
#[allow(clippy::result_large_err)]
pub(crate) fn caller<T>(request: &Request<T>, access: &access::Access) -> Result<Caller, Status> {
    let der = request
        .peer_certs()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| {
            Status::unauthenticated(
                "admin calls need a client certificate signed by the controller's CA",
            )
        })?;
    let subject = Subject::from_der(der.as_ref()).map_err(Status::unauthenticated)?;
    Ok(access.caller(&subject))
}

/// The answer to `WhoAmI` for `caller`.
pub(crate) fn who_am_i(caller: Caller) -> pb::WhoAmIResponse {
    pb::WhoAmIResponse {
        identity: caller.identity,
        role: caller.role.map(|r| r.to_string()).unwrap_or_default(),
        because: caller.because,
        allowed: caller
            .role
            .into_iter()
            .flat_map(access::allowed)
            .map(str::to_owned)
            .collect(),
    }
}
