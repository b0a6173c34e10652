//! MLLP framing: `0x0B payload 0x1C 0x0D`, as a tokio-util codec.
//!
//! Existing MLLP crates buffer without limit; this one refuses a frame once it
//! grows past `max_frame_bytes` without an end, so one bad sender cannot make
//! the engine hold an unbounded buffer.
//!
//! The decoder leaves a frame's start byte in the read buffer until the whole
//! frame has arrived. The engine relies on that: a non-empty
//! `Framed::read_buffer()` means "a message is in hand", so it must not close
//! the connection yet.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Start of block.
pub const START_BLOCK: u8 = 0x0B;
/// First byte of the end of block.
pub const END_BLOCK: u8 = 0x1C;
/// Second byte of the end of block (a carriage return).
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// Largest payload accepted by default. HL7 v2 messages are usually a few
/// kilobytes; large ORU messages with embedded documents reach about a
/// megabyte, so 4 MiB leaves room without letting a runaway sender in.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Errors of the MLLP codec.
#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    /// A frame grew past the limit without an end block.
    #[error("mllp frame exceeds {limit} bytes")]
    FrameTooLarge {
        /// The configured limit, in payload bytes.
        limit: usize,
    },
    /// The peer closed the stream inside a frame.
    #[error("stream ended inside an mllp frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the unfinished frame, start byte included.
        buffered: usize,
    },
    /// Reading or writing the underlying stream failed.
    #[error("mllp stream i/o failed")]
    Io(#[from] std::io::Error),
}

/// Decoder and encoder for MLLP frames.
#[derive(Debug, Clone)]
pub struct MllpCodec {
    max_frame_bytes: usize,
    /// How far past the start byte the buffer has already been searched for
    /// the end block, so a frame arriving in many reads is scanned once.
    scanned: usize,
    /// Bytes dropped outside any frame since the codec was created.
    junk_bytes: u64,
}

impl MllpCodec {
    /// A codec refusing payloads longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max_frame_bytes,
            scanned: 0,
            junk_bytes: 0,
        }
    }

    /// The payload limit.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Bytes dropped outside any frame (before a start byte) so far.
    pub fn junk_bytes(&self) -> u64 {
        self.junk_bytes
    }

    fn skip_junk(&mut self, src: &mut BytesMut) {
        let junk = src
            .iter()
            .position(|&b| b == START_BLOCK)
            .unwrap_or(src.len());
        if junk > 0 {
            tracing::debug!(bytes = junk, "skipped bytes outside an mllp frame");
            self.junk_bytes += junk as u64;
            src.advance(junk);
            self.scanned = 0;
        }
    }
}

impl Default for MllpCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Decoder for MllpCodec {
    type Item = Bytes;
    type Error = MllpError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, MllpError> {
        self.skip_junk(src);
        if src.is_empty() {
            return Ok(None);
        }
        // src[0] is the start byte. Look for 0x1C 0x0D after it; a 0x1C not
        // followed by 0x0D is payload.
        let from = self.scanned.max(1);
        let end = src[from..]
            .windows(2)
            .position(|w| w == [END_BLOCK, CARRIAGE_RETURN])
            .map(|i| i + from);
        match end {
            Some(end) => {
                self.scanned = 0;
                let payload_len = end - 1;
                if payload_len > self.max_frame_bytes {
                    return Err(MllpError::FrameTooLarge {
                        limit: self.max_frame_bytes,
                    });
                }
                let mut frame = src.split_to(end + 2);
                frame.advance(1);
                frame.truncate(payload_len);
                Ok(Some(frame.freeze()))
            }
            None => {
                // The last byte may be the first half of the end block.
                self.scanned = src.len() - 1;
                // Start byte + payload + a possible trailing 0x1C.
                if src.len() > self.max_frame_bytes + 2 {
                    return Err(MllpError::FrameTooLarge {
                        limit: self.max_frame_bytes,
                    });
                }
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, MllpError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            Ok(None)
        } else {
            let buffered = src.len();
            src.clear();
            self.scanned = 0;
            Err(MllpError::Truncated { buffered })
        }
    }
}

impl Encoder<&[u8]> for MllpCodec {
    type Error = MllpError;

