//! Certificate rotation under a running controller: new TLS files are
//! picked up without a restart, new connections use them, and the
//! connections already up (a minion's Session, an admin's channel) stay up.

use std::path::Path;

use super::metrics::{get, value};
use super::*;

/// WhoAmI on a new connection to `addr` that trusts the CA in `pki` and
/// presents its admin certificate; `Err` when the call cannot be made.
async fn whoami(addr: std::net::SocketAddr, pki: &DevPki) -> Result<String, String> {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("pki file");
    let channel = tls_channel(
        addr,
        read(&pki.ca_cert).as_bytes(),
        &read(&pki.admin_cert),
        &read(&pki.admin_key),
    )
    .await
    .map_err(|e| format!("{e:?}"))?;
    AdminServiceClient::new(channel)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map(|r| r.into_inner().identity)
        .map_err(|e| e.to_string())
}

/// Puts a copy of `from` in place of `to` with one rename, as deploy tools
/// do, so the controller never reads a half-written file.
fn replace(from: &Path, to: &Path) {
    let staged = to.with_extension("staged");
    std::fs::copy(from, &staged).expect("copy");
    std::fs::rename(&staged, to).expect("rename");
}

async fn tls_reloads(fx: &Fixture, result: &str) -> f64 {
    let (_, body) = get(fx.metrics, "/metrics").await;
    value(
        &body,
        &format!(r#"gru_tls_reloads_total{{result="{result}"}}"#),
    )
    .expect("gru_tls_reloads_total is exported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_certificates_are_used_without_a_restart_and_no_session_drops() {
    let fx = start_sized(&["i-1"], 1, 1).await;
    // The minion reports every 100 ms for as long as its Session is open.
    let mut commands = reporting_minion(&fx, "i-1").await;
    let reports = || async {
        let (_, body) = get(fx.metrics, "/metrics").await;
        value(&body, r#"gru_minion_reports_total{fleet="local"}"#).unwrap_or(0.0)
    };
    // An admin connection opened before the rotation and kept open.
    let mut old_admin = fx.admin().await;
    assert_eq!(
        old_admin
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .expect("before the rotation")
            .into_inner()
            .identity,
        "CN=gru admin"
    );
    // The old CA and admin certificate, kept aside to try them afterwards.
    let old_dir = tempfile::tempdir().expect("tempdir");
    let old = DevPki::in_dir(old_dir.path());
    for (from, to) in [
        (&fx.pki.ca_cert, &old.ca_cert),
        (&fx.pki.admin_cert, &old.admin_cert),
        (&fx.pki.admin_key, &old.admin_key),
    ] {
        std::fs::copy(from, to).expect("keep the old files");
    }

    // A new CA, with a new server and admin certificate.
    let new_dir = tempfile::tempdir().expect("tempdir");
    let new = DevPki::in_dir(new_dir.path());
    new.ensure().expect("new pki");
    assert!(
        whoami(fx.addr, &new).await.is_err(),
        "the new CA's admin is let in before the new CA is installed"
    );

    // Half a rotation first: a key that does not match the certificate
    // beside it is refused, and the old files stay in use.
    assert_eq!(tls_reloads(&fx, "refused").await, 0.0);
    replace(&new.server_key, &fx.pki.server_key);
    eventually("the mismatched key to be refused", || async {
        (tls_reloads(&fx, "refused").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(
        whoami(fx.addr, &old).await.expect("after a refused reload"),
        "CN=gru admin",
        "the old certificate is no longer served after a refused reload"
    );

    // The rest of the rotation.
    replace(&new.server_cert, &fx.pki.server_cert);
    replace(&new.ca_cert, &fx.pki.ca_cert);
    let at_rotation = reports().await;
    let who = eventually("a new connection verified by the new CA", || async {
        whoami(fx.addr, &new).await.ok()
    })
    .await;
    assert_eq!(who, "CN=gru admin");
    assert!(tls_reloads(&fx, "loaded").await >= 1.0);
    // A new connection that trusts only the old CA is refused now (the
    // server's certificate is the new CA's), and so is an admin
    // certificate of the old CA once the new CA bundle is in.
    eventually("the old CA to be out", || async {
        whoami(fx.addr, &old).await.is_err().then_some(())
    })
    .await;

    // What was up before is still up: the admin connection answers, and
    // the Session kept reporting and was not closed.
    old_admin
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .expect("the admin connection opened before the rotation");
    eventually("reports after the rotation on the old Session", || async {
        (reports().await >= at_rotation + 10.0).then_some(())
    })
    .await;
    match tokio::time::timeout(Duration::from_millis(200), commands.message()).await {
        Err(_) | Ok(Ok(Some(_))) => {}
        Ok(other) => panic!("the Session ended during the rotation: {other:?}"),
    }
}
