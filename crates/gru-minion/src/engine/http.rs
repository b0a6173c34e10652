//! `kind = "http"`: an engine gru does not ship (Mirth/NextGen Connect,
//! InterSystems IRIS, Rhapsody, …), read and driven over its HTTP API.
//! The queue depth comes from a JSON document or a Prometheus page; drain,
//! after-drained and resume are lists of requests. See `docs/engines.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::Engine;
use super::adapter::{Adapter, Probe, Stage};
use crate::config::{AdapterSection, DepthReader, HttpCall, HttpSection, QueueDepthCall};

/// Largest answer read (a Mirth statistics list for many channels is well
/// below it); more is an error, not a truncated number.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{key}: cannot read {path}")]
    ReadFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("engine.http.ca_file: no usable CA certificate in {path}")]
    Ca {
        path: PathBuf,
        #[source]
        source: Option<rustls::Error>,
    },
    #[error("engine.http.password_file: the password in {path} cannot be sent in a header")]
    Password { path: PathBuf },
    #[error("{key}: {request} failed")]
    Request {
        key: String,
        /// `METHOD url`.
        request: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{key}: {request} took more than {timeout:?}")]
    Timeout {
        key: String,
        request: String,
        timeout: Duration,
    },
    #[error("{key}: {request} answered {status}, expected {expected}")]
    Status {
        key: String,
        request: String,
        status: StatusCode,
        expected: String,
    },
    #[error("{key}: {request}: {problem}")]
    Answer {
        key: String,
        request: String,
        problem: String,
    },
}

/// The engine behind an `[engine.http]` table.
pub struct HttpEngine(Adapter<HttpProbe>);

impl HttpEngine {
    /// Reads the password and CA files, then starts polling.
    pub fn start(section: &AdapterSection<HttpSection>) -> Result<Self, HttpError> {
        let probe = HttpProbe::new(section.adapter.clone(), section.timeout)?;
        Ok(HttpEngine(Adapter::start(
            probe,
            section.advertise,
            section.poll_interval,
        )))
    }

    /// The last failure, as logged; `None` after a good poll.
    pub fn last_error(&self) -> Option<String> {
        self.0.last_error()
    }
}

impl std::fmt::Debug for HttpEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HttpEngine").field(self.0.probe()).finish()
    }
}

