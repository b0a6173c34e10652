//! The durable queue: a segmented write-ahead log in one directory.
//!
//! Why a log of our own rather than an embedded store: the engine needs
//! exactly append, "this destination is done", and replay-on-start, with one
//! fsync covering every message that arrived while the previous fsync ran.
//! A store (sled, redb, fjall) would add a B-tree or LSM, its own background
//! threads and compaction, and its own durability knobs to get right, for a
//! queue whose records are written once and read only after a crash. The
//! format fits in a page of code and its recovery rule is one sentence.
//!
//! Format: segment files `<seq>.wal` (zero-padded, increasing). Each record
//! is `len: u32 LE, crc32(body): u32 LE, body`; the body is a kind byte and a
//! message id (u64 LE), then the raw inbound message (`APPEND`), a
//! destination index (`DONE`, u32 LE) or nothing (`FINISHED`). Reading stops
//! at the first record that is short or fails its checksum: a torn tail from
//! a crash mid-write, which was never acknowledged.
//!
//! One writer thread owns the files. It takes every operation waiting in its
//! channel, writes them, and calls `fdatasync` once if any of them is an
//! `APPEND` whose sender waits (group commit); only then are those appends
//! confirmed. `DONE`/`FINISHED` records ride along unsynced: losing one in a
//! crash means a duplicate delivery, never a loss. When the current segment
//! passes its size limit a new one starts; a segment is deleted once it and
//! every older one hold no unfinished message.
//!
//! On open, every segment is read, the unfinished messages (with the
//! destinations already done) are rewritten into a fresh segment, synced, and
//! the old segments deleted: the log restarts compact. A crash during that
//! rewrite leaves both copies; ids make replay idempotent.
//!
//! A message some destination gave up on is never marked finished: it stays
//! in the log (and keeps its segment and every later one from being deleted)
//! until the next start replays it to the destinations still missing it.
//!
//! One engine per directory: nothing here locks it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// Default segment size before rolling over to a new file.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Most operations written per fsync.
const MAX_BATCH: usize = 4096;

const APPEND: u8 = 1;
const DONE: u8 = 2;
const FINISHED: u8 = 3;
const HEADER: usize = 8;

/// A message found unfinished in the log on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its log id.
    pub id: u64,
    /// The message as received.
    pub payload: Bytes,
    /// Destination indexes that already ACKed it.
    pub done: BTreeSet<u32>,
}

enum Op {
    Append {
        id: u64,
        payload: Bytes,
        synced: oneshot::Sender<io::Result<()>>,
    },
    Done {
        id: u64,
        destination: u32,
    },
    Finished {
        id: u64,
    },
    /// Flush, sync and exit.
    Close,
    /// Exit without flushing buffered records, as a crash would.
    Halt,
}

/// Handle to the writer thread.
pub struct Wal {
    ops: mpsc::Sender<Op>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").finish_non_exhaustive()
    }
}

/// What [`Wal::open`] found.
pub struct Opened {
    /// The log, ready for appends.
    pub wal: Wal,
    /// Unfinished messages, oldest first.
    pub pending: Vec<Pending>,
    /// The first id free for new messages.
    pub next_id: u64,
}

impl Wal {
    /// Opens (creating) the log in `dir`, replays it and starts the writer.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<Opened> {
        fs::create_dir_all(dir)?;
        let mut segments = list_segments(dir)?;
        segments.sort();
        let mut messages: BTreeMap<u64, Pending> = BTreeMap::new();
        let mut max_id = 0u64;
        for (_, path) in &segments {
            let data = fs::read(path)?;
            for (kind, id, rest) in Records::new(&data) {
                max_id = max_id.max(id);
                match kind {
                    APPEND => {
                        messages.entry(id).or_insert_with(|| Pending {
                            id,
                            payload: Bytes::copy_from_slice(rest),
                            done: BTreeSet::new(),
                        });
                    }
                    DONE if rest.len() == 4 => {
                        let d = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                        if let Some(m) = messages.get_mut(&id) {
                            m.done.insert(d);
                        }
                    }
                    FINISHED => {
                        messages.remove(&id);
                    }
                    _ => {}
                }
            }
        }
        let seq = segments.last().map_or(1, |(s, _)| s + 1);
        let path = segment_path(dir, seq);
        let mut out = BufWriter::new(create(&path)?);
        let mut live = HashMap::new();
        for m in messages.values() {
            write_record(&mut out, APPEND, m.id, &m.payload)?;
            for d in &m.done {
                write_record(&mut out, DONE, m.id, &d.to_le_bytes())?;
            }
            live.insert(m.id, seq);
        }
        out.flush()?;
        out.get_ref().sync_data()?;
        for (_, old) in &segments {
            fs::remove_file(old)?;
        }
        sync_dir(dir)?;
        let pending: Vec<Pending> = messages.into_values().collect();
        debug!(dir = %dir.display(), pending = pending.len(), "durable queue opened");
        let mut writer = Writer {
            dir: dir.to_owned(),
            segment_bytes,
            seq,
            out,
            written: 0,
            live,
            live_per_segment: BTreeMap::from([(seq, pending.len() as u64)]),
        };
        writer.written = writer.out.get_ref().metadata()?.len();
        let (ops, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("gru-wal".to_owned())
            .spawn(move || writer.run(rx))?;
        Ok(Opened {
            wal: Wal {
                ops,
                thread: std::sync::Mutex::new(Some(thread)),
            },
            pending,
            next_id: max_id + 1,
        })
    }

