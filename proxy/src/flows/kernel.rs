//! The eBPF datapath's packet counters (`weir_counters`, one slot per kind and
//! CPU) as Prometheus counters. They are read at each scrape, on the admin
//! thread: the datapath writes them, nothing in the proxy touches them. The
//! proxy does not know aya; agent-glue installs a reader ([`KernelCounters::set_reader`]).

use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

/// One kind's totals, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCount {
    /// `seen`, `allowed`, `dropped`, `redirected`, `events_lost` (a fixed set).
    pub kind: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

type Reader = Box<dyn Fn() -> Vec<KernelCount> + Send>;

/// What `/metrics` shows of the kernel's counters: nothing until a datapath is
/// loaded (nft steering has none).
#[derive(Default)]
pub struct KernelCounters {
    reader: Mutex<Option<Reader>>,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCounters").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

impl KernelCounters {
    /// Installs the function a scrape calls to read the counters.
    pub fn set_reader(&self, reader: impl Fn() -> Vec<KernelCount> + Send + 'static) {
        *self.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(reader));
    }

    fn read(&self) -> Vec<KernelCount> {
        self.reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r())
            .unwrap_or_default()
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.read();
        if counts.is_empty() {
            return Ok(());
        }
        for (name, help, value) in [
            (
                "weir_kernel_packets",
                "Packets the eBPF datapath handled, by kind (seen, allowed, dropped, redirected; events_lost: verdict events the ring buffer had no room for)",
                (|c: &KernelCount| c.packets) as fn(&KernelCount) -> u64,
            ),
            (
                "weir_kernel_bytes",
                "Bytes of the packets in weir_kernel_packets, by kind",
                |c: &KernelCount| c.bytes,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for c in &counts {
                let labels = KindLabels { kind: c.kind };
                let m = family.encode_family(&labels)?;
                ConstCounter::new(value(c)).encode(m)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_show_once_a_reader_is_installed() {
        let m = super::super::metrics::FlowMetrics::default();
        assert!(!m.encode().contains("weir_kernel"), "{}", m.encode());
        m.kernel.set_reader(|| {
            vec![
                KernelCount {
                    kind: "dropped",
                    packets: 3,
                    bytes: 180,
                },
                KernelCount {
                    kind: "seen",
                    packets: 10,
                    bytes: 900,
                },
            ]
        });
        let t = m.encode();
        for line in [
            r#"weir_kernel_packets_total{kind="dropped"} 3"#,
            r#"weir_kernel_packets_total{kind="seen"} 10"#,
            r#"weir_kernel_bytes_total{kind="dropped"} 180"#,
            "# TYPE weir_kernel_packets counter",
        ] {
            assert!(t.lines().any(|l| l == line), "`{line}` missing:\n{t}");
        }
    }
}