#[async_trait]
impl Engine for HttpEngine {
    fn address(&self) -> std::net::SocketAddr {
        self.0.address()
    }
    fn status(&self) -> super::EngineStatus {
        self.0.status()
    }
    fn drain(&self) {
        self.0.drain()
    }
    fn resume(&self) {
        self.0.resume()
    }
    fn can_shed(&self) -> bool {
        self.0.can_shed()
    }
    fn shed(&self, count: u64) -> u64 {
        self.0.shed(count)
    }
    async fn shutdown(&self, grace: Duration) {
        self.0.shutdown(grace).await
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub(crate) struct HttpProbe {
    section: HttpSection,
    client: HttpClient,
    /// `Basic …`, marked sensitive; never printed.
    authorization: Option<HeaderValue>,
    timeout: Duration,
}

impl std::fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProbe")
            .field("section", &self.section)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpProbe {
    fn new(section: HttpSection, timeout: Duration) -> Result<Self, HttpError> {
        let authorization = match (&section.username, &section.password_file) {
            (Some(user), Some(path)) => {
                let password =
                    std::fs::read_to_string(path).map_err(|source| HttpError::ReadFile {
                        key: "engine.http.password_file",
                        path: path.clone(),
                        source,
                    })?;
                let password = password.trim_end_matches(['\r', '\n']);
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                let mut value = HeaderValue::from_str(&format!("Basic {token}"))
                    .map_err(|_| HttpError::Password { path: path.clone() })?;
                value.set_sensitive(true);
                Some(value)
            }
            _ => None,
        };
        let tls = tls_config(section.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(HttpProbe {
            section,
            client,
            authorization,
            timeout,
        })
    }

    /// Makes `call`; the status and the body, bounded by the timeout.
    async fn call(
        &self,
        key: &str,
        call: &HttpCall,
        accept: Option<&'static str>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let mut headers = HeaderMap::new();
        if let Some(accept) = accept {
            headers.insert(ACCEPT, HeaderValue::from_static(accept));
        }
        // Per call over per adapter over the defaults.
        for (name, value) in self.section.headers.iter().chain(call.headers.iter()) {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(auth) = &self.authorization {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        let body = call.body.clone().map(Bytes::from).unwrap_or_default();
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = call.method.clone();
        *request.uri_mut() = call.url.clone();
        *request.headers_mut() = headers;
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| HttpError::Request {
            key: key.to_owned(),
            request: describe(call),
            source,
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| failed(e.into()))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(failed)?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                key: key.to_owned(),
                request: describe(call),
                timeout: self.timeout,
            })?
    }

    /// Reads a number as `q` says (`engine.http.queue_depth`,
    /// `engine.http.connections`).
    async fn number(&self, key: &str, q: &QueueDepthCall) -> Result<u64, HttpError> {
        let accept = match q.read {
            DepthReader::Json(_) => "application/json",
            // The classic text format; servers that also speak OpenMetrics
            // or protobuf pick this one.
            DepthReader::Prometheus { .. } => "text/plain;version=0.0.4",
        };
        let (status, body) = self.call(key, &q.call, Some(accept)).await?;
        if !status.is_success() {
            return Err(status_error(key, &q.call, status, "2xx"));
        }
        let answer = |problem: String| HttpError::Answer {
            key: key.to_owned(),
            request: describe(&q.call),
            problem,
        };
        match &q.read {
            DepthReader::Json(pointer) => {
                let doc: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| answer(format!("not JSON ({e}): {}", excerpt(&body))))?;
                pointer.sum(&doc).map_err(answer)
            }
            DepthReader::Prometheus { metric, labels } => {
                let text =
                    std::str::from_utf8(&body).map_err(|_| answer("not UTF-8 text".to_owned()))?;
                prometheus_sum(text, metric, labels).map_err(answer)
            }
        }
    }

    fn calls(&self, stage: Stage) -> (&'static str, &[HttpCall]) {
        match stage {
            Stage::Drain => ("drain", &self.section.drain),
            Stage::AfterDrained => ("after_drained", &self.section.after_drained),
            Stage::Resume => ("resume", &self.section.resume),
        }
    }
}

fn status_error(key: &str, call: &HttpCall, status: StatusCode, expected: &str) -> HttpError {
    HttpError::Status {
        key: key.to_owned(),
        request: describe(call),
        status,
        expected: expected.to_owned(),
    }
}

/// `METHOD url`, for errors.
fn describe(call: &HttpCall) -> String {
    format!("{} {}", call.method, call.url)
}

#[async_trait]
impl Probe for HttpProbe {
    type Error = HttpError;

    async fn health(&self) -> Result<(), HttpError> {
        let Some(health) = &self.section.health else {
            return Ok(());
        };
        let key = "engine.http.health";
        let (status, _) = self.call(key, &health.call, None).await?;
        match health.expect_status {
            Some(expected) if status != expected => {
                Err(status_error(key, &health.call, status, expected.as_str()))
            }
            None if !status.is_success() => Err(status_error(key, &health.call, status, "2xx")),
            _ => Ok(()),
        }
    }

    async fn queue_depth(&self) -> Result<u64, HttpError> {
        self.number("engine.http.queue_depth", &self.section.queue_depth)
            .await
    }

    async fn connections(&self) -> Option<Result<u64, HttpError>> {
        let c = self.section.connections.as_ref()?;
        Some(self.number("engine.http.connections", c).await)
    }

    fn can_shed(&self) -> bool {
        self.section.shed.is_some()
    }

    async fn shed(&self, count: u64) -> Result<(), HttpError> {
        let Some(shed) = &self.section.shed else {
            return Ok(());
        };
        let key = "engine.http.shed";
        let call = shed.with_count(count);
        let (status, _) = self.call(key, &call, None).await?;
        if status.is_success() {
            tracing::info!(call = %key, method = %call.method, url = %call.url, status = %status, "engine call made");
            Ok(())
        } else {
            Err(status_error(key, &call, status, "2xx"))
        }
    }

    fn actions(&self, stage: Stage) -> usize {
        self.calls(stage).1.len()
    }

    async fn act(&self, stage: Stage, index: usize) -> Result<(), HttpError> {
        let (name, calls) = self.calls(stage);
        let Some(call) = calls.get(index) else {
            return Ok(());
        };
        let key = format!("engine.http.{name}[{index}]");
        let (status, _) = self.call(&key, call, None).await?;
        if status.is_success() {
            tracing::info!(call = %key, method = %call.method, url = %call.url, status = %status, "engine call made");
            Ok(())
        } else {
            Err(status_error(&key, call, status, "2xx"))
        }
    }
}

/// The first bytes of an answer, for an error message.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    let more = if bytes.len() > MAX { "…" } else { "" };
    format!("{text:?}{more}")
}

fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, HttpError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let pem = std::fs::read(path).map_err(|source| HttpError::ReadFile {
                key: "engine.http.ca_file",
                path: path.to_owned(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|_| HttpError::Ca {
                    path: path.to_owned(),
                    source: None,
                })?;
                roots.add(cert).map_err(|e| HttpError::Ca {
                    path: path.to_owned(),
                    source: Some(e),
                })?;
            }
            if roots.is_empty() {
                return Err(HttpError::Ca {
                    path: path.to_owned(),
                    source: None,
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "a system CA certificate could not be loaded");
            }
            // Certificates the parser cannot use are skipped, like curl does.
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(
                added,
                ignored,
                "system CA certificates for the engine's https"
            );
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Ca {
            path: ca_file.map(|p| p.to_owned()).unwrap_or_default(),
            source: Some(e),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// An RFC 6901 JSON pointer, plus a `*` segment that means "every element"
/// (summed), for documents like Mirth's statistics of all channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPointer {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    /// Every element of an array. A value that is not an array counts as
    /// its only element: Mirth answers a list of one as the lone object.
    Each,
}

impl JsonPointer {
    /// `""` is the whole document; otherwise `/a/b`, with `~1` for `/` and
    /// `~0` for `~` in keys, and `*` for every element.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.is_empty() && !text.starts_with('/') {
            return Err(format!(
                "a JSON pointer like \"/list/channelStatistics/*/queued\", got {text:?}"
            ));
        }
        let segments = text
            .split('/')
            .skip(1)
            .map(|s| match s {
                "*" => Segment::Each,
                s => Segment::Key(s.replace("~1", "/").replace("~0", "~")),
            })
            .collect();
        Ok(JsonPointer {
            text: text.to_owned(),
            segments,
        })
    }

    /// The sum of the numbers the pointer reaches. A missing key is an error,
    /// never 0: a typo must not read as an empty queue.
    pub fn sum(&self, doc: &serde_json::Value) -> Result<u64, String> {
        let mut values = vec![doc];
        for (depth, segment) in self.segments.iter().enumerate() {
            let mut next = Vec::with_capacity(values.len());
            for v in values {
                match (segment, v) {
                    (Segment::Each, serde_json::Value::Array(items)) => next.extend(items),
                    (Segment::Each, v) => next.push(v),
                    (Segment::Key(k), serde_json::Value::Array(items)) => {
                        let item = k.parse::<usize>().ok().and_then(|i| items.get(i));
                        next.push(item.ok_or_else(|| self.missing(depth))?);
                    }
                    (Segment::Key(k), serde_json::Value::Object(map)) => {
                        next.push(map.get(k).ok_or_else(|| self.missing(depth))?);
                    }
                    _ => return Err(self.missing(depth)),
                }
            }
            values = next;
        }
        values.into_iter().try_fold(0u64, |sum, v| {
            let n = match v {
                serde_json::Value::Number(n) => n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
                        .map(|f| f as u64)
                }),
                serde_json::Value::String(s) => s.trim().parse().ok(),
                _ => None,
            };
            n.map(|n| sum.saturating_add(n)).ok_or_else(|| {
                format!(
                    "{} is {v}, expected a non-negative integer (or a string of one)",
                    self.text
                )
            })
        })
    }

    fn missing(&self, depth: usize) -> String {
        let reached: Vec<&str> = self.text.split('/').take(depth + 2).collect();
        format!("nothing at {} (of {})", reached.join("/"), self.text)
    }
}

