//! A throwaway certificate authority for `gru dev` and tests: a CA, a server
//! certificate for the controller, and a client certificate for the admin
//! CLI, made once and kept in a directory; and [`Ca`], which issues admin
//! certificates from a CA's certificate and key (`gru cert issue`) and, on
//! Join, each minion its own client certificate ([`Ca::issue_minion`]).

use std::path::{Path, PathBuf};

use crate::access::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to generate the {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: expected {what}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the files of a dev PKI live.
#[derive(Clone, Debug)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    /// The CA's key (owner-only), which `gru cert issue` signs with.
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
}

/// The name the server certificate is issued for; clients verify it.
pub const SERVER_NAME: &str = "localhost";

impl DevPki {
    pub fn in_dir(dir: &Path) -> Self {
        DevPki {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("controller.pem"),
            server_key: dir.join("controller.key"),
            admin_cert: dir.join("admin.pem"),
            admin_key: dir.join("admin.key"),
        }
    }

    /// Makes the files unless all of them exist already. Returns true when it
    /// made them. The CA's key is kept (owner-only) so that `gru cert issue`
    /// can sign more admin certificates; the admin certificate's OU is
    /// `gru-admin`, which the default `[access]` rules make an admin.
    pub fn ensure(&self) -> Result<bool, PkiError> {
        let all = [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
            &self.admin_cert,
            &self.admin_key,
        ];
        if all.iter().all(|p| p.exists()) {
            return Ok(false);
        }
        let generate = |what| move |source| PkiError::Generate { what, source };

        let ca_key = KeyPair::generate().map_err(generate("CA key"))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(generate("CA"))?;
        ca.distinguished_name
            .push(DnType::CommonName, "gru dev CA (throwaway)");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca
            .self_signed(&ca_key)
            .map_err(generate("CA certificate"))?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate().map_err(generate("server key"))?;
        let mut server = CertificateParams::new(vec![
            SERVER_NAME.to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .map_err(generate("server certificate"))?;
        server
            .distinguished_name
            .push(DnType::CommonName, "gru controller");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(generate("server certificate"))?;

        let admin_key = KeyPair::generate().map_err(generate("admin key"))?;
        let mut admin =
            CertificateParams::new(Vec::<String>::new()).map_err(generate("admin certificate"))?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "gru admin");
        admin.distinguished_name.push(
            DnType::OrganizationalUnitName,
            Role::Admin.organizational_unit(),
        );
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin
            .signed_by(&admin_key, &issuer)
            .map_err(generate("admin certificate"))?;

        write_file(&self.ca_cert, &ca_cert.pem(), false)?;
        write_file(&self.ca_key, &ca_key_pem, true)?;
        write_file(&self.server_cert, &server_cert.pem(), false)?;
        write_file(&self.server_key, &server_key.serialize_pem(), true)?;
        write_file(&self.admin_cert, &admin_cert.pem(), false)?;
        write_file(&self.admin_key, &admin_key.serialize_pem(), true)?;
        Ok(true)
    }
}

/// A CA that signs: its certificate and key, read from PEM files.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate [`Ca`] issued, and its new key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// When it stops being valid.
    pub not_after: jiff::Timestamp,
}

impl Ca {
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, PkiError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PkiError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let key = KeyPair::from_pem(&read(key)?).map_err(|source| PkiError::Parse {
            path: key.to_owned(),
            what: "a PEM private key",
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::Parse {
                path: cert.to_owned(),
                what: "a PEM CA certificate",
                source,
            })?;
        Ok(Ca { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// An admin client certificate for `name` (its CN) with `role` (its OU,
    /// `gru-<role>`), valid from a minute ago for `valid_for`.
    pub fn issue_admin(
        &self,
        name: &str,
        role: Role,
        valid_for: std::time::Duration,
    ) -> Result<Issued, PkiError> {
        let generate = |what| move |source| PkiError::Generate { what, source };
        let key = KeyPair::generate().map_err(generate("admin key"))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(generate("admin certificate"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.organizational_unit());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        // A minute of slack for clocks a little behind this one.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + valid_for;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("admin certificate"))?;
        let not_after = jiff::Timestamp::from_second(params.not_after.unix_timestamp())
            .unwrap_or(jiff::Timestamp::MAX);
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

/// The identity a minion's certificate carries, as a URI subject
/// alternative name.
pub fn minion_uri(fleet: &str, instance: &str) -> String {
    format!("gru://fleet/{fleet}/instance/{instance}")
}

/// The fleet and instance a [`minion_uri`] names.
pub fn parse_minion_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("gru://fleet/")?;
    let (fleet, instance) = rest.split_once("/instance/")?;
    (!fleet.is_empty() && !instance.is_empty() && !instance.contains('/'))
        .then_some((fleet, instance))
}

/// What may stand in a [`minion_uri`]: an instance id or fleet name of
/// letters, digits, `-`, `_` and `.` (EC2's `i-0abc…`, local `i-local-3`).
pub fn uri_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A certificate issued to a minion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinionCertificate {
    pub cert_pem: String,
    /// Unix seconds when it stops being valid.
    pub not_after_unix: i64,
}

impl Ca {
    /// Loads the CA in `cert`/`key`, or makes one there (the key owner-only)
    /// when neither file exists: the controller's own CA for minion
    /// certificates needs no set-up. One of the two alone is an error.
    pub fn load_or_create(cert: &Path, key: &Path, name: &str) -> Result<Ca, PkiError> {
        if !cert.exists() && !key.exists() {
            let generate = |what| move |source| PkiError::Generate { what, source };
            let ca_key = KeyPair::generate().map_err(generate("minion CA key"))?;
            let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(generate("CA"))?;
            ca.distinguished_name.push(DnType::CommonName, name);
            ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            ca.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = time::OffsetDateTime::now_utc();
            ca.not_before = now - time::Duration::minutes(1);
            ca.not_after = now + time::Duration::days(3650);
            let ca_cert = ca
                .self_signed(&ca_key)
                .map_err(generate("minion CA certificate"))?;
            if let Some(dir) = key.parent() {
                std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            write_file(key, &ca_key.serialize_pem(), true)?;
            write_file(cert, &ca_cert.pem(), false)?;
            tracing::info!(cert = %cert.display(), key = %key.display(), "made a CA for minion certificates");
        }
        Ca::load(cert, key)
    }

    /// A client certificate for the key in `csr_pem` (its signature is
    /// checked: the caller holds the key), naming `fleet` and `instance`
    /// in a [`minion_uri`] and as its CN; whatever else the request asks
    /// for is ignored. Valid from a minute ago for `lifetime`.
    pub fn issue_minion(
        &self,
        csr_pem: &str,
        fleet: &str,
        instance: &str,
        lifetime: std::time::Duration,
    ) -> Result<MinionCertificate, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("csr_pem is not a signed PEM certificate request: {e}"))?;
        let uri = minion_uri(fleet, instance);
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, instance);
        params.subject_alt_names = vec![SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|e| format!("{uri} is not a URI: {e}"))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let mut serial = rand::random::<[u8; 16]>();
        serial[0] &= 0x7f; // a positive integer
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        let not_after_unix = params.not_after.unix_timestamp();
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| format!("cannot sign the minion certificate: {e}"))?;
        Ok(MinionCertificate {
            cert_pem: signed.pem(),
            not_after_unix,
        })
    }
}

/// Writes `contents` to `path`, readable by the owner only when `secret`.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(path)?;
        f.write_all(contents.as_bytes())
    };
    write().map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })
}
