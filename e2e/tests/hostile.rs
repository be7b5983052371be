//! The hostile-input suite: a tenant, cluster-admin of its virtual cluster, tries what an attacker
//! would. Every case asserts the safe outcome: refused with a clear API error or a Warning event
//! naming the field, or sanitised on the way to the host; never a host object carrying
//! tenant-controlled scheduling, identity, label or volume inputs; the control plane unharmed.
//! Cases are grouped by boundary, one virtual cluster per group (docs/security.md lists them).

#[path = "hostile/common.rs"]
mod common;
#[path = "hostile/pods.rs"]
mod pods;
#[path = "hostile/proxy.rs"]
mod proxy;