impl std::fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The sum of every sample of `metric` in a Prometheus text exposition page
/// whose labels include all of `labels`. No matching sample is an error,
/// never 0: a misspelt name must not read as an empty queue.
pub fn prometheus_sum(
    text: &str,
    metric: &str,
    labels: &BTreeMap<String, String>,
) -> Result<u64, String> {
    let mut sum = 0f64;
    let mut matched = 0usize;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .unwrap_or(line.len());
        if &line[..name_end] != metric {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {}", n + 1, excerpt(line.as_bytes()));
        let rest = &line[name_end..];
        let (sample_labels, rest) = if let Some(rest) = rest.strip_prefix('{') {
            parse_labels(rest).map_err(|why| bad(&why))?
        } else {
            (BTreeMap::new(), rest)
        };
        let value = rest
            .split_ascii_whitespace()
            .next()
            .ok_or_else(|| bad("no value"))?;
        let value: f64 = value
            .parse()
            .map_err(|_| bad("the value is not a number"))?;
        if !labels.iter().all(|(k, v)| sample_labels.get(k) == Some(v)) {
            continue;
        }
        if !value.is_finite() || value < 0.0 {
            return Err(bad("expected a non-negative number"));
        }
        sum += value;
        matched += 1;
    }
    if matched == 0 {
        let filter: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        return Err(format!(
            "no sample of {metric}{}",
            if filter.is_empty() {
                String::new()
            } else {
                format!(" with {{{}}}", filter.join(","))
            }
        ));
    }
    Ok(sum.round() as u64)
}

