//! Minion certificates: Join issues each minion its own, naming its fleet
//! and instance; a Session's connection must present it; later Joins may
//! prove themselves with it; the agent renews it over its Session.

use gru_controller::access::Subject;
use gru_controller::pki::Ca;

use super::metrics::{get, listed_agent, value};
use super::*;

/// The controller's minion CA, as `[minion_ca]` left it in the state dir.
fn minion_ca(fx: &Fixture) -> Ca {
    let state = fx.dir.path().join("state");
    Ca::load(&state.join("minion-ca.pem"), &state.join("minion-ca.key")).expect("minion CA")
}

/// The `gru://` identity in a PEM certificate.
fn uri_of(pem: &str) -> String {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    Subject::from_der(der.as_ref())
        .expect("parse")
        .minion_uri
        .expect("a gru:// URI")
}

async fn joined(fx: &Fixture, instance: &str) -> pb::JoinResponse {
    fx.minion_client()
        .await
        .join(join_request("local", instance, TOKEN))
        .await
        .expect("join")
        .into_inner()
}

/// Opens a Session for `joined` on `client` and returns how it ended
/// before its first command, or Ok when it is up.
async fn open_session(
    mut client: MinionServiceClient<Channel>,
    joined: &pb::JoinResponse,
) -> Result<tonic::Streaming<pb::ControllerCommand>, tonic::Status> {
    client
        .session(futures::stream::iter(vec![hello(
            &joined.minion_id,
            &joined.session_token,
        )]))
        .await
        .map(|r| r.into_inner())
}

use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn join_issues_a_certificate_for_the_minions_fleet_and_instance() {
    let fx = start(&["i-1"]).await;
    let joined = joined(&fx, "i-1").await;
    let c = joined.certificate.as_ref().expect("a certificate");
    assert_eq!(uri_of(&c.certificate_pem), "gru://fleet/local/instance/i-1");
    // The default lifetime, 24 hours.
    let left = c.not_after_unix - jiff::Timestamp::now().as_second();
    assert!(
        (24 * 3600 - 120..=24 * 3600).contains(&left),
        "valid for {left} s"
    );

    // A Join without a request for its key, or with a request that is not
    // one, gets no certificate and joins nothing.
    let mut c = fx.minion_client().await;
    let mut req = join_request("local", "i-1", TOKEN);
    req.csr_pem = String::new();
    let e = c.join(req).await.expect_err("no csr");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("csr_pem"), "{}", e.message());
    let mut req = join_request("local", "i-1", TOKEN);
    req.csr_pem =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
    let e = c.join(req).await.expect_err("bad csr");
    assert_eq!(e.code(), Code::InvalidArgument);
    // An instance id that cannot stand in a certificate's URI.
    let e = c
        .join(join_request("local", "i-1/instance/i-2", TOKEN))
        .await
        .expect_err("bad instance id");
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_session_needs_the_minions_own_certificate() {
    let fx = start(&["i-1", "i-2"]).await;
    let one = joined(&fx, "i-1").await;
    let two = joined(&fx, "i-2").await;

    // Without a certificate.
    let e = open_session(fx.minion_client().await, &one)
        .await
        .expect_err("no certificate");
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    // With another instance's.
    let e = open_session(fx.session_client(&two).await, &one)
        .await
        .expect_err("i-2's certificate");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("gru://fleet/local/instance/i-2"),
        "{}",
        e.message()
    );
    // With one for the same instance id in another fleet, from the same CA.
    let ca = minion_ca(&fx);
    let other = ca
        .issue_minion(&test_key().1, "other", "i-1", Duration::from_secs(3600))
        .expect("issue");
    let e = open_session(fx.minion_client_with(&other.cert_pem).await, &one)
        .await
        .expect_err("another fleet's certificate");
    assert_eq!(e.code(), Code::PermissionDenied);
    // With an expired one: the TLS handshake refuses it (not_before is a
    // minute back, not_after now).
    let expired = ca
        .issue_minion(&test_key().1, "local", "i-1", Duration::ZERO)
        .expect("issue");
    let ca = std::fs::read(&fx.pki.ca_cert).expect("ca");
    eventually("the expired certificate to be refused", || async {
        match tls_channel(fx.addr, &ca, &expired.cert_pem, &test_key().0).await {
            Err(_) => Some(()),
            Ok(channel) => open_session(MinionServiceClient::new(channel), &one)
                .await
                .is_err()
                .then_some(()),
        }
    })
    .await;
    // A certificate of another CA does not get past TLS either.
    let foreign_dir = tempfile::tempdir().expect("tempdir");
    let foreign = DevPki::in_dir(foreign_dir.path());
    foreign.ensure().expect("pki");
    let foreign_ca = Ca::load(&foreign.ca_cert, &foreign.ca_key).expect("ca");
    let forged = foreign_ca
        .issue_minion(&test_key().1, "local", "i-1", Duration::from_secs(3600))
        .expect("issue");
    let refused = match tls_channel(fx.addr, &ca, &forged.cert_pem, &test_key().0).await {
        Err(_) => true,
        Ok(channel) => open_session(MinionServiceClient::new(channel), &one)
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA opened a Session");

    // With its own, the Session opens and takes reports.
    let mut commands = open_session(fx.session_client(&one).await, &one)
        .await
        .expect("its own certificate");
    match tokio::time::timeout(Duration::from_millis(200), commands.message()).await {
        Err(_) | Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("the Session was refused: {e}"),
    }
}

