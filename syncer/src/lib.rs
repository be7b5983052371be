//! The syncer: objects of a virtual cluster mirrored into one host namespace.
//!
//! `naming` is the translation contract every other part (and the API proxy) shares.

pub mod naming;
pub mod pods;
pub mod policy;
pub mod refs;
