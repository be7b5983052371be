//! The allocator's own account of the process's memory, served at `/metrics` on each scrape:
//! what live objects take (`allocated`) against the pages it holds from the system (`resident`).
//! A resident figure well above the allocated one after a burst (a restart's initial lists) is
//! memory the allocator keeps for fragments still in use, not live data.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use tikv_jemalloc_ctl::{epoch, stats};

#[derive(Debug)]
pub struct AllocatorStats;

/// How one figure is read.
type Read = fn() -> tikv_jemalloc_ctl::Result<usize>;

impl Collector for AllocatorStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The statistics are a snapshot taken at the last epoch.
        if epoch::advance().is_err() {
            return Ok(());
        }
        let figures: [(&str, &str, Read); 3] = [
            ("vkube_allocator_allocated_bytes", "Bytes of live objects the allocator gave out", stats::allocated::read),
            ("vkube_allocator_active_bytes", "Bytes of the allocator's pages with live objects", stats::active::read),
            (
                "vkube_allocator_resident_bytes",
                "Bytes the allocator holds resident, at most (its pages, metadata included)",
                stats::resident::read,
            ),
        ];
        for (name, help, read) in figures {
            if let Ok(bytes) = read() {
                let gauge = ConstGauge::new(bytes as i64);
                gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary allocates with the system allocator, not jemalloc: what is checked here is
    /// that the figures are read and encoded as gauges (jemalloc's counters answer in any process
    /// that links it).
    #[test]
    fn figures_are_gauges() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(AllocatorStats));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in ["allocated", "active", "resident"] {
            assert!(text.contains(&format!("# TYPE vkube_allocator_{name}_bytes gauge")), "{text}");
        }
    }
}
