//! Joins with EC2 instance identity documents. A key and certificate made
//! with openssl stand in for AWS's signer of one region (AWS's own cannot
//! sign a test's documents); the documents are built and signed here as
//! IMDS would serve them.

use std::path::Path;
use std::process::Command;

use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;

use super::*;

const ACCOUNT: &str = "123456789012";
const REGION: &str = "eu-west-1";

/// An RSA key and a self-signed certificate for it, made by openssl in
/// `dir`: the test's stand-in for AWS's signer.
struct Signer {
    key: ring::signature::RsaKeyPair,
    cert: std::path::PathBuf,
}

fn signer(dir: &Path, name: &str) -> Signer {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-subj")
        .arg(format!("/CN=test stand-in for AWS {name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed (./scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pkcs8 = PrivatePkcs8KeyDer::from_pem_file(&key).expect("PKCS#8 key");
    Signer {
        key: ring::signature::RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()).expect("RSA key"),
        cert,
    }
}

impl Signer {
    /// The base64 RSA-SHA256 signature over `document`, as IMDS serves it.
    fn sign(&self, document: &str) -> String {
        use base64::Engine as _;
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                document.as_bytes(),
                &mut sig,
            )
            .expect("sign");
        base64::engine::general_purpose::STANDARD.encode(sig)
    }
}

