//! The small plain-HTTP listener the controller and the minion agent serve
//! their Prometheus metrics on (`/metrics`), with a liveness answer
//! (`/healthz`) and whatever else the process adds (the controller's
//! `/sd/minions`).
//!
//! It is deliberately minimal: GET only, HTTP/1.1, a bound on connections
//! and on how long a client may take to send its request, so a slow or
//! hostile scraper cannot hold the process's file descriptors.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// At most this many scrape connections at once; more wait in the
/// listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The Content-Type of the OpenMetrics text format, for scrapers that ask
/// for it; others get Prometheus's text format 0.0.4.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A reply from a route: content type and body.
pub struct Reply {
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn json(body: String) -> Reply {
        Reply {
            content_type: "application/json",
            body,
        }
    }
}

/// Extra GET routes beside `/metrics` and `/healthz`: path → reply.
pub type Route = Box<dyn Fn() -> Reply + Send + Sync>;

/// What the listener serves.
pub struct Site {
    registry: Registry,
    routes: Vec<(&'static str, Route)>,
}

impl Site {
    pub fn new(registry: Registry) -> Site {
        Site {
            registry,
            routes: Vec::new(),
        }
    }

    /// Serves `reply()` at `path` (GET).
    pub fn route(mut self, path: &'static str, reply: Route) -> Site {
        self.routes.push((path, reply));
        self
    }

    /// The metrics, in OpenMetrics when `openmetrics`, else Prometheus's
    /// text format.
    pub fn encode(&self, openmetrics: bool) -> Reply {
        let mut body = String::new();
        let (content_type, r) = if openmetrics {
            (
                OPENMETRICS,
                prometheus_client::encoding::text::encode(&mut body, &self.registry),
            )
        } else {
            (
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::encode(&mut body, &self.registry),
            )
        };
        if let Err(e) = r {
            // Writing to a String fails only if a collector reports an
            // error; serve what was written and say so.
            tracing::warn!(error = %e, "encoding metrics failed part-way");
        }
        Reply { content_type, body }
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        let reply = match req.uri().path() {
            "/metrics" => {
                let openmetrics = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                self.encode(openmetrics)
            }
            "/healthz" => Reply {
                content_type: "text/plain; charset=utf-8",
                body: "ok\n".to_owned(),
            },
            path => match self.routes.iter().find(|(p, _)| *p == path) {
                Some((_, route)) => route(),
                None => return plain(StatusCode::NOT_FOUND, "not found\n"),
            },
        };
        Response::builder()
            .header(header::CONTENT_TYPE, reply.content_type)
            .body(Full::new(Bytes::from(reply.body)))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "error\n"))
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Serves `site` on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, site: Site, shutdown: impl Future<Output = ()>) {
    let site = Arc::new(site);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = &mut shutdown => return,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let site = site.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let reply = site.answer(&req);
                async move { Ok::<_, Infallible>(reply) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
}

/// Registers `gru_build_info{component, version} 1`.
pub fn register_build_info(registry: &mut Registry, component: &'static str) {
    let info = Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels {
        component,
        version: env!("CARGO_PKG_VERSION"),
    })
    .set(1);
    registry.register("gru_build_info", "Which gru is running (always 1)", info);
}
