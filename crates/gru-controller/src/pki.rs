//! A throwaway certificate authority for `gru dev` and tests: a CA, a server
//! certificate for the controller, and a client certificate for the admin
//! CLI, made once and kept in a directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to generate the {what}")]
    Generate {
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
            server_cert: dir.join("controller.pem"),
            server_key: dir.join("controller.key"),
            admin_cert: dir.join("admin.pem"),
            admin_key: dir.join("admin.key"),
        }
    }

    /// Makes the files unless all of them exist already. Returns true when it
    /// made them. The CA's private key is never written: nothing else is ever
    /// signed by it.
    pub fn ensure(&self) -> Result<bool, PkiError> {
        let all = [
            &self.ca_cert,
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
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin
            .signed_by(&admin_key, &issuer)
            .map_err(generate("admin certificate"))?;

        write_file(&self.ca_cert, &ca_cert.pem(), false)?;
        write_file(&self.server_cert, &server_cert.pem(), false)?;
        write_file(&self.server_key, &server_key.serialize_pem(), true)?;
        write_file(&self.admin_cert, &admin_cert.pem(), false)?;
        write_file(&self.admin_key, &admin_key.serialize_pem(), true)?;
        Ok(true)
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
