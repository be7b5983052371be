//! The vkube control plane and the pieces the CLI shares with it and with the tests.
//!
//! - `pki_store`: the virtual cluster's certificates, kept in a host Secret.
//! - `controlplane`: the `vkube run` process (proxy + syncer), and the upstream components'
//!   command lines (shared by local processes and the Helm chart's containers).
//! - `local`: a virtual control plane as local processes against any host cluster.
//! - `names`: the host objects that make up one virtual cluster.
//! - `snapshot`: the snapshot file format (`vkube snapshot`, `restore`, `create --from-snapshot`).
//! - `expiry`: when a cluster deletes itself (TTL, inactivity).
//! - `usage`: what a cluster uses of its host, as its control plane accounts it (`vkube usage`).

pub mod controlplane;
pub mod expiry;
pub mod local;
pub mod names;
pub mod pki_store;
pub mod snapshot;
pub mod usage;

pub use vkube_core::contract::FIELD_MANAGER;
