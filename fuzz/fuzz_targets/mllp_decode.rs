//! Feeds arbitrary bytes to `MllpCodec` through tokio-util's `Decoder`
//! trait, the way `Framed` does, and checks what the engine relies on:
//!
//! - decoding never panics;
//! - no payload is longer than `max_frame_bytes`;
//! - between frames the read buffer is empty or starts with the start byte
//!   (a non-empty buffer means "a message is in hand", see `mllp`'s docs);
//! - the result (payloads, the error or end that stops decoding, the junk
//!   count) is the same whether the bytes arrive in one piece, one byte at a
//!   time, or cut at points drawn from the input itself.
//!
//! The input is the raw wire, so the seed corpus is plain MLLP frames.
#![no_main]

use bytes::BytesMut;
use gru_engine::mllp::{MllpCodec, START_BLOCK};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// Limits to decode every input under: tiny (most frames too large), small,
/// and the default (nothing a fuzzer makes is too large).
const LIMITS: [usize; 3] = [4, 64, gru_engine::mllp::DEFAULT_MAX_FRAME_BYTES];

/// What decoding a whole stream produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    payloads: Vec<Vec<u8>>,
    /// `Ok` for a clean end, else the error that stopped decoding.
    end: Result<(), String>,
    junk_bytes: u64,
}

fn decode(limit: usize, chunks: &[&[u8]]) -> Outcome {
    let mut codec = MllpCodec::new(limit);
    let mut buf = BytesMut::new();
    let mut payloads = Vec::new();
    let mut end = Ok(());
    'read: for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(payload)) => {
                    assert!(payload.len() <= limit, "payload over the limit");
                    payloads.push(payload.to_vec());
                }
                Ok(None) => {
                    assert!(
                        buf.is_empty() || buf[0] == START_BLOCK,
                        "buffer kept bytes that are not a frame start"
                    );
                    break;
                }
                Err(e) => {
                    end = Err(e.to_string());
                    break 'read;
                }
            }
        }
    }
    if end.is_ok() {
        loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(payload)) => {
                    assert!(payload.len() <= limit, "payload over the limit");
                    payloads.push(payload.to_vec());
                }
                Ok(None) => break,
                Err(e) => {
                    end = Err(e.to_string());
                    break;
                }
            }
        }
    }
    Outcome {
        payloads,
        end,
        junk_bytes: codec.junk_bytes(),
    }
}

/// Cuts `data` at points drawn from a generator seeded by its own hash, so
/// every mutation of the input also moves the cuts.
fn cut(data: &[u8]) -> Vec<&[u8]> {
    // FNV-1a, then xorshift64: small, deterministic, dependency-free.
    let mut state = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut chunks = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = 1 + (state % 16) as usize;
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

fuzz_target!(|data: &[u8]| {
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    let cuts = cut(data);
    for limit in LIMITS {
        let whole = decode(limit, &[data]);
        assert_eq!(decode(limit, &bytes), whole, "byte by byte, limit {limit}");
        assert_eq!(decode(limit, &cuts), whole, "cut, limit {limit}");
    }
});
