//! EC2 instance identity documents: how a minion on AWS proves which
//! instance it is without a shared secret.
//!
//! The agent reads the document and its base64 RSA-SHA256 signature
//! (`/latest/dynamic/instance-identity/signature`) from IMDSv2 and sends
//! both in Join. The controller checks the signature against the public
//! certificate AWS publishes for the document's region (configured as
//! `[[identity_signer]]`), then the document against the fleet's rules
//! (`[fleet.identity]`): its account, its region, and a `pendingTime`
//! recent enough that an old document cannot be replayed later. That the
//! instance is in the fleet's group, and that it has not joined before, the
//! Join handler checks with the cloud and the store.
//!
//! AWS's certificates for every region it published are shipped
//! ([`AWS_SIGNERS`]); `[[identity_signer]]` adds more (a new region, a
//! rotation, a test's own signer).
//!
//! The `/signature` form is the one used because it verifies with `ring`
//! (already in the tree through rustls) and no PKCS#7 parser: a plain
//! RSA PKCS#1 v1.5 SHA-256 signature over the document's bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

/// The fields of an instance identity document gru reads (AWS adds more).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDocument {
    pub account_id: String,
    pub region: String,
    pub instance_id: String,
    /// When the instance was launched (or last started), RFC 3339.
    pub pending_time: String,
    #[serde(default)]
    pub availability_zone: String,
}

/// Why a document is not accepted. Each says what to look at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the identity document is not one: {0}")]
    Malformed(String),
    #[error(
        "no signer certificate for region {0} ([[identity_signer]] in the controller's config)"
    )]
    UnknownRegion(String),
    #[error("the identity document's signature does not verify against region {0}'s certificate")]
    BadSignature(String),
    #[error("account {account} is not one of the fleet's accounts ({allowed})")]
    Account { account: String, allowed: String },
    #[error("the instance is in region {found}, the fleet in {expected}")]
    Region { found: String, expected: String },
    #[error(
        "the identity document is stale: pendingTime {pending} is {age_secs} s ago, more than the {max_secs} s allowed ([fleet.identity] max_age)"
    )]
    Stale {
        pending: String,
        age_secs: i64,
        max_secs: u64,
    },
    #[error("the identity document is for {document}, the Join names {claimed}")]
    Instance { document: String, claimed: String },
}

/// AWS's RSA certificates for the base64 signature of instance identity
/// documents, per region, as AWS publishes them ("AWS public certificates
/// for instance identity document signatures", EC2 User Guide). Each is
/// self-signed; a unit test checks every signature.
pub const AWS_SIGNERS: &[(&str, &str)] = &[
    ("af-south-1", include_str!("../aws-identity/af-south-1.pem")),
    ("ap-east-1", include_str!("../aws-identity/ap-east-1.pem")),
    (
        "ap-northeast-1",
        include_str!("../aws-identity/ap-northeast-1.pem"),
    ),
    (
        "ap-northeast-2",
        include_str!("../aws-identity/ap-northeast-2.pem"),
    ),
    (
        "ap-northeast-3",
        include_str!("../aws-identity/ap-northeast-3.pem"),
    ),
    ("ap-south-1", include_str!("../aws-identity/ap-south-1.pem")),
    ("ap-south-2", include_str!("../aws-identity/ap-south-2.pem")),
    (
        "ap-southeast-1",
        include_str!("../aws-identity/ap-southeast-1.pem"),
    ),
    (
        "ap-southeast-2",
        include_str!("../aws-identity/ap-southeast-2.pem"),
    ),
    (
        "ap-southeast-3",
        include_str!("../aws-identity/ap-southeast-3.pem"),
    ),
    (
        "ap-southeast-4",
        include_str!("../aws-identity/ap-southeast-4.pem"),
    ),
    (
        "ap-southeast-5",
        include_str!("../aws-identity/ap-southeast-5.pem"),
    ),
    (
        "ap-southeast-7",
        include_str!("../aws-identity/ap-southeast-7.pem"),
    ),
    (
        "ca-central-1",
        include_str!("../aws-identity/ca-central-1.pem"),
    ),
    ("ca-west-1", include_str!("../aws-identity/ca-west-1.pem")),
    ("cn-north-1", include_str!("../aws-identity/cn-north-1.pem")),
    (
        "cn-northwest-1",
        include_str!("../aws-identity/cn-northwest-1.pem"),
    ),
    (
        "eu-central-1",
        include_str!("../aws-identity/eu-central-1.pem"),
    ),
    (
        "eu-central-2",
        include_str!("../aws-identity/eu-central-2.pem"),
    ),
    ("eu-north-1", include_str!("../aws-identity/eu-north-1.pem")),
    ("eu-south-1", include_str!("../aws-identity/eu-south-1.pem")),
    ("eu-south-2", include_str!("../aws-identity/eu-south-2.pem")),
    ("eu-west-1", include_str!("../aws-identity/eu-west-1.pem")),
    ("eu-west-2", include_str!("../aws-identity/eu-west-2.pem")),
    ("eu-west-3", include_str!("../aws-identity/eu-west-3.pem")),
    (
        "il-central-1",
        include_str!("../aws-identity/il-central-1.pem"),
    ),
    (
        "me-central-1",
        include_str!("../aws-identity/me-central-1.pem"),
    ),
    ("me-south-1", include_str!("../aws-identity/me-south-1.pem")),
    (
        "mx-central-1",
        include_str!("../aws-identity/mx-central-1.pem"),
    ),
    ("sa-east-1", include_str!("../aws-identity/sa-east-1.pem")),
    ("us-east-1", include_str!("../aws-identity/us-east-1.pem")),
    ("us-east-2", include_str!("../aws-identity/us-east-2.pem")),
    (
        "us-gov-east-1",
        include_str!("../aws-identity/us-gov-east-1.pem"),
    ),
    (
        "us-gov-west-1",
        include_str!("../aws-identity/us-gov-west-1.pem"),
    ),
    ("us-west-1", include_str!("../aws-identity/us-west-1.pem")),
    ("us-west-2", include_str!("../aws-identity/us-west-2.pem")),
];

