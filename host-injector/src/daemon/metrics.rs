//! Counters per VM and their Prometheus text exposition.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::protocol::DaemonError;

/// Upper bounds of the request-duration histogram, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counters of one VM.
#[derive(Debug, Default)]
pub struct VmMetrics {
    /// Requests answered Ok.
    pub ok: AtomicU64,
    /// Requests the agent rejected (status word).
    pub rejected: AtomicU64,
    /// Requests whose deadline passed: alerts.
    pub silent: AtomicU64,
    /// Requests refused because the queue was full.
    pub busy: AtomicU64,
    /// Requests failed because QEMU was gone.
    pub qemu_gone: AtomicU64,
    /// Other failures.
    pub other: AtomicU64,
    /// Doorbell SMIs raised.
    pub smis_doorbell: AtomicU64,
    /// Monitor SMIs raised (APM port writes).
    pub smis_qmp: AtomicU64,
    /// `inject-smi` commands sent (smi path qmp-targeted, patched QEMU).
    pub smis_qmp_targeted: AtomicU64,
    /// Doorbell SMIs unanswered within the grace period (fallbacks).
    pub doorbell_fallbacks: AtomicU64,
    /// Rings received from the agent (Doorbell register writes to our peer).
    pub rings: AtomicU64,
    /// RESET/SHUTDOWN events seen.
    pub resets: AtomicU64,
    /// QEMU connections to the ivshmem socket.
    pub qemu_connects: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl VmMetrics {
    /// Records an answered request's duration.
    pub fn observe(&self, d: Duration) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a failed request by kind.
    pub fn count_error(&self, e: &DaemonError) {
        let c = match e {
            DaemonError::Rejected { .. } => &self.rejected,
            DaemonError::Silent { .. } => &self.silent,
            DaemonError::Busy { .. } => &self.busy,
            DaemonError::QemuGone { .. } => &self.qemu_gone,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// For `status --json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": Self::get(&self.ok),
            "rejected": Self::get(&self.rejected),
            "silent": Self::get(&self.silent),
            "busy": Self::get(&self.busy),
            "qemu_gone": Self::get(&self.qemu_gone),
            "other_errors": Self::get(&self.other),
            "smis_doorbell": Self::get(&self.smis_doorbell),
            "smis_qmp": Self::get(&self.smis_qmp),
            "smis_qmp_targeted": Self::get(&self.smis_qmp_targeted),
            "doorbell_fallbacks": Self::get(&self.doorbell_fallbacks),
            "agent_rings": Self::get(&self.rings),
            "resets": Self::get(&self.resets),
            "qemu_connects": Self::get(&self.qemu_connects),
        })
    }
}

/// One VM's contribution to the exposition: its name, metrics, and the
/// re-arm counter read from its header (untrusted, as the agent wrote it).
pub struct VmSample<'a> {
    /// VM name.
    pub vm: &'a str,
    /// Counters.
    pub metrics: &'a VmMetrics,
    /// `OFF_DOORBELL_REARMS` of the header.
    pub rearms: u64,
    /// QEMU connected.
    pub qemu_connected: bool,
}