#[tokio::test]
async fn a_rejoin_proves_itself_with_the_certificate() {
    let fx = start(&["i-1", "i-2"]).await;
    let one = joined(&fx, "i-1").await;
    let two = joined(&fx, "i-2").await;
    let by_certificate = |instance: &str| {
        let mut req = join_request("local", instance, "");
        req.identity = Some(pb::join_request::Identity::Certificate(
            pb::MinionCertificate {},
        ));
        req
    };
    // On a connection that presents i-1's certificate: no token needed.
    let again = fx
        .session_client(&one)
        .await
        .join(by_certificate("i-1"))
        .await
        .expect("rejoin with the certificate")
        .into_inner();
    assert_eq!(again.minion_id, one.minion_id);
    assert_eq!(
        uri_of(
            &again
                .certificate
                .expect("a new certificate")
                .certificate_pem
        ),
        "gru://fleet/local/instance/i-1"
    );
    // Claiming the certificate without presenting it.
    let e = fx
        .minion_client()
        .await
        .join(by_certificate("i-1"))
        .await
        .expect_err("no certificate presented");
    assert_eq!(e.code(), Code::Unauthenticated);
    // i-2's certificate does not make a join as i-1, with or without the token.
    let e = fx
        .session_client(&two)
        .await
        .join(by_certificate("i-1"))
        .await
        .expect_err("i-2's certificate");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = fx
        .session_client(&two)
        .await
        .join(join_request("local", "i-1", TOKEN))
        .await
        .expect_err("i-2's certificate with the token");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("i-2"), "{}", e.message());
}

#[tokio::test]
async fn the_session_renews_the_certificate() {
    let fx = start(&["i-1"]).await;
    let one = joined(&fx, "i-1").await;
    let first = one.certificate.clone().expect("certificate");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(&one.minion_id, &one.session_token))
        .await
        .expect("hello");
    let mut commands = fx
        .session_client(&one)
        .await
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    tx.send(pb::SessionMessage {
        body: Some(pb::session_message::Body::Renew(pb::RenewCertificate {
            csr_pem: test_key().1.clone(),
        })),
    })
    .await
    .expect("renew");
    let renewed = tokio::time::timeout(TEST_DEADLINE, async {
        loop {
            let cmd = commands.message().await.expect("stream").expect("open");
            if let Some(pb::controller_command::Command::Certificate(c)) = cmd.command {
                return c;
            }
        }
    })
    .await
    .expect("a renewed certificate");
    assert_eq!(
        uri_of(&renewed.certificate_pem),
        "gru://fleet/local/instance/i-1"
    );
    assert_ne!(renewed.certificate_pem, first.certificate_pem);
    assert!(renewed.not_after_unix >= first.not_after_unix);
    // The renewed certificate opens the next connection.
    fx.minion_client_with(&renewed.certificate_pem)
        .await
        .join({
            let mut req = join_request("local", "i-1", "");
            req.identity = Some(pb::join_request::Identity::Certificate(
                pb::MinionCertificate {},
            ));
            req
        })
        .await
        .expect("join with the renewed certificate");
}

