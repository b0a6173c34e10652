//! gru's reference HL7/MLLP engine, and the benchmark DRIVER and SINK.
//!
//! Start reading at [`engine`]: [`engine::start`] returns an
//! [`engine::EngineHandle`] whose `drain`/`drained`/`status` are what the
//! minion agent drives during scale-in (DESIGN.md, "Scale-in, step by step").
//! The engine is built from two small pieces: [`mllp`], a framing codec with
//! a size limit, and [`hl7`], which reads only the MSH segment and builds
//! ACKs. [`bench`](mod@bench) holds the DRIVER and SINK used by `gru bench` and
//! `gru dev`; they speak the same codec and use [`synth`] for messages.
//!
//! The invariant everything here serves: a sender gets AA only after the
//! downstream system ACKed the message, and connections close only between
//! messages, so no accepted message is lost.

pub mod bench;
pub mod engine;
pub mod hl7;
pub mod mllp;
pub mod synth;

pub use engine::{EngineConfig, EngineError, EngineHandle, EngineStatus, start};
