//! The controller's Prometheus endpoint, scraped over a real socket while
//! minions join and report over gRPC.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// GETs `path` from `addr` over plain HTTP/1.1 and returns status and body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// The value of the series `series` (name and labels as written).
pub fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Where the first agent the controller's `/sd/minions` lists serves its
/// metrics (it said so at its join), if one is listed.
pub async fn listed_agent(fx: &Fixture) -> Option<std::net::SocketAddr> {
    let (_, sd) = get(fx.metrics, "/sd/minions").await;
    let groups: serde_json::Value = serde_json::from_str(&sd).ok()?;
    groups[0]["targets"][0].as_str()?.parse().ok()
}

/// Series lines (not comments) of a scrape.
fn series(body: &str) -> Vec<&str> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name))
        .collect()
}

async fn join(fx: &Fixture, instance: &str, metrics_port: u16) -> pb::JoinResponse {
    let mut req = join_request("local", instance, TOKEN);
    req.metrics_address = format!("127.0.0.1:{metrics_port}");
    fx.minion_client()
        .await
        .join(req)
        .await
        .expect("join")
        .into_inner()
}

#[tokio::test]
async fn the_series_count_does_not_grow_with_the_minions() {
    let ids: Vec<String> = (1..=30).map(|i| format!("i-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    // Bounds that hold all 30: the test is about series, not scaling.
    let fx = start_sized(&refs, 30, 30).await;
    for (i, id) in ids.iter().take(2).enumerate() {
        join(&fx, id, 9500 + i as u16).await;
    }
    let (status, two) = get(fx.metrics, "/metrics").await;
    assert_eq!(status, 200, "{two}");
    assert_eq!(
        value(&two, r#"gru_fleet_minions{fleet="local",state="joining"}"#),
        Some(2.0),
        "{two}"
    );
    assert_eq!(
        value(
            &two,
            r#"gru_build_info{component="controller",version="0.1.0"}"#
        ),
        Some(1.0)
    );
    for (i, id) in ids.iter().enumerate().skip(2) {
        join(&fx, id, 9500 + i as u16).await;
    }
    let (_, thirty) = get(fx.metrics, "/metrics").await;
    assert_eq!(
        value(
            &thirty,
            r#"gru_fleet_minions{fleet="local",state="joining"}"#
        ),
        Some(30.0),
        "{thirty}"
    );
    assert_eq!(
        series(&two),
        series(&thirty),
        "the same series with 2 and with 30 minions"
    );
    assert!(
        !thirty.contains("i-1"),
        "no series names a minion:\n{thirty}"
    );

    // Prometheus HTTP service discovery lists every agent, with its fleet.
    let (status, sd) = get(fx.metrics, "/sd/minions").await;
    assert_eq!(status, 200);
    let groups: serde_json::Value = serde_json::from_str(&sd).expect("json");
    let groups = groups.as_array().expect("array");
    assert_eq!(groups.len(), 30, "{sd}");
    let first = groups
        .iter()
        .find(|g| g["labels"]["instance_id"] == "i-1")
        .expect("i-1 listed");
    assert_eq!(first["targets"][0], "127.0.0.1:9500");
    assert_eq!(first["labels"]["fleet"], "local");

    let (status, _) = get(fx.metrics, "/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = get(fx.metrics, "/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn reports_count_messages_and_cloud_calls_are_timed() {
    let fx = start(&["i-1"]).await;
    let joined = join(&fx, "i-1", 9600).await;
    // Reports 1 and 2 say when they were sent (a second ago), report 3
    // does not (an agent from before the field): only two delays count.
    let a_second_ago = (std::time::SystemTime::now() - Duration::from_secs(1))
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as u64;
    let report = |seq, processed, queue_depth| pb::SessionMessage {
        body: Some(pb::session_message::Body::Report(pb::MinionReport {
            seq,
            processed_total: processed,
            queue_depth,
            health: pb::EngineHealth::Healthy as i32,
            sent_at_unix_us: if seq < 3 { a_second_ago } else { 0 },
            ..Default::default()
        })),
    };
    // The first report is the minion's baseline; the next two add 15 and 5
    // processed, and 15 + 5 + 3 (queue) received.
    let messages = vec![
        hello(&joined.minion_id, &joined.session_token),
        report(1, 10, 0),
        report(2, 25, 0),
        report(3, 30, 3),
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for m in messages {
        tx.send(m).await.expect("queue");
    }
    let _session = fx
        .session_client(&joined)
        .await
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session");
    let body = eventually("three reports counted", || async {
        let (_, body) = get(fx.metrics, "/metrics").await;
        (value(&body, r#"gru_minion_reports_total{fleet="local"}"#) == Some(3.0)).then_some(body)
    })
    .await;
    assert_eq!(
        value(
            &body,
            r#"gru_fleet_processed_messages_total{fleet="local"}"#
        ),
        Some(20.0),
        "{body}"
    );
    assert_eq!(
        value(&body, r#"gru_fleet_received_messages_total{fleet="local"}"#),
        Some(23.0),
        "{body}"
    );
    assert_eq!(
        value(&body, r#"gru_fleet_sessions{fleet="local"}"#),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            r#"gru_minion_report_delay_seconds_count{fleet="local"}"#
        ),
        Some(2.0),
        "{body}"
    );
    // Both took at least the second they were stamped in the past.
    assert_eq!(
        value(
            &body,
            r#"gru_minion_report_delay_seconds_bucket{fleet="local",le="0.5"}"#
        ),
        Some(0.0),
        "{body}"
    );
    // The join of an unknown instance described the group; the loop does
    // every pass. Both are counted under their operation.
    let describes = value(
        &body,
        r#"gru_cloud_requests_total{fleet="local",operation="describe"}"#,
    )
    .expect("describe counted");
    assert!(describes >= 1.0, "{body}");
    assert!(
        body.contains(r#"gru_cloud_request_duration_seconds_bucket{fleet="local",operation="describe",le="+Inf"}"#),
        "{body}"
    );
    let passes = eventually("a reconcile pass", || async {
        let (_, body) = get(fx.metrics, "/metrics").await;
        value(&body, r#"gru_reconcile_passes_total{fleet="local"}"#).filter(|n| *n >= 1.0)
    })
    .await;
    assert!(passes >= 1.0);
}

#[tokio::test]
async fn a_bad_metrics_address_is_refused() {
    let fx = start(&["i-1"]).await;
    let mut req = join_request("local", "i-1", TOKEN);
    req.metrics_address = "somewhere".to_owned();
    let e = fx
        .minion_client()
        .await
        .join(req)
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("metrics_address"), "{}", e.message());
}

#[tokio::test]
async fn an_agent_serves_its_engine_and_session_and_the_controller_lists_it() {
    let fx = start(&["i-1"]).await;
    let config = minion_config(&fx, "metrics_listen = \"127.0.0.1:0\"\n").await;
    let (_stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gru_minion::run(config, "i-1".to_owned(), async {
        let _ = agent_stopped.await;
    }));

    // The agent bound port 0 and said where at its join.
    let agent = eventually("the agent in /sd/minions", || listed_agent(&fx)).await;
    let body = eventually("the agent's Session open and reported", || async {
        let (_, body) = get(agent, "/metrics").await;
        (value(&body, "gru_agent_session_connected") == Some(1.0)
            && value(&body, "gru_agent_reports_total").is_some_and(|n| n >= 1.0))
        .then_some(body)
    })
    .await;
    for series in [
        "gru_engine_queued_messages 0",
        "gru_engine_in_flight_messages 0",
        "gru_engine_processed_messages_total 0",
        "gru_engine_healthy 1",
        "gru_engine_draining 0",
        "gru_agent_reconnects_total 0",
        r#"gru_engine_ack_duration_seconds_bucket{le="+Inf"} 0"#,
        r#"gru_build_info{component="minion",version="0.1.0"} 1"#,
    ] {
        assert!(body.contains(series), "{series} in:\n{body}");
    }
}
