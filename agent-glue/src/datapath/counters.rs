//! `/metrics`' view of the datapath's per-CPU packet counters: a reader over a
//! second handle on `weir_counters`, summing the CPUs at each scrape (on the
//! admin thread; the datapath's writers never wait for it).

use aya::maps::{MapData, PerCpuArray};
use weir_proxy::flows::kernel::KernelCount;
use weir_proxy::flows::metrics::FlowMetrics;

use super::maps::WeirCounter;
use super::maps::kernel_enum::*;

/// Each counter slot and its `kind` label.
const KINDS: [(u32, &str); 5] = [
    (WEIR_COUNTER_SEEN, "seen"),
    (WEIR_COUNTER_ALLOWED, "allowed"),
    (WEIR_COUNTER_DROPPED, "dropped"),
    (WEIR_COUNTER_REDIRECTED, "redirected"),
    (WEIR_COUNTER_EVENTS_LOST, "events_lost"),
];

/// Makes every scrape read `map`.
pub fn install(metrics: &FlowMetrics, map: PerCpuArray<MapData, WeirCounter>) {
    metrics.kernel.set_reader(move || read(&map));
}

fn read(map: &PerCpuArray<MapData, WeirCounter>) -> Vec<KernelCount> {
    KINDS
        .iter()
        .filter_map(|&(index, kind)| {
            let per_cpu = map.get(&index, 0).ok()?;
            Some(KernelCount {
                kind,
                packets: per_cpu.iter().map(|c| c.packets).sum(),
                bytes: per_cpu.iter().map(|c| c.bytes).sum(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_slot_has_a_kind() {
        assert_eq!(KINDS.len() as u32, WEIR_COUNTER_MAX);
        for (i, (index, _)) in KINDS.iter().enumerate() {
            assert_eq!(*index, i as u32);
        }
    }
}
