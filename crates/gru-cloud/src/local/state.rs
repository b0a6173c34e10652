//! The state file of local groups whose instances outlive their controller
//! (see [`LaunchSpec::state_file`](super::LaunchSpec::state_file)).
//!
//! One JSON document per file, shared by every group that names it:
//!
//! ```json
//! { "version": 1, "boot_id": "5f51…", "next_instance": 7,
//!   "groups": { "local": [ { "id": "i-local-0005", "number": 5, "pid": 4242,
//!     "start_time": 987654, "launched_at_ms": 1767225600000, "terminating": false } ] } }
//! ```
//!
//! `next_instance` is shared by the groups of the file, so no two of them
//! ever hand out the same instance id, before or after a restart. Every
//! write replaces the file by renaming a complete, synced temporary file
//! over it, so a controller killed mid-write leaves the old or the new
//! document, never a torn one. A file that cannot be read or is of a newer
//! format is reported and never overwritten.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::sys;

/// The format this code writes and the newest it reads.
const FORMAT_VERSION: u32 = 1;

/// Serializes every read-modify-write of a state file in this process, so
/// two groups sharing a file never lose each other's update.
static FILE_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("failed to read local group state file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("local group state file {} is not valid", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "local group state file {} has format version {found}; this gru reads up to {FORMAT_VERSION}",
        path.display()
    )]
    Version { path: PathBuf, found: u32 },
    #[error("failed to write local group state file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    version: u32,
    /// The boot the pids below belong to: after a reboot none of them is
    /// ours, whatever process now has that number.
    boot_id: Option<String>,
    /// No instance of any group of this file ever had this number or a
    /// higher one. Kept across reboots: ids are never reused.
    next_instance: u64,
    #[serde(default)]
    groups: BTreeMap<String, Vec<Record>>,
}

/// One running instance of a group, as the file remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    pub id: String,
    /// The instance number in `id`; orders instances by launch.
    pub number: u64,
    pub pid: u32,
    /// `/proc/<pid>/stat` start time: only a process with this pid *and*
    /// this start time is the instance (pids are recycled).
    pub start_time: u64,
    pub launched_at_ms: u64,
    /// Termination had begun: a restarted group finishes it.
    pub terminating: bool,
}

impl Record {
    pub fn launched_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.launched_at_ms)
    }
}

/// Milliseconds since the Unix epoch, for [`Record::launched_at_ms`].
pub(super) fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a group finds in the file when it starts.
#[derive(Debug, Default)]
pub(super) struct Loaded {
    /// The first instance number the group may use.
    pub next_instance: u64,
    /// The group's instances recorded in this boot; whether each still runs
    /// is for the caller to check.
    pub records: Vec<Record>,
}

#[derive(Clone, Debug)]
pub(super) struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `group`'s part of the file; a missing file is an empty one.
    pub fn load(&self, group: &str) -> Result<Loaded, StateFileError> {
        let _io = FILE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let mut doc = self.read()?;
        let records = if doc.boot_id.is_some() && doc.boot_id == sys::boot_id() {
            doc.groups.remove(group).unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(Loaded {
            next_instance: doc.next_instance,
            records,
        })
    }

    /// Replaces `group`'s records, raises `next_instance` to at least the
    /// given one, and replaces the file atomically.
    pub fn save(
        &self,
        group: &str,
        next_instance: u64,
        records: &[Record],
    ) -> Result<(), StateFileError> {
        let _io = FILE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let mut doc = self.read()?;
        let boot_id = sys::boot_id();
        if doc.boot_id != boot_id {
            // Every process recorded in an earlier boot is gone.
            doc.groups.clear();
            doc.boot_id = boot_id;
        }
        doc.version = FORMAT_VERSION;
        doc.next_instance = doc.next_instance.max(next_instance);
        if records.is_empty() {
            doc.groups.remove(group);
        } else {
            doc.groups.insert(group.to_owned(), records.to_vec());
        }
        self.write(&doc).map_err(|source| StateFileError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn read(&self) -> Result<Document, StateFileError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Document::default()),
            Err(source) => {
                return Err(StateFileError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let doc: Document =
            serde_json::from_str(&text).map_err(|source| StateFileError::Parse {
                path: self.path.clone(),
                source,
            })?;
        if doc.version > FORMAT_VERSION {
            return Err(StateFileError::Version {
                path: self.path.clone(),
                found: doc.version,
            });
        }
        Ok(doc)
    }

    /// Writes a temporary file beside the target, syncs it and renames it
    /// over the target: a crash at any point leaves one whole document.
    fn write(&self, doc: &Document) -> io::Result<()> {
        let name = self
            .path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = self.path.with_file_name(tmp_name);
        let mut json = serde_json::to_vec_pretty(doc).map_err(io::Error::other)?;
        json.push(b'\n');
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        // Make the rename itself durable (a power cut, not just a kill).
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(number: u64) -> Record {
        Record {
            id: format!("i-local-{number:04}"),
            number,
            pid: 4242,
            start_time: 99,
            launched_at_ms: 1_767_225_600_000,
            terminating: false,
        }
    }

    #[test]
    fn groups_share_the_file_and_its_instance_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("local.json"));
        let empty = file.load("a").unwrap();
        assert_eq!(empty.next_instance, 0);
        assert!(empty.records.is_empty());

        file.save("a", 3, &[record(1), record(2)]).unwrap();
        file.save("b", 5, &[record(4)]).unwrap();
        // A lower number from a group that started earlier never lowers it.
        file.save("a", 2, &[record(2)]).unwrap();

        let a = file.load("a").unwrap();
        assert_eq!(a.next_instance, 5);
        assert_eq!(a.records, vec![record(2)]);
        assert_eq!(file.load("b").unwrap().records, vec![record(4)]);

        file.save("a", 0, &[]).unwrap();
        assert!(file.load("a").unwrap().records.is_empty());
        assert_eq!(file.load("a").unwrap().next_instance, 5);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn records_of_another_boot_are_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("local.json"));
        file.save("a", 3, &[record(2)]).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        let mut doc: Document = serde_json::from_str(&text).unwrap();
        doc.boot_id = Some("another-boot".to_owned());
        fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();

        let loaded = file.load("a").unwrap();
        assert!(loaded.records.is_empty());
        assert_eq!(loaded.next_instance, 3, "numbers are kept across boots");
    }

    #[test]
    fn a_bad_or_newer_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("local.json"));
        fs::write(file.path(), "{ not json").unwrap();
        assert!(matches!(file.load("a"), Err(StateFileError::Parse { .. })));
        assert!(matches!(
            file.save("a", 1, &[]),
            Err(StateFileError::Parse { .. })
        ));
        assert_eq!(fs::read_to_string(file.path()).unwrap(), "{ not json");

        fs::write(
            file.path(),
            r#"{"version": 2, "next_instance": 1, "groups": {}}"#,
        )
        .unwrap();
        assert!(matches!(
            file.load("a"),
            Err(StateFileError::Version { found: 2, .. })
        ));
    }
}