/// A document as IMDS serves it (pretty-printed JSON).
fn document(account: &str, region: &str, instance: &str, pending_ago: Duration) -> String {
    let pending = jiff::Timestamp::now() - jiff::SignedDuration::try_from(pending_ago).unwrap();
    format!(
        "{{\n  \"accountId\" : \"{account}\",\n  \"architecture\" : \"x86_64\",\n  \"availabilityZone\" : \"{region}a\",\n  \"imageId\" : \"ami-0abc\",\n  \"instanceId\" : \"{instance}\",\n  \"instanceType\" : \"t3.micro\",\n  \"pendingTime\" : \"{}\",\n  \"privateIp\" : \"10.0.1.7\",\n  \"region\" : \"{region}\",\n  \"version\" : \"2017-09-30\"\n}}",
        pending.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
}

fn by_document(instance: &str, document: &str, signature: &str) -> pb::JoinRequest {
    let mut req = join_request("local", instance, "");
    req.identity = Some(pb::join_request::Identity::InstanceIdentity(
        pb::InstanceIdentity {
            document: document.to_owned(),
            signature: signature.to_owned(),
        },
    ));
    req
}

async fn security_events(fx: &Fixture) -> Vec<String> {
    logged_events(&mut fx.admin().await)
        .await
        .into_iter()
        .filter(|e| e.kind == "security")
        .map(|e| e.message)
        .collect()
}

#[tokio::test]
async fn identity_documents_are_checked_and_each_is_accepted_once() {
    let keys = tempfile::tempdir().expect("tempdir");
    let aws = signer(keys.path(), "eu-west-1");
    let impostor = signer(keys.path(), "impostor");
    let extra = format!(
        "[fleet.identity]\naccounts = [\"{ACCOUNT}\"]\nregion = \"{REGION}\"\nmax_age = \"5m\"\n\
         [[identity_signer]]\nregion = \"{REGION}\"\ncert = {:?}\n",
        aws.cert.display().to_string()
    );
    let fx = start_with(&["i-1", "i-2"], 0, 3, &extra).await;
    let mut c = fx.minion_client().await;
    let minute = Duration::from_secs(60);

    // Refused, each with its reason, and the controller keeps serving.
    let refused = [
        (
            "a forged signature",
            by_document(
                "i-1",
                &document(ACCOUNT, REGION, "i-1", minute),
                &impostor.sign(&document(ACCOUNT, REGION, "i-1", minute)),
            ),
            Code::Unauthenticated,
            "does not verify against region eu-west-1",
        ),
        (
            "a document changed after signing",
            {
                let signed = document(ACCOUNT, REGION, "i-1", minute);
                by_document(
                    "i-1",
                    &signed.replace("t3.micro", "t3.large"),
                    &aws.sign(&signed),
                )
            },
            Code::Unauthenticated,
            "does not verify",
        ),
        (
            "a region without a signer",
            {
                let d = document(ACCOUNT, "xx-nowhere-1", "i-1", minute);
                by_document("i-1", &d, &aws.sign(&d))
            },
            Code::Unauthenticated,
            "no signer certificate for region xx-nowhere-1",
        ),
        (
            "another region's signer (AWS's own us-east-1 certificate, shipped)",
            {
                let d = document(ACCOUNT, "us-east-1", "i-1", minute);
                by_document("i-1", &d, &aws.sign(&d))
            },
            Code::Unauthenticated,
            "does not verify against region us-east-1",
        ),
        (
            "another account",
            {
                let d = document("999999999999", REGION, "i-1", minute);
                by_document("i-1", &d, &aws.sign(&d))
            },
            Code::PermissionDenied,
            "account 999999999999 is not one of the fleet's accounts",
        ),
        (
            "another instance's document",
            {
                let d = document(ACCOUNT, REGION, "i-2", minute);
                by_document("i-1", &d, &aws.sign(&d))
            },
            Code::PermissionDenied,
            "the identity document is for i-2, the Join names i-1",
        ),
        (
            "a stale pendingTime",
            {
                let d = document(ACCOUNT, REGION, "i-1", Duration::from_secs(600));
                by_document("i-1", &d, &aws.sign(&d))
            },
            Code::PermissionDenied,
            "stale",
        ),
        (
            "an instance outside the group",
            {
                let d = document(ACCOUNT, REGION, "i-404", minute);
                by_document("i-404", &d, &aws.sign(&d))
            },
            Code::PermissionDenied,
            "instance i-404 is not in fleet \"local\"'s group",
        ),
        (
            "the join token on an identity fleet",
            join_request("local", "i-1", TOKEN),
            Code::PermissionDenied,
            "takes instance identity documents, not the join token",
        ),
    ];
    for (what, req, code, reason) in refused {
        let e = c.join(req).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(e.message().contains(reason), "{what}: {}", e.message());
    }

    // A good document joins, and gets the minion its certificate.
    let good = document(ACCOUNT, REGION, "i-1", minute);
    let joined = c
        .join(by_document("i-1", &good, &aws.sign(&good)))
        .await
        .expect("a valid document")
        .into_inner();
    assert!(joined.certificate.is_some());
    // The same document again (copied, replayed) is refused.
    let e = c
        .join(by_document("i-1", &good, &aws.sign(&good)))
        .await
        .expect_err("replay");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("already joined"), "{}", e.message());
    // The minion itself rejoins with its certificate.
    let mut rejoin = join_request("local", "i-1", "");
    rejoin.identity = Some(pb::join_request::Identity::Certificate(
        pb::MinionCertificate {},
    ));
    fx.session_client(&joined)
        .await
        .join(rejoin)
        .await
        .expect("rejoin with the certificate");
    // An admin's forget allows one more join with a document.
    let forgot = fx
        .admin()
        .await
        .forget_minion(pb::ForgetMinionRequest {
            id: joined.minion_id.clone(),
        })
        .await
        .expect("forget")
        .into_inner();
    assert_eq!(
        (forgot.instance_id.as_str(), forgot.forgotten),
        ("i-1", true)
    );
    c.join(by_document("i-1", &good, &aws.sign(&good)))
        .await
        .expect("a join after forget");
    c.join(by_document("i-1", &good, &aws.sign(&good)))
        .await
        .expect_err("and only one");

    // Every refusal is in the event log as a security event.
    let events = security_events(&fx).await;
    assert_eq!(events.len(), 11, "{events:#?}");
    assert!(
        events.iter().all(|e| e.starts_with("Join as i-")),
        "{events:#?}"
    );
}

#[tokio::test]
async fn a_token_fleet_refuses_documents() {
    let fx = start(&["i-1"]).await;
    let e = fx
        .minion_client()
        .await
        .join(by_document("i-1", "{}", "AAAA"))
        .await
        .expect_err("no [fleet.identity]");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("takes the join token"),
        "{}",
        e.message()
    );
}
