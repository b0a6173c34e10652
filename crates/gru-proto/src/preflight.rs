//! What `--check-config` checks beyond the config's own values, for the
//! controller and the minion alike: that the files a process will read are
//! there, that the directories it will write can be made, and that no two
//! of its listeners want the same address. Nothing is started or created.

use std::net::SocketAddr;
use std::path::Path;

/// `Err(why)` unless `path` is a file this process can open for reading.
pub fn readable(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{} is a directory", path.display()));
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `Err(why)` unless `path` is a directory, or could be created as one (its
/// nearest existing ancestor is a directory).
pub fn directory(path: &Path) -> Result<(), String> {
    let mut at = Some(path);
    while let Some(p) = at {
        if p.exists() {
            return if p.is_dir() {
                Ok(())
            } else if p == path {
                Err(format!("{} exists and is not a directory", path.display()))
            } else {
                Err(format!(
                    "cannot create {}: {} is not a directory",
                    path.display(),
                    p.display()
                ))
            };
        }
        at = p.parent().filter(|p| !p.as_os_str().is_empty());
    }
    // A relative path with no existing ancestor is made in the working
    // directory, which exists.
    Ok(())
}

/// Whether two listeners would fight over one port: the same non-zero port,
/// on the same address or where either takes every address.
pub fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Every listener whose address clashes with one named before it, as
/// `(key, earlier key, address)`.
pub fn clashes<'a>(listeners: &[(&'a str, SocketAddr)]) -> Vec<(&'a str, &'a str, SocketAddr)> {
    let mut found = Vec::new();
    for (i, (key, addr)) in listeners.iter().enumerate() {
        if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| clash(*a, *addr)) {
            found.push((*key, *other, *addr));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ports_clash_on_the_same_or_a_wildcard_address_never_on_port_zero() {
        assert!(clash(a("127.0.0.1:7070"), a("127.0.0.1:7070")));
        assert!(clash(a("0.0.0.0:7070"), a("127.0.0.1:7070")));
        assert!(!clash(a("127.0.0.1:7070"), a("127.0.0.2:7070")));
        assert!(!clash(a("127.0.0.1:7070"), a("127.0.0.1:7071")));
        assert!(!clash(a("127.0.0.1:0"), a("127.0.0.1:0")));
        let found = clashes(&[
            ("listen", a("0.0.0.0:7070")),
            ("metrics_listen", a("127.0.0.1:9464")),
            ("fleet[0].local.listen", a("127.0.0.1:7070")),
        ]);
        assert_eq!(
            found,
            vec![("fleet[0].local.listen", "listen", a("127.0.0.1:7070"))]
        );
    }

    #[test]
    fn files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(readable(&file).is_ok());
        assert!(readable(dir.path()).unwrap_err().contains("is a directory"));
        let missing = dir.path().join("nope");
        assert!(readable(&missing).unwrap_err().contains("cannot read"));
        assert!(directory(dir.path()).is_ok());
        assert!(directory(&dir.path().join("a/b/c")).is_ok(), "can be made");
        assert!(directory(&file).unwrap_err().contains("not a directory"));
        assert!(
            directory(&file.join("sub"))
                .unwrap_err()
                .contains("is not a directory")
        );
    }
}
