//! `gru dev` under load, scraped by a real Prometheus configured from
//! deploy/prometheus/scrape.example.yaml with the shipped alert rules:
//! promtool accepts what the controller and a minion serve, Prometheus
//! discovers the minions through the controller, every dashboard query and
//! every alert expression runs, a scaling step shows up in Prometheus, and
//! the controller's series do not grow with the number of minions.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::deploy::{
    alert_names, dashboard_exprs, grafana_expand, prometheus_dir, promtool, scrape_config_for, tool,
};
use crate::harness::{Dev, Proc, drive, free_port, wait_until};

const FLEET: &str = "local";

/// Metrics listed in docs/metrics.md whose dashboard panels must show data
/// while gru dev runs with load (the rest may be empty: no drain, no error).
const CORE: &[&str] = &[
    "gru_fleet_desired",
    "gru_fleet_minions",
    "gru_fleet_queued_messages",
    "gru_engine_queued_messages",
];

struct Response {
    status: u16,
    body: String,
}

/// A plain HTTP/1.1 GET (no new crates for a test client): the body with
/// chunked transfer encoding undone.
fn http_get(addr: &str, path: &str) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&raw[..eol]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// A GET that must answer 200.
pub(crate) fn get_ok(addr: &str, path: &str) -> String {
    let r = http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    assert_eq!(
        r.status, 200,
        "GET http://{addr}{path} answered {}: {}",
        r.status, r.body
    );
    r.body
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved
/// characters).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The controller's metrics address (`127.0.0.1:PORT`), from the line gru
/// dev prints (`metrics: http://127.0.0.1:PORT/metrics (minions: …)`),
/// which must agree with its dev.json.
fn metrics_addr(dev: &Dev) -> String {
    const MARK: &str = "metrics: http://";
    let printed = wait_until(
        "gru dev to print its metrics address",
        Duration::from_secs(30),
        || {
            let log = dev.log();
            let rest = &log[log.find(MARK)? + MARK.len()..];
            let end = rest.find('/')?;
            Some(rest[..end].to_owned())
        },
    );
    assert_eq!(
        dev.metrics.as_deref(),
        Some(format!("http://{printed}/metrics").as_str()),
        "dev.json's metrics"
    );
    printed
}

/// `promtool check metrics` on an exposition `body`, as served to a client
/// that does not ask for OpenMetrics (Prometheus's text format 0.0.4, the
/// one promtool lints): no lint problem, no parse error.
fn check_metrics(what: &str, body: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics rejects {what} ({}):\n{}{}\n--- {what} ---\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The series of an exposition body: each sample line's name and labels.
fn series(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (mut quoted, mut escaped) = (false, false);
            let end = l
                .char_indices()
                .find(|&(_, c)| {
                    let end = !quoted && c == ' ';
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        quoted = !quoted;
                    }
                    end
                })
                .map_or(l.len(), |(i, _)| i);
            l[..end].to_owned()
        })
        .collect()
}

fn diff(a: &BTreeSet<String>, b: &BTreeSet<String>) -> String {
    let gone: Vec<&String> = a.difference(b).collect();
    let new: Vec<&String> = b.difference(a).collect();
    format!("gone: {gone:?}\nnew: {new:?}")
}