/// Labels after the `{`: the map and the text after the `}`.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').ok_or("a label without a value")?;
        let name = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start();
        s = s.strip_prefix('"').ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value".to_owned()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("an unterminated label value".to_owned()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(name, value);
        s = s[end + 1..].trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_pointer_sums_over_stars() {
        let p = |s: &str| JsonPointer::parse(s).expect(s);
        let doc = json!({"list": {"channelStatistics": [
            {"channelId": "a", "queued": 3},
            {"channelId": "b", "queued": "4"},
            {"channelId": "c", "queued": 0.0},
        ]}});
        assert_eq!(p("/list/channelStatistics/*/queued").sum(&doc), Ok(7));
        assert_eq!(p("/list/channelStatistics/1/queued").sum(&doc), Ok(4));
        let lone = json!({"list": {"channelStatistics": {"channelId": "a", "queued": 5}}});
        assert_eq!(
            p("/list/channelStatistics/*/queued").sum(&lone),
            Ok(5),
            "a list of one sent as the object itself"
        );
        let empty = json!({"list": {"channelStatistics": []}});
        assert_eq!(p("/list/channelStatistics/*/queued").sum(&empty), Ok(0));
        assert_eq!(p("").sum(&json!(12)), Ok(12));
        assert_eq!(p("/a~1b/c~0d").sum(&json!({"a/b": {"c~d": 2}})), Ok(2));
    }

    #[test]
    fn json_pointer_refuses_what_is_not_a_count() {
        let p = |s: &str| JsonPointer::parse(s).expect(s);
        let doc = json!({"list": {"channelStatistics": [{"queued": 1}, {"sent": 2}]}});
        assert_eq!(
            p("/list/channelStatistics/*/queued").sum(&doc),
            Err(
                "nothing at /list/channelStatistics/*/queued (of /list/channelStatistics/*/queued)"
                    .to_owned()
            )
        );
        assert_eq!(
            p("/lst/x").sum(&doc),
            Err("nothing at /lst (of /lst/x)".to_owned())
        );
        for bad in [
            json!({"q": -1}),
            json!({"q": "many"}),
            json!({"q": 1.5}),
            json!({"q": null}),
        ] {
            let e = p("/q").sum(&bad).expect_err("not a count");
            assert!(e.contains("expected a non-negative integer"), "{e}");
        }
        assert!(JsonPointer::parse("list/queued").is_err());
    }

    const PAGE: &str = r#"# HELP iris_interop_queued Messages queued per production item
# TYPE iris_interop_queued gauge
iris_interop_queued{id="HL7.In",production="HIE.Production"} 3
iris_interop_queued{id="HL7.Out", production="HIE.Production"} 4 1712345678000
iris_interop_queued{id="Other.Out",production="Test"} 100
iris_interop_queued_total 55
iris_cpu_usage 12
iris_interop_queued{id="Esc\"aped\\",production="HIE.Production"} 1e1
"#;

    #[test]
    fn prometheus_sums_matching_samples() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            prometheus_sum(PAGE, "iris_interop_queued", &labels(&[])),
            Ok(117)
        );
        assert_eq!(
            prometheus_sum(
                PAGE,
                "iris_interop_queued",
                &labels(&[("production", "HIE.Production")])
            ),
            Ok(17)
        );
        assert_eq!(
            prometheus_sum(
                PAGE,
                "iris_interop_queued",
                &labels(&[("id", "Esc\"aped\\")])
            ),
            Ok(10)
        );
        assert_eq!(prometheus_sum(PAGE, "iris_cpu_usage", &labels(&[])), Ok(12));
        assert_eq!(
            prometheus_sum(PAGE, "iris_interop_queue", &labels(&[])),
            Err("no sample of iris_interop_queue".to_owned())
        );
        assert_eq!(
            prometheus_sum(PAGE, "iris_interop_queued", &labels(&[("id", "nope")])),
            Err("no sample of iris_interop_queued with {id=\"nope\"}".to_owned())
        );
        let e = prometheus_sum("q{id=\"a} 1\n", "q", &labels(&[])).expect_err("bad");
        assert!(e.starts_with("line 1: an unterminated label value"), "{e}");
        let e = prometheus_sum("q NaN\n", "q", &labels(&[])).expect_err("NaN");
        assert!(e.contains("non-negative"), "{e}");
    }
}