/// A real agent against certificates that live 3 s: it renews them over its
/// Session before they expire, and the Session outlives every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_certificate_and_keeps_its_session() {
    let fx = start_with(&["i-1"], 0, 3, "[minion_ca]\nlifetime = \"3s\"\n").await;
    let config = minion_config(&fx, "metrics_listen = \"127.0.0.1:0\"\n").await;
    let (_stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gru_minion::run(config, "i-1".to_owned(), async {
        let _ = agent_stopped.await;
    }));
    let agent = eventually("the agent in /sd/minions", || listed_agent(&fx)).await;
    let expiry = || async {
        let (_, body) = get(agent, "/metrics").await;
        value(&body, "gru_agent_certificate_expiry_timestamp_seconds").filter(|v| *v > 0.0)
    };
    let first = eventually("the first certificate", expiry).await;
    // Three renewals: the first certificate has long expired by the last.
    let mut seen = first;
    for n in 1..=3 {
        seen = eventually(&format!("renewal {n}"), || async {
            expiry().await.filter(|e| *e > seen)
        })
        .await;
    }
    assert!(seen >= first + 3.0, "first {first}, last {seen}");
    let (_, body) = get(agent, "/metrics").await;
    assert_eq!(value(&body, "gru_agent_session_connected"), Some(1.0));
    assert_eq!(
        value(&body, "gru_agent_reconnects_total"),
        Some(0.0),
        "the Session dropped while certificates were renewed"
    );
}

/// An agent with a `state_dir` keeps its key and certificate there: after a
/// restart it rejoins with the certificate, so it needs the token (or, on
/// AWS, its once-only identity document) no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_rejoins_with_the_certificate_it_kept() {
    use std::os::unix::fs::PermissionsExt;
    let fx = start(&["i-1"]).await;
    let config = minion_config(
        &fx,
        "state_dir = \"minion-state\"\nmetrics_listen = \"127.0.0.1:0\"\n",
    )
    .await;
    let connected_at = |not: Option<std::net::SocketAddr>| {
        let fx = &fx;
        async move {
            eventually("an agent's Session", || async {
                let agent = listed_agent(fx).await?;
                if Some(agent) == not {
                    return None;
                }
                let (_, body) = get(agent, "/metrics").await;
                (value(&body, "gru_agent_session_connected") == Some(1.0)).then_some(agent)
            })
            .await
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(gru_minion::run(config.clone(), "i-1".to_owned(), async {
        let _ = stopped.await;
    }));
    let first_agent = connected_at(None).await;
    let state = fx.dir.path().join("minion-state");
    let mode = std::fs::metadata(state.join("minion.key"))
        .expect("the key is kept")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is the owner's only");
    let kept = std::fs::read_to_string(state.join("minion.pem")).expect("the certificate is kept");
    let _ = stop.send(());
    tokio::time::timeout(TEST_DEADLINE, first)
        .await
        .expect("the agent stops")
        .expect("join")
        .expect("agent ok");

    // The token no longer works: only the kept certificate can get it in.
    std::fs::write(fx.dir.path().join("token"), "not the token any more").expect("token");
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gru_minion::run(config, "i-1".to_owned(), async {
        let _ = stopped.await;
    }));
    connected_at(Some(first_agent)).await;
    let renewed = std::fs::read_to_string(state.join("minion.pem")).expect("certificate");
    assert_ne!(kept, renewed, "the rejoin's new certificate is kept too");
}