/// AWS's public certificates (RSA public keys) per region.
#[derive(Clone, Debug, Default)]
pub struct Signers {
    by_region: BTreeMap<String, Vec<Vec<u8>>>,
}

impl Signers {
    /// Adds the RSA public key of the PEM certificate `pem` as a signer for
    /// `region`. A region may have several (during AWS's rotations).
    pub fn add_pem(&mut self, region: &str, pem: &[u8]) -> Result<(), String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem)
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        let spki = cert.public_key();
        if spki.algorithm.algorithm != x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
            return Err("not an RSA certificate (the /signature form is RSA-SHA256)".into());
        }
        self.by_region
            .entry(region.to_owned())
            .or_default()
            .push(spki.subject_public_key.data.to_vec());
        Ok(())
    }

    /// The certificates AWS publishes ([`AWS_SIGNERS`]).
    pub fn aws() -> Signers {
        let mut s = Signers::default();
        for (region, pem) in AWS_SIGNERS {
            if let Err(e) = s.add_pem(region, pem.as_bytes()) {
                // The unit tests load every one: not reached.
                tracing::error!(region, "shipped identity signer does not load: {e}");
            }
        }
        s
    }

    /// Whether some certificate verifies documents of `region`.
    pub fn has(&self, region: &str) -> bool {
        self.by_region.contains_key(region)
    }

    pub fn is_empty(&self) -> bool {
        self.by_region.is_empty()
    }

    /// Checks `signature_b64` over `document` with the signers of the
    /// document's own region, and returns the document.
    pub fn verify(&self, document: &str, signature_b64: &str) -> Result<IdentityDocument, Refusal> {
        let doc: IdentityDocument = serde_json::from_str(document)
            .map_err(|e| Refusal::Malformed(format!("not its JSON: {e}")))?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature_b64.split_whitespace().collect::<String>())
            .map_err(|e| Refusal::Malformed(format!("the signature is not base64: {e}")))?;
        let keys = self
            .by_region
            .get(&doc.region)
            .ok_or_else(|| Refusal::UnknownRegion(doc.region.clone()))?;
        let verified = keys.iter().any(|key| {
            ring::signature::UnparsedPublicKey::new(
                // AWS's /signature certificates hold 1024-bit keys in older
                // regions: accept 1024 bits and up.
                &ring::signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
                key,
            )
            .verify(document.as_bytes(), &signature)
            .is_ok()
        });
        if !verified {
            return Err(Refusal::BadSignature(doc.region));
        }
        Ok(doc)
    }
}

/// What a fleet accepts (`[fleet.identity]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityRules {
    /// AWS accounts whose instances may join.
    pub accounts: Vec<String>,
    /// The region the fleet runs in.
    pub region: String,
    /// How old `pendingTime` may be.
    pub max_age: Duration,
}

/// The default `[fleet.identity] max_age`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);

