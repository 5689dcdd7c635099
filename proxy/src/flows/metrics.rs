//! Prometheus counters derived from the flow bus: every published record is
//! counted on the writer thread, so the data path pays nothing for them. Label
//! values come from fixed sets (verdicts, types, protocols, weir's own reason
//! codes): no per-peer, per-IP or per-path label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use weir_policy::flow::FlowVerdict;

use super::bus::FlowKey;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    /// FORWARDED, DROPPED, ERROR.
    pub verdict: &'static str,
    /// L3_L4 or L7 (Hubble's `Type`).
    pub r#type: &'static str,
    /// TCP, UDP, ICMPv4, ICMPv6 for L3/L4; HTTP, DNS for L7.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// success or failure.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    /// weir's map name (a fixed set).
    pub map: &'static str,
}

/// What the control thread reports (it owns the policy sources and the
/// datapath): set there, read by scrapes.
#[derive(Default)]
pub struct ControlMetrics {
    pub policy_revision: Gauge,
    pub reloads: Family<ReloadLabels, Counter>,
    pub last_reload_success: Gauge,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
}

/// The flow counters and the registry they are in (the one `/metrics` serves;
/// later metrics register here too).
pub struct FlowMetrics {
    pub registry: Registry,
    flows: Family<FlowLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    /// Records the flow writer had no room for (counted by the sink itself).
    pub lost: Counter,
    pub control: ControlMetrics,
}

impl Default for FlowMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let flows = Family::<FlowLabels, Counter>::default();
        let drops = Family::<DropLabels, Counter>::default();
        registry.register(
            "weir_flows_processed",
            "Flow records by verdict, type (L3_L4, L7) and protocol",
            flows.clone(),
        );
        registry.register(
            "weir_drop",
            "Flows dropped or refused (verdict DROPPED or ERROR) by reason",
            drops.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "weir_flows_lost",
            "Flow records dropped because the flow writer could not keep up (in no log, ring or other counter)",
            lost.clone(),
        );
        let control = ControlMetrics::default();
        registry.register(
            "weir_policy_revision",
            "Policies installed by this process (1 is the first)",
            control.policy_revision.clone(),
        );
        registry.register(
            "weir_policy_reloads",
            "Policy reloads (SIGHUP, watched files, weir policy apply/delete) by result (success, failure)",
            control.reloads.clone(),
        );
        registry.register(
            "weir_policy_last_reload_success",
            "1 when the last reload installed its policy (or none happened yet), 0 when it was refused",
            control.last_reload_success.clone(),
        );
        control.last_reload_success.set(1);
        registry.register(
            "weir_bpf_map_entries",
            "Entries weir wrote into each eBPF map",
            control.map_entries.clone(),
        );
        registry.register(
            "weir_bpf_map_capacity",
            "Each eBPF map's max_entries",
            control.map_capacity.clone(),
        );
        FlowMetrics {
            registry,
            flows,
            drops,
            lost,
            control,
        }
    }
}

impl FlowMetrics {
    pub fn observe(&self, f: &FlowKey) {
        let verdict = match f.verdict {
            FlowVerdict::Forwarded => "FORWARDED",
            FlowVerdict::Dropped => "DROPPED",
            FlowVerdict::Error => "ERROR",
        };
        self.flows
            .get_or_create(&FlowLabels {
                verdict,
                r#type: if f.l7.is_some() { "L7" } else { "L3_L4" },
                protocol: f.l7.unwrap_or(f.l4),
            })
            .inc();
        if let Some(reason) = &f.drop_reason {
            self.drops
                .get_or_create(&DropLabels {
                    reason: reason.clone(),
                })
                .inc();
        }
    }

    /// The registry in Prometheus's text format (OpenMetrics flavour).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A drop reason as a bounded label: weir's reason codes are upper-case names,
/// some followed by `: detail` (`MALFORMED_REQUEST: ...`): the name only.
pub(super) fn reason_label(desc: Option<&str>) -> String {
    let Some(desc) = desc else {
        return "UNKNOWN".into();
    };
    let code = desc.split([':', ' ']).next().unwrap_or("");
    if !code.is_empty()
        && code.len() <= 48
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        code.to_string()
    } else {
        "OTHER".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_metrics_are_in_the_registry() {
        let m = FlowMetrics::default();
        m.control.policy_revision.set(3);
        m.control
            .reloads
            .get_or_create(&ReloadLabels { result: "failure" })
            .inc();
        m.control.last_reload_success.set(0);
        m.control
            .map_entries
            .get_or_create(&MapLabels {
                map: "weir_ipcache",
            })
            .set(5);
        let t = m.encode();
        for line in [
            "weir_policy_revision 3",
            r#"weir_policy_reloads_total{result="failure"} 1"#,
            "weir_policy_last_reload_success 0",
            r#"weir_bpf_map_entries{map="weir_ipcache"} 5"#,
        ] {
            assert!(t.lines().any(|l| l == line), "`{line}` missing:\n{t}");
        }
    }

    #[test]
    fn reasons_are_bounded_names() {
        assert_eq!(reason_label(Some("POLICY_DENIED")), "POLICY_DENIED");
        assert_eq!(
            reason_label(Some("MALFORMED_REQUEST: bad header x")),
            "MALFORMED_REQUEST"
        );
        assert_eq!(
            reason_label(Some("DNS_QUERY_REJECTED:multiple_questions")),
            "DNS_QUERY_REJECTED"
        );
        assert_eq!(reason_label(Some("upstream said no")), "OTHER");
        assert_eq!(reason_label(None), "UNKNOWN");
    }
}