    /// Appends a message and resolves once it is on disk.
    pub async fn append(&self, id: u64, payload: Bytes) -> io::Result<()> {
        let (synced, rx) = oneshot::channel();
        self.ops
            .send(Op::Append {
                id,
                payload,
                synced,
            })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Appends a message without waiting for the disk: it is written, and
    /// synced with its batch, before any later record (so before its own
    /// `DONE`), but the caller does not learn when. For senders that get no
    /// ACK anyway.
    pub fn append_unconfirmed(&self, id: u64, payload: Bytes) -> io::Result<()> {
        let (synced, _) = oneshot::channel();
        self.ops
            .send(Op::Append {
                id,
                payload,
                synced,
            })
            .map_err(|_| stopped())
    }

    /// Records that `destination` ACKed message `id` (not synced on its own).
    pub fn done(&self, id: u64, destination: u32) {
        let _ = self.ops.send(Op::Done { id, destination });
    }

    /// Records that every destination of `id` is done with it.
    pub fn finished(&self, id: u64) {
        let _ = self.ops.send(Op::Finished { id });
    }

    /// Stops the writer after what it already took, flushing (`clean`) or
    /// dropping (a simulated crash) its unsynced buffer, and waits for it.
    pub fn close(&self, clean: bool) {
        let _ = self.ops.send(if clean { Op::Close } else { Op::Halt });
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn stopped() -> io::Error {
    io::Error::other("durable queue writer stopped")
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    seq: u64,
    out: BufWriter<File>,
    written: u64,
    /// Unfinished message id → the segment holding its APPEND.
    live: HashMap<u64, u64>,
    /// Segment → unfinished messages appended in it.
    live_per_segment: BTreeMap<u64, u64>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let mut waiters = Vec::new();
            let mut halt = false;
            let mut close = false;
            let mut result: io::Result<()> = Ok(());
            for op in batch {
                let r = match op {
                    Op::Append {
                        id,
                        payload,
                        synced,
                    } => {
                        waiters.push(synced);
                        let r = self.write(APPEND, id, &payload);
                        if r.is_ok() {
                            self.live.insert(id, self.seq);
                            *self.live_per_segment.entry(self.seq).or_default() += 1;
                        }
                        r
                    }
                    Op::Done { id, destination } => {
                        self.write(DONE, id, &destination.to_le_bytes())
                    }
                    Op::Finished { id } => {
                        if let Some(seq) = self.live.remove(&id)
                            && let Some(n) = self.live_per_segment.get_mut(&seq)
                        {
                            *n = n.saturating_sub(1);
                        }
                        self.write(FINISHED, id, &[])
                    }
                    Op::Close => {
                        close = true;
                        break;
                    }
                    Op::Halt => {
                        halt = true;
                        break;
                    }
                };
                if result.is_ok() {
                    result = r;
                }
            }
            if halt {
                // Drop the buffer unflushed: whatever was not synced is lost,
                // as in a crash. Synced appends were all confirmed earlier.
                let (_file, _unflushed) = self.out.into_parts();
                return;
            }
            if result.is_ok() {
                result = self.out.flush();
            }
            if result.is_ok() && !waiters.is_empty() {
                result = self.out.get_ref().sync_data();
            }
            if !close && let Err(e) = self.maintain() {
                warn!(error = %e, "durable queue segment maintenance failed");
            }
            for w in waiters {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                let _ = w.send(r);
            }
            if let Err(e) = result {
                warn!(error = %e, "durable queue write failed");
            }
            if close {
                break;
            }
        }
        let _ = self.out.flush();
        let _ = self.out.get_ref().sync_data();
    }

    fn write(&mut self, kind: u8, id: u64, rest: &[u8]) -> io::Result<()> {
        self.written += write_record(&mut self.out, kind, id, rest)?;
        Ok(())
    }

    /// Rolls to a new segment when the current one is full and deletes old
    /// segments that hold nothing unfinished.
    fn maintain(&mut self) -> io::Result<()> {
        if self.written >= self.segment_bytes {
            self.out.flush()?;
            self.out.get_ref().sync_data()?;
            self.seq += 1;
            self.out = BufWriter::new(create(&segment_path(&self.dir, self.seq))?);
            self.written = 0;
            self.live_per_segment.entry(self.seq).or_default();
            sync_dir(&self.dir)?;
        }
        while let Some((&oldest, &n)) = self.live_per_segment.first_key_value() {
            if oldest == self.seq || n > 0 {
                break;
            }
            self.live_per_segment.remove(&oldest);
            match fs::remove_file(segment_path(&self.dir, oldest)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn write_record(out: &mut impl Write, kind: u8, id: u64, rest: &[u8]) -> io::Result<u64> {
    // The body is hashed and written in its three parts: no copy of the
    // message just to checksum it.
    let head = {
        let mut h = [0u8; 9];
        h[0] = kind;
        h[1..].copy_from_slice(&id.to_le_bytes());
        h
    };
    let len =
        u32::try_from(head.len() + rest.len()).map_err(|_| io::Error::other("record too large"))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(rest);
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&crc.finalize().to_le_bytes())?;
    out.write_all(&head)?;
    out.write_all(rest)?;
    Ok((HEADER + len as usize) as u64)
}

/// Iterates the valid records of a segment, stopping at a torn tail.
struct Records<'a> {
    data: &'a [u8],
}

impl<'a> Records<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = (u8, u64, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let d = self.data;
        if d.len() < HEADER {
            return None;
        }
        let len = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as usize;
        let crc = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
        let body = d.get(HEADER..HEADER + len)?;
        if len < 9 || crc32fast::hash(body) != crc {
            self.data = &[];
            return None;
        }
        self.data = &d[HEADER + len..];
        let mut id = [0u8; 8];
        id.copy_from_slice(&body[1..9]);
        Some((body[0], u64::from_le_bytes(id), &body[9..]))
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wal")
            && let Some(seq) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, path));
        }
    }
    Ok(out)
}

fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_their_on_disk_form() {
        // Logs written before an upgrade must replay. The expected bytes are
        // len, CRC-32 (IEEE, from Python's zlib.crc32 of the body), body.
        let golden: &[u8] =
            b"\x14\x00\x00\x00\x5d\xd8\x86\x01\x01\x07\x00\x00\x00\x00\x00\x00\x00MSH|^~\\&|A\r";
        let mut out = Vec::new();
        let n = write_record(&mut out, APPEND, 7, b"MSH|^~\\&|A\r").expect("write");
        assert_eq!(out, golden);
        assert_eq!(n, golden.len() as u64);
        let read: Vec<_> = Records::new(golden).collect();
        assert_eq!(read, vec![(APPEND, 7, &b"MSH|^~\\&|A\r"[..])]);
        // One flipped bit and the record is a torn tail, not a message.
        let mut bad = golden.to_vec();
        bad[20] ^= 1;
        assert_eq!(Records::new(&bad).count(), 0);
    }

    #[tokio::test]
    async fn replays_unfinished_and_skips_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).expect("open");
        assert!(opened.pending.is_empty());
        let wal = opened.wal;
        for id in 1..=3 {
            wal.append(id, Bytes::from(format!("m{id}")))
                .await
                .expect("append");
        }
        wal.done(1, 0);
        wal.done(2, 0);
        wal.finished(2);
        wal.close(true);
        let again = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).expect("reopen");
        let ids: Vec<_> = again.pending.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(again.pending[0].done, BTreeSet::from([0]));
        assert_eq!(again.pending[1].payload, Bytes::from("m3"));
        assert_eq!(again.next_id, 4);
        again.wal.close(true);
        assert_eq!(list_segments(dir.path()).expect("list").len(), 1);
    }

    #[tokio::test]
    async fn torn_tail_is_ignored_and_synced_appends_survive_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES)
            .expect("open")
            .wal;
        wal.append(7, Bytes::from_static(b"seven"))
            .await
            .expect("append");
        wal.close(false);
        let (_, path) = list_segments(dir.path()).expect("list").remove(0);
        // Half a record at the end, as a crash mid-write leaves it.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[40, 0, 0, 0, 1, 2, 3]).expect("write");
        drop(f);
        let again = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).expect("reopen");
        assert_eq!(again.pending.len(), 1);
        assert_eq!(again.pending[0].payload, Bytes::from_static(b"seven"));
        again.wal.close(true);
    }

    #[tokio::test]
    async fn full_segments_roll_over_and_are_deleted_when_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(dir.path(), 256).expect("open").wal;
        for id in 1..=20 {
            wal.append(id, Bytes::from(vec![b'x'; 100]))
                .await
                .expect("append");
        }
        let before = list_segments(dir.path()).expect("list").len();
        assert!(before > 3, "{before} segments");
        for id in 1..=19 {
            wal.finished(id);
        }
        // Appending forces a batch through, which runs maintenance.
        wal.append(21, Bytes::from_static(b"y"))
            .await
            .expect("append");
        // The segments older than the one holding id 20 are deleted; the
        // finished marks are records too and may fill one or two more
        // segments, depending on how they were batched.
        let left = list_segments(dir.path()).expect("list").len();
        assert!(
            left <= 4 && left < before,
            "{left} of {before} segments left"
        );
        wal.close(true);
        let again = Wal::open(dir.path(), 256).expect("reopen");
        let ids: Vec<_> = again.pending.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![20, 21]);
        again.wal.close(true);
    }
}