impl IdentityRules {
    /// Checks a verified document for the Join of `claimed` at `now`.
    pub fn check(
        &self,
        doc: &IdentityDocument,
        claimed: &str,
        now: jiff::Timestamp,
    ) -> Result<(), Refusal> {
        if doc.instance_id != claimed {
            return Err(Refusal::Instance {
                document: doc.instance_id.clone(),
                claimed: claimed.to_owned(),
            });
        }
        if !self.accounts.contains(&doc.account_id) {
            return Err(Refusal::Account {
                account: doc.account_id.clone(),
                allowed: self.accounts.join(", "),
            });
        }
        if doc.region != self.region {
            return Err(Refusal::Region {
                found: doc.region.clone(),
                expected: self.region.clone(),
            });
        }
        let pending: jiff::Timestamp = doc
            .pending_time
            .parse()
            .map_err(|e| Refusal::Malformed(format!("pendingTime {:?}: {e}", doc.pending_time)))?;
        let age = now.as_second() - pending.as_second();
        // A minute of clock skew the other way is tolerated.
        if age > self.max_age.as_secs() as i64 || age < -60 {
            return Err(Refusal::Stale {
                pending: doc.pending_time.clone(),
                age_secs: age,
                max_secs: self.max_age.as_secs(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> IdentityRules {
        IdentityRules {
            accounts: vec!["123456789012".into()],
            region: "eu-west-1".into(),
            max_age: DEFAULT_MAX_AGE,
        }
    }

    fn doc(pending: &str) -> IdentityDocument {
        IdentityDocument {
            account_id: "123456789012".into(),
            region: "eu-west-1".into(),
            instance_id: "i-0abc".into(),
            pending_time: pending.into(),
            availability_zone: "eu-west-1a".into(),
        }
    }

    #[test]
    fn a_document_is_checked_against_the_fleets_rules() {
        let now: jiff::Timestamp = "2026-12-04T10:05:00Z".parse().unwrap();
        let r = rules();
        assert_eq!(r.check(&doc("2026-12-04T10:01:00Z"), "i-0abc", now), Ok(()));
        assert!(matches!(
            r.check(&doc("2026-12-04T09:59:59Z"), "i-0abc", now),
            Err(Refusal::Stale { age_secs: 301, .. })
        ));
        assert!(matches!(
            r.check(&doc("2026-12-04T10:01:00Z"), "i-0def", now),
            Err(Refusal::Instance { .. })
        ));
        let mut other = doc("2026-12-04T10:01:00Z");
        other.account_id = "999999999999".into();
        assert_eq!(
            r.check(&other, "i-0abc", now).unwrap_err().to_string(),
            "account 999999999999 is not one of the fleet's accounts (123456789012)"
        );
        let mut other = doc("2026-12-04T10:01:00Z");
        other.region = "us-east-1".into();
        assert!(matches!(
            r.check(&other, "i-0abc", now),
            Err(Refusal::Region { .. })
        ));
        assert!(matches!(
            r.check(&doc("yesterday"), "i-0abc", now),
            Err(Refusal::Malformed(_))
        ));
    }

    /// Every shipped certificate is an RSA certificate whose own key
    /// verifies its signature: none was damaged on the way in.
    #[test]
    fn every_shipped_aws_certificate_is_intact() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        use x509_parser::oid_registry::{OID_PKCS1_SHA1WITHRSA, OID_PKCS1_SHA256WITHRSA};
        assert!(AWS_SIGNERS.len() >= 30, "{} regions", AWS_SIGNERS.len());
        for (region, pem) in AWS_SIGNERS {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect(region);
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect(region);
            let alg = &cert.signature_algorithm.algorithm;
            let scheme: &dyn ring::signature::VerificationAlgorithm =
                if *alg == OID_PKCS1_SHA256WITHRSA {
                    &ring::signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY
                } else if *alg == OID_PKCS1_SHA1WITHRSA {
                    &ring::signature::RSA_PKCS1_1024_8192_SHA1_FOR_LEGACY_USE_ONLY
                } else {
                    panic!("{region}: signed with {alg}");
                };
            ring::signature::UnparsedPublicKey::new(
                scheme,
                cert.public_key().subject_public_key.data.as_ref(),
            )
            .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
            .unwrap_or_else(|_| panic!("{region}: the certificate's signature does not verify"));
        }
        let aws = Signers::aws();
        for region in ["us-east-1", "eu-west-1", "ap-southeast-2", "us-gov-west-1"] {
            assert!(aws.has(region), "{region}");
        }
        assert!(!aws.has("xx-nowhere-1"));
    }

    #[test]
    fn garbage_is_refused_without_a_panic() {
        let s = Signers::default();
        assert!(matches!(s.verify("{", "AAAA"), Err(Refusal::Malformed(_))));
        let d = r#"{"accountId":"1","region":"xx-1","instanceId":"i-1","pendingTime":"2026-01-01T00:00:00Z"}"#;
        assert!(matches!(s.verify(d, "***"), Err(Refusal::Malformed(_))));
        assert_eq!(
            s.verify(d, "AAAA"),
            Err(Refusal::UnknownRegion("xx-1".into()))
        );
        let mut s = Signers::default();
        assert!(s.add_pem("xx-1", b"not pem").is_err());
    }
}
