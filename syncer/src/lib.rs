//! The syncer: objects of a virtual cluster mirrored into one host namespace.
//!
//! `naming` is the translation contract every other part (and the API proxy) shares.

pub mod claims;
pub mod configs;
pub mod context;
pub mod endpoints;
pub mod informer;
pub mod metrics;
pub mod mirror;
pub mod naming;
pub mod pods;
pub mod policy;
pub mod queue;
pub mod refs;
pub mod sync;
pub const FIELD_MANAGER: &str = "vkube-syncer";
