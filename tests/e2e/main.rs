//! End-to-end tests: the real `gru` binary, started and driven as a user
//! would, with real minion processes, a real TCP load balancer and real
//! HL7/MLLP traffic, all on loopback.

mod aws;
mod bench;
mod config;
mod deploy;
mod durable;
mod follow;
mod harness;
mod interop;
mod measure;
mod observe;
mod operator;
mod restart;
mod scaling;
mod sim;
mod soak;
