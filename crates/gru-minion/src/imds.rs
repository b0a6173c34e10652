//! A small client for the EC2 instance metadata service, IMDSv2 only.
//!
//! Every read first holds a session token from `PUT /latest/api/token`
//! (with its TTL header) and sends it with each `GET`; a request without a
//! token (IMDSv1) is never made, so the client works on instances launched
//! with `HttpTokens: required`. Start at [`Imds::identity`] for what the
//! agent needs to know about itself, and at [`wait_until_in_service`] for
//! warm pools: an instance launched into a warm pool (`Warmed:*`) prepares
//! its engine but joins as capacity only once its target lifecycle state is
//! `InService`.
//!
//! Plain HTTP/1.1 over a fresh connection per request (hyper): the service
//! is link-local, answers in microseconds, and is read a handful of times
//! per boot. The proxy environment variables are deliberately ignored: a
//! proxy must never see the metadata token.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// The instance metadata service's address on every EC2 instance.
pub const DEFAULT_ENDPOINT: &str = "169.254.169.254:80";
/// How long a session token lives (the service allows 1 s to 6 h).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(6 * 60 * 60);
/// A token is renewed this long before it expires, so no request races the
/// expiry.
pub const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(60);
/// Limit on one request, connection included: the service is link-local.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often [`wait_until_in_service`] asks again while the instance waits
/// in a warm pool.
pub const DEFAULT_WARM_POLL: Duration = Duration::from_secs(5);

const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Bodies larger than this are refused (the identity document is < 1 KiB).
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("cannot connect to the instance metadata service at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("instance metadata request {method} {path} failed")]
    Http {
        method: &'static str,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("instance metadata request {method} {path} timed out after {timeout:?}")]
    Timeout {
        method: &'static str,
        path: String,
        timeout: Duration,
    },
    #[error("instance metadata {path} answered {status}")]
    Status { path: String, status: StatusCode },
    #[error("instance metadata {path} is not what was expected: {message}")]
    Invalid { path: String, message: String },
    #[error("invalid instance metadata request for {path}")]
    Request {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
}

/// What the agent needs to know about the instance it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceIdentity {
    /// `i-…`: the id the capacity group and the controller know it by.
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    /// The address the load balancer reaches the engine on.
    pub private_ip: IpAddr,
}

/// The identity document and its PKCS#7 signature, as the service returns
/// them; the controller verifies the signature (AWS's public certificate)
/// and checks the instance against the fleet's group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedIdentityDocument {
    /// The document's JSON, byte for byte as served (the signature covers it).
    pub document: String,
    /// `/signature`: base64 RSA-SHA256 over the document.
    pub signature: String,
}

/// `autoscaling/target-lifecycle-state`: the state the Auto Scaling group is
/// moving this instance to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetLifecycleState {
    /// Serving capacity: join.
    InService,
    /// In the warm pool: prepare the engine, do not join as capacity.
    Warmed(WarmedState),
    /// Being terminated: never join.
    Terminated,
    /// The instance is not in an Auto Scaling group (the path answers 404),
    /// e.g. a hand-launched minion: join as usual.
    NotInGroup,
    /// A state this version does not know. Treated as "not yet": joining a
    /// warm instance as capacity would be the worse mistake.
    Unknown(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarmedState {
    Stopped,
    Running,
    Hibernated,
}

impl TargetLifecycleState {
    pub fn parse(s: &str) -> TargetLifecycleState {
        match s.trim() {
            "InService" => TargetLifecycleState::InService,
            "Terminated" => TargetLifecycleState::Terminated,
            "Warmed:Stopped" => TargetLifecycleState::Warmed(WarmedState::Stopped),
            "Warmed:Running" => TargetLifecycleState::Warmed(WarmedState::Running),
            "Warmed:Hibernated" => TargetLifecycleState::Warmed(WarmedState::Hibernated),
            other => TargetLifecycleState::Unknown(other.to_owned()),
        }
    }

    /// Whether a minion in this state may join its fleet as capacity.
    pub fn may_join(&self) -> bool {
        matches!(
            self,
            TargetLifecycleState::InService | TargetLifecycleState::NotInGroup
        )
    }
}

impl std::fmt::Display for TargetLifecycleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetLifecycleState::InService => f.write_str("InService"),
            TargetLifecycleState::Warmed(w) => write!(f, "Warmed:{w:?}"),
            TargetLifecycleState::Terminated => f.write_str("Terminated"),
            TargetLifecycleState::NotInGroup => f.write_str("not in an Auto Scaling group"),
            TargetLifecycleState::Unknown(s) => write!(f, "unknown ({s:?})"),
        }
    }
}

