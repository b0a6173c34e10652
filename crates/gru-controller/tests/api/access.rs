//! Admin roles over the real API: every admin call × every kind of caller,
//! allowed or PermissionDenied as the table below says (written out, not
//! derived from the code under test), and the audit trail names the caller.

use gru_controller::access::Role;
use gru_controller::pki::Ca;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

use super::*;

/// A client certificate and key (PEM) signed by the fixture's CA.
struct Cert {
    pem: String,
    key: String,
}

fn issued(fx: &Fixture, name: &str, role: Role) -> Cert {
    let ca = Ca::load(&fx.pki.ca_cert, &fx.pki.ca_key).expect("ca");
    let c = ca
        .issue_admin(name, role, Duration::from_secs(3600))
        .expect("issue");
    Cert {
        pem: c.cert_pem,
        key: c.key_pem,
    }
}

/// A certificate the CA signed with any subject (and optional URI SAN).
fn custom(fx: &Fixture, cn: &str, ou: Option<&str>, uri: Option<&str>) -> Cert {
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(&fx.pki.ca_key).expect("ca key")).expect("key");
    let issuer = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(&fx.pki.ca_cert).expect("ca"),
        ca_key,
    )
    .expect("issuer");
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(ou) = ou {
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, ou);
    }
    if let Some(uri) = uri {
        p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
    }
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).expect("sign");
    Cert {
        pem: cert.pem(),
        key: key.serialize_pem(),
    }
}

async fn client_as(fx: &Fixture, cert: &Cert) -> AdminServiceClient<Channel> {
    let ca = std::fs::read(&fx.pki.ca_cert).expect("ca");
    let channel = tls_channel(fx.addr, &ca, &cert.pem, &cert.key)
        .await
        .expect("connect");
    AdminServiceClient::new(channel)
}

/// Makes `call` as `c` with harmless arguments; `Err` only for the status.
async fn make(c: &mut AdminServiceClient<Channel>, call: &str) -> Result<(), tonic::Status> {
    let r = match call {
        "ListFleets" => c.list_fleets(pb::ListFleetsRequest {}).await.map(drop),
        "ListMinions" => c
            .list_minions(pb::ListMinionsRequest::default())
            .await
            .map(drop),
        "GetMinion" => c
            .get_minion(pb::GetMinionRequest {
                id: "m-none".into(),
            })
            .await
            .map(drop),
        "Explain" => c
            .explain(pb::ExplainRequest {
                fleet: "local".into(),
            })
            .await
            .map(drop),
        "WatchEvents" => c
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .map(drop),
        "Scale" => c
            .scale(pb::ScaleRequest {
                fleet: "local".into(),
                target: Some(pb::scale_request::Target::Auto(true)),
                until_unix_ms: None,
            })
            .await
            .map(drop),
        "Drain" => c
            .drain(pb::DrainRequest {
                id: "m-none".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "Pause" => c
            .pause(pb::PauseRequest {
                fleet: "local".into(),
            })
            .await
            .map(drop),
        "Resume" => c
            .resume(pb::ResumeRequest {
                fleet: "local".into(),
            })
            .await
            .map(drop),
        "WhoAmI" => c.who_am_i(pb::WhoAmIRequest {}).await.map(drop),
        "ControllerStatus" => c
            .controller_status(pb::ControllerStatusRequest {})
            .await
            .map(drop),
        "ForgetMinion" => c
            .forget_minion(pb::ForgetMinionRequest { id: "i-1".into() })
            .await
            .map(drop),
        other => panic!("no call {other}"),
    };
    // What the call did once allowed (NotFound for a minion that is not
    // there, Unavailable before the first decision) is not this test's.
    match r {
        Err(s) if s.code() == Code::PermissionDenied => Err(s),
        _ => Ok(()),
    }
}

#[tokio::test]
async fn every_admin_call_needs_its_role_and_changes_name_their_author() {
    let fx = start(&["i-1"]).await;
    let callers = [
        ("viewer", issued(&fx, "alice", Role::Viewer)),
        ("operator", issued(&fx, "bob", Role::Operator)),
        ("admin", issued(&fx, "carol", Role::Admin)),
        // Signed by the CA, but no [access] rule gives it a role.
        ("stranger", custom(&fx, "eve", Some("ops"), None)),
        // A minion's certificate, even with an admin OU.
        (
            "minion",
            custom(
                &fx,
                "i-1",
                Some("gru-admin"),
                Some("gru://fleet/local/instance/i-1"),
            ),
        ),
    ];
    // call, then allowed for viewer, operator, admin, stranger, minion.
    let table: &[(&str, [bool; 5])] = &[
        ("ListFleets", [true, true, true, false, false]),
        ("ListMinions", [true, true, true, false, false]),
        ("GetMinion", [true, true, true, false, false]),
        ("Explain", [true, true, true, false, false]),
        ("WatchEvents", [true, true, true, false, false]),
        ("Scale", [false, true, true, false, false]),
        ("Drain", [false, true, true, false, false]),
        ("Pause", [false, true, true, false, false]),
        ("Resume", [false, true, true, false, false]),
        ("WhoAmI", [true, true, true, true, true]),
        ("ControllerStatus", [true, true, true, false, false]),
        ("ForgetMinion", [false, false, true, false, false]),
    ];
    for (i, (who, cert)) in callers.iter().enumerate() {
        let mut c = client_as(&fx, cert).await;
        for (call, allowed) in table {
            match (make(&mut c, call).await, allowed[i]) {
                (Ok(()), true) => {}
                (Err(s), false) => {
                    let need = if ["Scale", "Drain", "Pause", "Resume"].contains(call) {
                        "operator"
                    } else if *call == "ForgetMinion" {
                        "admin"
                    } else {
                        "viewer"
                    };
                    assert!(
                        s.message()
                            .starts_with(&format!("{call} needs the {need} role; ")),
                        "{who} {call}: {}",
                        s.message()
                    );
                }
                (Ok(()), false) => panic!("{who} may call {call}, which it should not"),
                (Err(s), true) => panic!("{who} may not call {call}: {}", s.message()),
            }
        }
        let me = c
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .expect("whoami")
            .into_inner();
        let role = match *who {
            "stranger" | "minion" => "",
            r => r,
        };
        assert_eq!(me.role, role, "{who}: {me:?}");
        assert_eq!(
            me.allowed.len(),
            table.iter().filter(|(_, a)| a[i]).count() - 1,
            "{who}: {me:?}"
        );
    }

    // The audit trail: bob's (the operator's) pause and resume are in the
    // event log with his name, and nobody else's refused attempts are.
    let mut viewer = client_as(&fx, &callers[0].1).await;
    let events = logged_events(&mut viewer).await;
    let admin: Vec<_> = events.iter().filter(|e| e.kind == "admin").collect();
    let by = |actor: &str, what: &str| {
        admin
            .iter()
            .filter(|e| e.actor == actor && e.message.starts_with(what))
            .count()
    };
    assert_eq!(by("CN=bob", "paused"), 1, "{admin:#?}");
    assert_eq!(by("CN=bob", "resumed"), 1, "{admin:#?}");
    assert_eq!(by("CN=carol", "paused"), 1, "{admin:#?}");
    assert!(
        admin
            .iter()
            .all(|e| e.actor == "CN=bob" || e.actor == "CN=carol"),
        "{admin:#?}"
    );
}
