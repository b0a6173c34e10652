//! The crate's one integration-test binary (one link, one process): each
//! module tests one boundary against a real peer over loopback.

mod adapters;
mod imds;
