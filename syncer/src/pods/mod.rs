//! Pods: the virtual pod runs as its host copy; status, scheduling and deletion flow back.

pub mod status;
pub mod translate;
