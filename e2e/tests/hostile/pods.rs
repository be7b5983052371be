//! Pods and what they carry to the host.
