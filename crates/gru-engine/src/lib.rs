//! gru's reference HL7/MLLP engine, and the benchmark DRIVER and SINK.
//!
//! Start reading at [`engine`]: [`engine::start`] returns an
//! [`engine::EngineHandle`] whose `drain`/`drained`/`status` are what the
//! minion agent drives during scale-in (DESIGN.md, "Scale-in, step by step").
//! The engine is built from small pieces: [`mllp`], a framing codec with
//! a size limit; [`hl7`], which reads only the MSH segment and builds
//! ACKs; [`routes`] and [`transform`], the route list and its field edits;
//! and [`wal`], the durable queue. [`bench`](mod@bench) holds the DRIVER and SINK used by `gru bench` and
//! `gru dev`; they speak the same codec and use [`synth`] for messages.
//!
//! The invariant everything here serves: a sender gets AA only after every
//! downstream destination ACKed the message (or, in after-enqueue mode, once
//! it is queued — durably when a queue directory is set), and connections
//! close only between messages, so no accepted message is lost.

pub mod bench;
pub mod engine;
pub mod hl7;
pub mod latency;
pub mod mllp;
pub mod routes;
pub mod synth;
pub mod transform;
pub mod wal;

pub use engine::{EngineConfig, EngineError, EngineHandle, EngineStatus, start};
pub use routes::{AckMode, Route};