struct Token {
    value: String,
    renew_at: Instant,
}

/// An IMDSv2 client. Cheap to share behind an `Arc`; the session token is
/// cached and renewed before it expires, or at once when the service
/// answers 401.
pub struct Imds {
    endpoint: String,
    token_ttl: Duration,
    timeout: Duration,
    token: Mutex<Option<Token>>,
}

impl Default for Imds {
    fn default() -> Self {
        Imds::new(DEFAULT_ENDPOINT)
    }
}

impl Imds {
    /// A client for the service at `endpoint` (`host:port`; tests pass a
    /// stub's loopback address).
    pub fn new(endpoint: impl Into<String>) -> Imds {
        Imds {
            endpoint: endpoint.into(),
            token_ttl: DEFAULT_TOKEN_TTL,
            timeout: DEFAULT_REQUEST_TIMEOUT,
            token: Mutex::new(None),
        }
    }

    /// Token lifetime to ask for; at least one second more than
    /// [`TOKEN_RENEW_MARGIN`] is sensible, shorter ones are renewed on
    /// every read.
    pub fn with_token_ttl(mut self, ttl: Duration) -> Imds {
        self.token_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Imds {
        self.timeout = timeout;
        self
    }

    /// Instance id, region, availability zone and private IP.
    pub async fn identity(&self) -> Result<InstanceIdentity, ImdsError> {
        let instance_id = self.get("/latest/meta-data/instance-id").await?;
        let region = self.get("/latest/meta-data/placement/region").await?;
        let availability_zone = self
            .get("/latest/meta-data/placement/availability-zone")
            .await?;
        let path = "/latest/meta-data/local-ipv4";
        let ip = self.get(path).await?;
        let private_ip = ip.parse().map_err(|_| ImdsError::Invalid {
            path: path.to_owned(),
            message: format!("{ip:?} is not an IP address"),
        })?;
        for (path, value) in [
            ("/latest/meta-data/instance-id", &instance_id),
            ("/latest/meta-data/placement/region", &region),
            (
                "/latest/meta-data/placement/availability-zone",
                &availability_zone,
            ),
        ] {
            if value.is_empty() {
                return Err(ImdsError::Invalid {
                    path: path.to_owned(),
                    message: "empty".to_owned(),
                });
            }
        }
        Ok(InstanceIdentity {
            instance_id,
            region,
            availability_zone,
            private_ip,
        })
    }

    /// The signed instance identity document (for the controller to verify).
    pub async fn signed_identity_document(&self) -> Result<SignedIdentityDocument, ImdsError> {
        Ok(SignedIdentityDocument {
            document: self
                .get("/latest/dynamic/instance-identity/document")
                .await?,
            signature: self
                .get("/latest/dynamic/instance-identity/signature")
                .await?,
        })
    }

    /// Where the Auto Scaling group is moving this instance.
    pub async fn target_lifecycle_state(&self) -> Result<TargetLifecycleState, ImdsError> {
        let path = "/latest/meta-data/autoscaling/target-lifecycle-state";
        match self.get_optional(path).await? {
            Some(s) => Ok(TargetLifecycleState::parse(&s)),
            None => Ok(TargetLifecycleState::NotInGroup),
        }
    }

    /// `GET path`, insisting on 200.
    pub async fn get(&self, path: &str) -> Result<String, ImdsError> {
        self.get_optional(path).await?.ok_or(ImdsError::Status {
            path: path.to_owned(),
            status: StatusCode::NOT_FOUND,
        })
    }

    /// `GET path`; `None` when the service answers 404 (a category this
    /// instance does not have).
    pub async fn get_optional(&self, path: &str) -> Result<Option<String>, ImdsError> {
        let mut renewed = false;
        loop {
            let token = self.token(renewed).await?;
            let (status, body) = self.request(Method::GET, path, Some(&token)).await?;
            match status {
                StatusCode::OK => return Ok(Some(body)),
                StatusCode::NOT_FOUND => return Ok(None),
                // The token expired or the service restarted: one fresh
                // token, then give up.
                StatusCode::UNAUTHORIZED if !renewed => {
                    renewed = true;
                    continue;
                }
                status => {
                    return Err(ImdsError::Status {
                        path: path.to_owned(),
                        status,
                    });
                }
            }
        }
    }

    async fn token(&self, force_renew: bool) -> Result<String, ImdsError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && !force_renew
            && Instant::now() < t.renew_at
        {
            return Ok(t.value.clone());
        }
        let asked_at = Instant::now();
        let (status, body) = self.request(Method::PUT, TOKEN_PATH, None).await?;
        if status != StatusCode::OK {
            return Err(ImdsError::Status {
                path: TOKEN_PATH.to_owned(),
                status,
            });
        }
        let value = body.trim().to_owned();
        if value.is_empty() {
            return Err(ImdsError::Invalid {
                path: TOKEN_PATH.to_owned(),
                message: "empty token".to_owned(),
            });
        }
        let renew_at = asked_at + self.token_ttl.saturating_sub(TOKEN_RENEW_MARGIN);
        *cached = Some(Token {
            value: value.clone(),
            renew_at,
        });
        Ok(value)
    }