    fn encode(&mut self, payload: &[u8], dst: &mut BytesMut) -> Result<(), MllpError> {
        dst.reserve(payload.len() + 3);
        dst.put_u8(START_BLOCK);
        dst.put_slice(payload);
        dst.put_u8(END_BLOCK);
        dst.put_u8(CARRIAGE_RETURN);
        Ok(())
    }
}

impl Encoder<Bytes> for MllpCodec {
    type Error = MllpError;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), MllpError> {
        self.encode(&payload[..], dst)
    }
}

impl Encoder<Vec<u8>> for MllpCodec {
    type Error = MllpError;

    fn encode(&mut self, payload: Vec<u8>, dst: &mut BytesMut) -> Result<(), MllpError> {
        self.encode(&payload[..], dst)
    }
}

/// Wraps `payload` in an MLLP frame.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(payload);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut MllpCodec, buf: &mut BytesMut) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(f) = codec.decode(buf).expect("decode") {
            out.push(f);
        }
        out
    }

    #[test]
    fn frame_split_at_every_boundary() {
        let payload = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rPID|1\r";
        let wire = frame(payload);
        for split in 0..=wire.len() {
            let mut codec = MllpCodec::new(1024);
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = decode_all(&mut codec, &mut buf);
            buf.extend_from_slice(&wire[split..]);
            got.extend(decode_all(&mut codec, &mut buf));
            assert_eq!(got.len(), 1, "split at {split}");
            assert_eq!(&got[0][..], &payload[..], "split at {split}");
            assert!(buf.is_empty(), "split at {split}");
        }
    }

    #[test]
    fn byte_by_byte() {
        let payload = b"abc\x1cdef";
        let wire = frame(payload);
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.put_u8(b);
            got.extend(decode_all(&mut codec, &mut buf));
        }
        assert_eq!(got, vec![Bytes::from_static(payload)]);
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut wire = frame(b"one");
        wire.extend(frame(b"two"));
        wire.extend(frame(b""));
        wire.extend(frame(b"four"));
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::from(&wire[..]);
        let got = decode_all(&mut codec, &mut buf);
        assert_eq!(got, vec!["one", "two", "", "four"]);
    }

    #[test]
    fn junk_before_start_byte_is_skipped_and_counted() {
        let mut wire = b"\r\n junk".to_vec();
        wire.extend(frame(b"one"));
        wire.extend(b"\n");
        wire.extend(frame(b"two"));
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::from(&wire[..]);
        let got = decode_all(&mut codec, &mut buf);
        assert_eq!(got, vec!["one", "two"]);
        assert_eq!(codec.junk_bytes(), 8);
        assert!(buf.is_empty());
    }

    #[test]
    fn junk_alone_leaves_buffer_empty() {
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::from(&b"no frame here"[..]);
        assert!(codec.decode(&mut buf).expect("decode").is_none());
        assert!(buf.is_empty());
        assert!(codec.decode_eof(&mut buf).expect("eof").is_none());
    }

    #[test]
    fn oversized_frame_is_refused_without_end() {
        let mut codec = MllpCodec::new(16);
        let mut buf = BytesMut::new();
        buf.put_u8(START_BLOCK);
        // 16 payload bytes and a trailing 0x1C could still be a legal frame;
        // 18 bytes after the start byte cannot.
        buf.put_slice(&[b'x'; 18]);
        let err = codec.decode(&mut buf).expect_err("too large");
        assert!(matches!(err, MllpError::FrameTooLarge { limit: 16 }));
    }

    #[test]
    fn oversized_complete_frame_is_refused() {
        let mut codec = MllpCodec::new(4);
        let mut buf = BytesMut::from(&frame(b"12345")[..]);
        let err = codec.decode(&mut buf).expect_err("too large");
        assert!(matches!(err, MllpError::FrameTooLarge { limit: 4 }));
    }

    #[test]
    fn frame_at_limit_is_accepted() {
        let mut codec = MllpCodec::new(4);
        let wire = frame(b"1234");
        // Feed all but the final 0x0D: start + 4 + 0x1C = limit + 2, allowed.
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert!(codec.decode(&mut buf).expect("decode").is_none());
        buf.put_u8(CARRIAGE_RETURN);
        assert_eq!(
            codec.decode(&mut buf).expect("decode").as_deref(),
            Some(&b"1234"[..])
        );
    }

    #[test]
    fn lone_end_block_inside_payload_is_data() {
        let payload = b"a\x1cb\x1c\x1c\x0bc";
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::from(&frame(payload)[..]);
        let got = decode_all(&mut codec, &mut buf);
        assert_eq!(got, vec![Bytes::from_static(payload)]);
    }

    #[test]
    fn eof_inside_frame_is_an_error() {
        let mut codec = MllpCodec::new(1024);
        let mut buf = BytesMut::from(&b"\x0bhalf"[..]);
        assert!(codec.decode(&mut buf).expect("decode").is_none());
        let err = codec.decode_eof(&mut buf).expect_err("truncated");
        assert!(matches!(err, MllpError::Truncated { buffered: 5 }));
    }

    /// A payload that is legal inside a frame: random bytes drawn mostly from
    /// the framing bytes themselves, with every 0x1C 0x0D pair broken up.
    fn random_payload(rng: &mut impl rand::Rng, max_len: usize) -> Vec<u8> {
        const ALPHABET: &[u8] = &[START_BLOCK, END_BLOCK, CARRIAGE_RETURN, b'\n', b'|', b'A'];
        let len = rng.random_range(0..=max_len);
        let mut payload: Vec<u8> = (0..len)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
            .collect();
        for i in 1..payload.len() {
            if payload[i - 1] == END_BLOCK && payload[i] == CARRIAGE_RETURN {
                payload[i] = b'A';
            }
        }
        payload
    }

    /// Property: any sequence of frames, with junk (no start byte) between
    /// them and cut into arbitrary chunks, decodes to exactly its payloads,
    /// leaves nothing buffered, and counts every junk byte. The limit is set
    /// to the longest payload, so frames at the limit are covered too.
    /// Seeded, so a failure names a seed that reproduces it.
    #[test]
    fn any_frames_cut_anywhere_decode_to_their_payloads() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        for seed in 0..500u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let frames = rng.random_range(0..8);
            let payloads: Vec<Vec<u8>> =
                (0..frames).map(|_| random_payload(&mut rng, 40)).collect();
            let mut wire = Vec::new();
            let mut junk = 0u64;
            for p in &payloads {
                for _ in 0..rng.random_range(0..3) {
                    wire.push([b'\r', b'\n', END_BLOCK, b'x'][rng.random_range(0..4)]);
                    junk += 1;
                }
                wire.extend(frame(p));
            }
            let limit = payloads.iter().map(Vec::len).max().unwrap_or(0);

            let mut codec = MllpCodec::new(limit);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(rng.random_range(1..=rest.len()));
                buf.extend_from_slice(chunk);
                got.extend(decode_all(&mut codec, &mut buf));
                rest = tail;
            }
            assert!(
                codec.decode_eof(&mut buf).expect("eof").is_none(),
                "seed {seed}"
            );
            assert_eq!(got, payloads, "seed {seed}");
            assert!(buf.is_empty(), "seed {seed}");
            assert_eq!(codec.junk_bytes(), junk, "seed {seed}");
        }
    }

    #[test]
    fn encoder_wraps() {
        let mut codec = MllpCodec::default();
        let mut dst = BytesMut::new();
        codec
            .encode(Bytes::from_static(b"hi"), &mut dst)
            .expect("encode");
        codec.encode(&b"yo"[..], &mut dst).expect("encode");
        assert_eq!(&dst[..], b"\x0bhi\x1c\x0d\x0byo\x1c\x0d");
    }
}