/// A real Prometheus on loopback, stopped when dropped.
struct Prometheus {
    _proc: Proc,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes the controller at `controller` and the minions it lists,
    /// with deploy/prometheus/alerts.yaml loaded.
    fn start(controller: &str) -> Prometheus {
        let binary = tool(
            "prometheus",
            "apt-get install -y --no-install-recommends prometheus",
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, scrape_config_for(controller)).expect("write config");
        std::fs::copy(
            prometheus_dir().join("alerts.yaml"),
            dir.path().join("alerts.yaml"),
        )
        .expect("copy alerts.yaml");
        // Prometheus cannot take an inherited socket: give it a port that
        // was free a moment ago. Should something take it first, Prometheus
        // exits and the wait below fails with its log.
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let mut proc = Proc::spawn(
            "prometheus",
            Command::new(binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        );
        let log_path = dir.path().join("prometheus.log");
        wait_until("prometheus to be ready", Duration::from_secs(60), || {
            if let Some(status) = proc.child.try_wait().expect("wait") {
                panic!(
                    "prometheus exited with {status}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            let r = http_get(&addr, "/-/ready").ok()?;
            (r.status == 200).then_some(())
        });
        Prometheus {
            _proc: proc,
            addr,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path_and_query: &str) -> Value {
        let r = http_get(&self.addr, path_and_query)
            .unwrap_or_else(|e| panic!("GET {path_and_query} from prometheus: {e}"));
        serde_json::from_str(&r.body).unwrap_or_else(|e| {
            panic!(
                "prometheus answered {path_and_query} with {} and no JSON ({e}): {}",
                r.status, r.body
            )
        })
    }

    /// An instant query that must succeed; its `data.result`.
    fn query(&self, expr: &str) -> Vec<Value> {
        let v = self.api(&format!("/api/v1/query?query={}", percent_encode(expr)));
        assert_eq!(
            v["status"],
            "success",
            "prometheus refused {expr:?}: {v}\n--- prometheus log ---\n{}",
            self.log()
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `expr` has a result for which `ok` holds.
    fn wait_for(&self, what: &str, expr: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        wait_until(what, Duration::from_secs(45), || {
            let r = self.query(expr);
            ok(&r).then_some(r)
        })
    }
}

/// The value of an instant vector's first sample.
fn first_value(result: &[Value]) -> Option<f64> {
    result.first()?["value"][1].as_str()?.parse().ok()
}

/// The controller's /healthz, its /sd/minions (two minions) and what the
/// controller and a minion serve on /metrics, which promtool accepts.
fn check_endpoints(controller: &str) {
    assert_eq!(get_ok(controller, "/healthz").trim(), "ok");
    let targets: Vec<Value> = wait_until(
        "/sd/minions to list both minions",
        Duration::from_secs(30),
        || {
            let body = http_get(controller, "/sd/minions").ok()?.body;
            let groups: Vec<Value> = serde_json::from_str(&body).ok()?;
            (groups.len() == 2).then_some(groups)
        },
    );
    for group in &targets {
        for label in ["fleet", "minion", "instance_id"] {
            assert!(
                group["labels"][label].is_string(),
                "/sd/minions: a target without {label}: {group}"
            );
        }
        assert_eq!(group["labels"]["fleet"], FLEET, "{group}");
    }
    let minion = targets[0]["targets"][0]
        .as_str()
        .unwrap_or_else(|| panic!("/sd/minions: no target address in {}", targets[0]))
        .to_owned();
    // The fleet counts what arrives, and the policy estimates its rate.
    for (metric, what) in [
        (
            "gru_fleet_received_messages_total",
            "count received messages",
        ),
        ("gru_fleet_arrival_rate", "estimate the arrival rate"),
    ] {
        wait_until(
            &format!("the fleet to {what}"),
            Duration::from_secs(30),
            || {
                get_ok(controller, "/metrics")
                    .lines()
                    .filter(|l| l.starts_with(&format!("{metric}{{")))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .any(|v| v > 0.0)
                    .then_some(())
            },
        );
    }
    let body = get_ok(controller, "/metrics");
    assert!(body.contains("gru_fleet_desired{"), "{body}");
    check_metrics("the controller's /metrics", &body);
    let body = get_ok(&minion, "/metrics");
    assert!(body.contains("gru_engine_queued_messages"), "{body}");
    check_metrics("a minion's /metrics", &body);
}

/// A Prometheus scraping the controller at `controller` and, through it,
/// the minions: the core series arrive, every alert rule evaluates and
/// every dashboard query runs.
fn prometheus_runs_every_query(controller: &str) -> Prometheus {
    let prom = Prometheus::start(controller);
    prom.wait_for(
        "prometheus to scrape the controller",
        r#"up{job="gru-controller"} == 1"#,
        |r| r.len() == 1,
    );
    prom.wait_for(
        "prometheus to discover and scrape both minions through /sd/minions",
        r#"up{job="gru-minions"} == 1"#,
        |r| r.len() == 2,
    );
    for expr in [
        format!(r#"gru_fleet_desired{{fleet="{FLEET}"}}"#),
        format!(r#"gru_fleet_minions{{fleet="{FLEET}",state="in_service"}}"#),
        format!(r#"gru_fleet_queued_messages{{fleet="{FLEET}"}}"#),
        format!(r#"gru_engine_queued_messages{{fleet="{FLEET}"}}"#),
    ] {
        prom.wait_for(&format!("prometheus to have {expr}"), &expr, |r| {
            !r.is_empty()
        });
    }
    // The traffic is in Prometheus too.
    prom.wait_for(
        "prometheus to see messages processed",
        &format!(r#"gru_fleet_processed_messages_total{{fleet="{FLEET}"}} > 0"#),
        |r| !r.is_empty(),
    );

    // Every alert rule loaded, evaluated without error, and its expression
    // runs as a query.
    let expected: BTreeSet<String> = alert_names().into_iter().collect();
    let rules: Vec<Value> = wait_until(
        "prometheus to evaluate every alert rule",
        Duration::from_secs(30),
        || {
            let v = prom.api("/api/v1/rules?type=alert");
            let rules: Vec<Value> = v["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let evaluated = rules.iter().all(|r| r["health"] != "unknown");
            (evaluated && !rules.is_empty()).then_some(rules)
        },
    );
    let loaded: BTreeSet<String> = rules
        .iter()
        .map(|r| r["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(loaded, expected, "the rules prometheus loaded");
    for rule in &rules {
        assert_eq!(
            rule["health"], "ok",
            "alert {} does not evaluate: {}",
            rule["name"], rule["lastError"]
        );
        let expr = rule["query"].as_str().expect("query");
        prom.query(expr);
    }

    // Every dashboard query runs; the core panels show data.
    for (title, expr) in dashboard_exprs() {
        let expanded = grafana_expand(&expr, FLEET);
        let result = prom.query(&expanded);
        let core = CORE
            .iter()
            .any(|m| expanded.contains(&format!("{m}{{")) || expanded.contains(&format!("{m})")));
        assert!(
            !core || !result.is_empty(),
            "panel {title:?}: no data for {expanded:?}"
        );
    }

    prom
}

#[test]
fn prometheus_scrapes_gru_dev_and_runs_every_dashboard_query_and_alert() {
    let dev = Dev::start(&[
        "--min",
        "2",
        "--max",
        "6",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let controller = metrics_addr(&dev);
    dev.wait_in_service(2, Duration::from_secs(30));
    let acked = dev.dir.path().join("acked.txt");
    // Outlasts the test; stopped below.
    let driver = drive(
        dev.load_balancer,
        &acked,
        &["--rate", "50", "--duration", "180s", "--connections", "4"],
    );

    // (a) What the controller and a minion serve passes promtool.
    check_endpoints(&controller);

    // (b) A real Prometheus, configured as the example says, runs every
    // alert and dashboard query.
    let prom = prometheus_runs_every_query(&controller);

    // A scaling step reaches Prometheus.
    let out = dev.gru(&["scale", FLEET, "3", "--wait", "--timeout", "60s"]);
    assert!(
        out.status.success(),
        "gru scale {FLEET} 3: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dev.log()
    );
    prom.wait_for(
        "prometheus to see the fleet's desired size at 3",
        &format!(r#"gru_fleet_desired{{fleet="{FLEET}"}}"#),
        |r| first_value(r) == Some(3.0),
    );

    // (c) The controller's series do not grow with the minions. Both counts
    // are taken after a pinned scale-out, so the decisions and cloud calls
    // that label series (source, direction, operation) are the same kinds;
    // only the number of minions differs.
    let at_3 = series(&get_ok(&controller, "/metrics"));
    let out = dev.gru(&["scale", FLEET, "6", "--wait", "--timeout", "90s"]);
    assert!(
        out.status.success(),
        "gru scale {FLEET} 6: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dev.log()
    );
    let at_6 = series(&get_ok(&controller, "/metrics"));
    assert_eq!(
        at_3.len(),
        at_6.len(),
        "the controller's series changed from 3 minions to 6:\n{}",
        diff(&at_3, &at_6)
    );
    assert_eq!(at_3, at_6, "{}", diff(&at_3, &at_6));
    prom.wait_for(
        "prometheus to discover the six minions",
        r#"up{job="gru-minions"} == 1"#,
        |r| r.len() == 6,
    );

    drop(prom);
    drop(driver);
    dev.stop();
}