/// Renders the Prometheus text format (version 0.0.4).
pub fn render(vms: &[VmSample<'_>]) -> String {
    let mut o = String::new();
    let g = VmMetrics::get;
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "smmvmi_requests_total",
        "counter",
        "Requests by outcome.",
    );
    for v in vms {
        let m = v.metrics;
        for (result, c) in [
            ("ok", &m.ok),
            ("rejected", &m.rejected),
            ("silent", &m.silent),
            ("busy", &m.busy),
            ("qemu_gone", &m.qemu_gone),
            ("error", &m.other),
        ] {
            let _ = writeln!(
                o,
                "smmvmi_requests_total{{vm=\"{}\",result=\"{result}\"}} {}",
                v.vm,
                g(c)
            );
        }
    }
    family(
        &mut o,
        "smmvmi_smis_total",
        "counter",
        "SMIs raised by backend.",
    );
    for v in vms {
        let _ = writeln!(
            o,
            "smmvmi_smis_total{{vm=\"{}\",backend=\"doorbell\"}} {}",
            v.vm,
            g(&v.metrics.smis_doorbell)
        );
        let _ = writeln!(
            o,
            "smmvmi_smis_total{{vm=\"{}\",backend=\"qmp-broadcast\"}} {}",
            v.vm,
            g(&v.metrics.smis_qmp)
        );
        let _ = writeln!(
            o,
            "smmvmi_smis_total{{vm=\"{}\",backend=\"qmp-targeted\"}} {}",
            v.vm,
            g(&v.metrics.smis_qmp_targeted)
        );
    }
    family(
        &mut o,
        "smmvmi_doorbell_fallbacks_total",
        "counter",
        "Doorbell SMIs unanswered within the grace period (then QMP).",
    );
    for v in vms {
        let _ = writeln!(
            o,
            "smmvmi_doorbell_fallbacks_total{{vm=\"{}\"}} {}",
            v.vm,
            g(&v.metrics.doorbell_fallbacks)
        );
    }
    family(
        &mut o,
        "smmvmi_agent_silent_total",
        "counter",
        "Requests the agent did not answer by the deadline (alerts).",
    );
    for v in vms {
        let _ = writeln!(
            o,
            "smmvmi_agent_silent_total{{vm=\"{}\"}} {}",
            v.vm,
            g(&v.metrics.silent)
        );
    }
    family(
        &mut o,
        "smmvmi_agent_rings_total",
        "counter",
        "Replies the agent announced through the doorbell register.",
    );
    for v in vms {
        let _ = writeln!(
            o,
            "smmvmi_agent_rings_total{{vm=\"{}\"}} {}",
            v.vm,
            g(&v.metrics.rings)
        );
    }
    family(
        &mut o,
        "smmvmi_doorbell_rearms_total",
        "counter",
        "Times the agent re-armed its MSI-X SMI doorbell (mailbox header, untrusted).",
    );
    for v in vms {
        let _ = writeln!(
            o,
            "smmvmi_doorbell_rearms_total{{vm=\"{}\"}} {}",
            v.vm, v.rearms
        );
    }
    family(
        &mut o,
        "smmvmi_guest_resets_total",
        "counter",
        "QMP RESET/SHUTDOWN events.",
    );
    for v in vms {
        let _ = writeln!(
            o,
            "smmvmi_guest_resets_total{{vm=\"{}\"}} {}",
            v.vm,
            g(&v.metrics.resets)
        );
    }
    family(
        &mut o,
        "smmvmi_qemu_connected",
        "gauge",
        "1 while QEMU is connected to the ivshmem socket.",
    );
    for v in vms {
        let _ = writeln!(
            o,
            "smmvmi_qemu_connected{{vm=\"{}\"}} {}",
            v.vm,
            u8::from(v.qemu_connected)
        );
    }
    family(
        &mut o,
        "smmvmi_request_duration_seconds",
        "histogram",
        "Time from receipt to the agent's answer.",
    );
    for v in vms {
        let m = v.metrics;
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "smmvmi_request_duration_seconds_bucket{{vm=\"{}\",le=\"{b}\"}} {}",
                v.vm,
                g(&m.buckets[i])
            );
        }
        let _ = writeln!(
            o,
            "smmvmi_request_duration_seconds_bucket{{vm=\"{}\",le=\"+Inf\"}} {}",
            v.vm,
            g(&m.count)
        );
        let _ = writeln!(
            o,
            "smmvmi_request_duration_seconds_sum{{vm=\"{}\"}} {}",
            v.vm,
            g(&m.sum_us) as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "smmvmi_request_duration_seconds_count{{vm=\"{}\"}} {}",
            v.vm,
            g(&m.count)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_conventional_names_and_a_cumulative_histogram() {
        let m = VmMetrics::default();
        m.observe(Duration::from_micros(700));
        m.observe(Duration::from_millis(30));
        m.smis_qmp.store(4, Ordering::Relaxed);
        let text = render(&[VmSample {
            vm: "a",
            metrics: &m,
            rearms: 2,
            qemu_connected: true,
        }]);
        for needle in [
            "smmvmi_requests_total{vm=\"a\",result=\"ok\"} 2",
            "smmvmi_smis_total{vm=\"a\",backend=\"qmp-broadcast\"} 4",
            "smmvmi_doorbell_rearms_total{vm=\"a\"} 2",
            "smmvmi_request_duration_seconds_bucket{vm=\"a\",le=\"0.001\"} 1",
            "smmvmi_request_duration_seconds_bucket{vm=\"a\",le=\"0.05\"} 2",
            "smmvmi_request_duration_seconds_bucket{vm=\"a\",le=\"+Inf\"} 2",
            "smmvmi_request_duration_seconds_count{vm=\"a\"} 2",
            "# TYPE smmvmi_agent_silent_total counter",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
