//! The codec every generated client and server uses: prost encoding with
//! 1 KiB codec buffers instead of tonic's default 8 KiB each way.
//!
//! Why: a controller holds one long-lived Session stream per minion, and the
//! codec buffers are most of a stream's memory (≈ 16 KiB per stream with the
//! defaults, ≈ 8 KiB with these, measured; see DESIGN.md). Our messages are a
//! few hundred bytes, so a small buffer costs nothing; larger messages still
//! work, the buffer grows as needed.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of each encode/decode buffer.
pub const CODEC_BUFFER_BYTES: usize = 1024;
/// Encoded bytes after which a streaming encoder yields to the runtime.
pub const CODEC_YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(CODEC_BUFFER_BYTES, CODEC_YIELD_THRESHOLD_BYTES)
}

/// prost with small buffers; named by `codec_path` in `build.rs`.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
