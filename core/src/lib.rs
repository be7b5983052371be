//! The pure core the syncer and the API proxy share (no API client, no async runtime):
//!
//! - `contract`: every `vkube.dev/*` label and annotation key;
//! - `naming`: how virtual objects are named and marked on the host;
//! - `policy`: the admin's isolation policy, enforced at the host boundary;
//! - `services`: the host copy of a virtual Service (the proxy creates it first, the syncer
//!   keeps it in step);
//! - `versions`: the pinned upstream versions.

pub mod contract;
pub mod naming;
pub mod policy;
pub mod services;
pub mod versions;
