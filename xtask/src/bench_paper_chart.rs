//! The chart of `cargo xtask bench paper` (SVG, drawn with `plotters`):
//! three panels over the four designs — version-string read p50 (ms),
//! bulk throughput (MB/s) and the monitored VM's slowdown at the polling
//! rate (%), linear axes from zero.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;
use smmvmi_tests::baseline::DESIGNS;

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Draws `results` (design name → figures) into `out`.
pub fn draw(results: &serde_json::Map<String, Value>, out: &Path) -> anyhow::Result<()> {
    let value = |d: &str, k: &str| results[d][k].as_f64().unwrap_or(0.0);
    let root = SVGBackend::new(out, (1200, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let specs: [(&str, &str); 3] = [
        ("version-string read p50 (ms)", "p50_ms"),
        ("bulk read (MB/s)", "bulk_mb_s"),
        ("guest slowdown at 10 Hz (%)", "slowdown_pct"),
    ];
    for (area, (title, key)) in panels.iter().zip(specs) {
        let vals: Vec<f64> = DESIGNS.iter().map(|d| value(d, key)).collect();
        let max = vals.iter().copied().fold(f64::MIN, f64::max);
        let min = vals.iter().copied().fold(f64::MAX, f64::min);
        let mut chart = ChartBuilder::on(area);
        chart
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60);
        let x_labels = |i: &SegmentValue<i32>| match i {
            SegmentValue::CenterOf(i) => DESIGNS
                .get(*i as usize)
                .map(|s| s.to_string())
                .unwrap_or_default(),
            _ => String::new(),
        };
        // `a..b` segmented has a segment per value of `a..=b`.
        let x = (0..DESIGNS.len() as i32 - 1).into_segmented();
        let lo = min.min(0.0) * 1.15;
        let hi = max.max(0.0) * 1.15 + f64::EPSILON;
        let mut c = chart.build_cartesian_2d(x, lo..hi)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&x_labels)
            .draw()?;
        c.draw_series(vals.iter().enumerate().map(|(i, &v)| {
            let i = i as i32;
            Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), v),
                ],
                COLORS[i as usize % COLORS.len()].filled(),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_labelled_bar_per_design_and_figure() {
        let mut m = serde_json::Map::new();
        for (i, d) in DESIGNS.iter().enumerate() {
            let f = i as f64 + 1.0;
            m.insert(
                d.to_string(),
                serde_json::json!({"p50_ms": f, "bulk_mb_s": 2.0 * f, "slowdown_pct": f - 2.5}),
            );
        }
        let out = std::env::temp_dir().join(format!("paper-chart-{}.svg", std::process::id()));
        draw(&m, &out).expect("draw");
        let svg = std::fs::read_to_string(&out).expect("read the SVG");
        let _ = std::fs::remove_file(&out);
        for d in DESIGNS {
            assert_eq!(svg.matches(&format!(">\n{d}\n<")).count(), 3, "{d} labels");
        }
        // Background + 3 panels x 4 bars (a negative slowdown is a bar too).
        let bars = svg
            .lines()
            .filter(|l| l.starts_with("<rect") && !l.contains("#FFFFFF"))
            .count();
        assert_eq!(bars, 12, "{svg}");
    }
}