    /// One request on a fresh connection. `token` is `None` only for the
    /// token PUT itself.
    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<(StatusCode, String), ImdsError> {
        let method_name = if method == Method::PUT { "PUT" } else { "GET" };
        let work = async {
            let stream =
                TcpStream::connect(&self.endpoint)
                    .await
                    .map_err(|source| ImdsError::Connect {
                        endpoint: self.endpoint.clone(),
                        source,
                    })?;
            let _ = stream.set_nodelay(true);
            let http = |source| ImdsError::Http {
                method: method_name,
                path: path.to_owned(),
                source,
            };
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(http)?;
            let conn = tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, &self.endpoint);
            req = match token {
                Some(t) => req.header(TOKEN_HEADER, t),
                None => req.header(TTL_HEADER, self.token_ttl.as_secs().to_string()),
            };
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|source| ImdsError::Request {
                    path: path.to_owned(),
                    source,
                })?;
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ImdsError::Invalid {
                    path: path.to_owned(),
                    message: format!("cannot read the body: {e}"),
                })?
                .to_bytes();
            conn.abort();
            let body = String::from_utf8(body.to_vec()).map_err(|_| ImdsError::Invalid {
                path: path.to_owned(),
                message: "body is not UTF-8".to_owned(),
            })?;
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ImdsError::Timeout {
                method: method_name,
                path: path.to_owned(),
                timeout: self.timeout,
            })?
    }
}

/// Waits, asking every `poll`, until this instance may join its fleet as
/// capacity (`InService`, or not in an Auto Scaling group) and returns that
/// state. Meant to run after the engine has started and before the agent
/// joins: a minion launched into a warm pool is ready the moment it is put
/// in service. A failed read is logged and asked again; `Terminated` ends
/// the wait with [`NeverInService`].
pub async fn wait_until_in_service(
    imds: &Imds,
    poll: Duration,
) -> Result<TargetLifecycleState, NeverInService> {
    let mut last: Option<TargetLifecycleState> = None;
    loop {
        match imds.target_lifecycle_state().await {
            Ok(state) if state.may_join() => return Ok(state),
            Ok(TargetLifecycleState::Terminated) => return Err(NeverInService),
            Ok(state) => {
                if last.as_ref() != Some(&state) {
                    tracing::info!(state = %state, "waiting in the warm pool: not joining as capacity yet");
                    last = Some(state);
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot read the target lifecycle state");
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// The Auto Scaling group is terminating this instance; it must not join.
#[derive(Debug, thiserror::Error)]
#[error("the instance is being terminated (target lifecycle state Terminated)")]
pub struct NeverInService;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_states() {
        use TargetLifecycleState as S;
        assert_eq!(S::parse("InService"), S::InService);
        assert_eq!(
            S::parse("Warmed:Stopped\n"),
            S::Warmed(WarmedState::Stopped)
        );
        assert_eq!(S::parse("Warmed:Running"), S::Warmed(WarmedState::Running));
        assert_eq!(
            S::parse("Warmed:Hibernated"),
            S::Warmed(WarmedState::Hibernated)
        );
        assert_eq!(S::parse("Terminated"), S::Terminated);
        assert_eq!(S::parse("Pending"), S::Unknown("Pending".to_owned()));
        assert!(S::InService.may_join());
        assert!(S::NotInGroup.may_join());
        assert!(!S::Warmed(WarmedState::Running).may_join());
        assert!(!S::Terminated.may_join());
        assert!(!S::Unknown("x".to_owned()).may_join());
    }
}
