//! The picture: both VMMs' page-table bytes (VmPTE) and L1's KVM tables over time, one panel per
//! reporting setting (SVG, plotters).

use std::error::Error;
use std::path::Path;

use crate::round::{Round, Sample};
use crate::{PHASES, VMMS};

/// The picture: for the first round that counts of each reporting setting, VmPTE and
/// SecPageTables over time for both VMMs (seconds since each VMM started), with phase marks.
pub(crate) fn picture(
    rounds: &[Round],
    settings: &[String],
    path: &Path,
) -> Result<bool, Box<dyn Error>> {
    use plotters::prelude::*;
    let shown: Vec<&Round> = settings
        .iter()
        .filter_map(|s| rounds.iter().find(|r| &r.reporting == s && r.ok()))
        .collect();
    if shown.is_empty() {
        return Ok(false);
    }
    let panels = shown.len() * 2;
    let root = SVGBackend::new(path, (1000, 330 * panels as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels, 1));
    let colors = [RGBColor(31, 90, 180), RGBColor(200, 60, 40)];
    for (i, area) in areas.iter().enumerate() {
        let r = shown[i / 2];
        let sec = i % 2 == 1;
        let what = if sec {
            "KVM's nested tables (L1 SecPageTables)"
        } else {
            "host page tables of the VMM process (VmPTE)"
        };
        let value = |s: &Sample| if sec { s.sec_kb } else { s.vm_pte_kb };
        let mut series = Vec::new();
        let (mut xmax, mut ymax) = (1.0f64, 1.0f64);
        for (j, (v, name)) in VMMS.iter().enumerate() {
            let Some(t0) = r.start_ms(v) else { continue };
            let pts: Vec<(f64, f64)> = r
                .samples
                .get(*v)
                .map(|ss| {
                    ss.iter()
                        .map(|s| ((s.t_ms - t0) / 1000.0, value(s)))
                        .collect()
                })
                .unwrap_or_default();
            for &(x, y) in &pts {
                xmax = xmax.max(x);
                ymax = ymax.max(y);
            }
            let marks: Vec<(f64, &str)> = PHASES
                .iter()
                .filter_map(|ph| Some(((r.get(v, ph, "t_ms")? - t0) / 1000.0, *ph)))
                .collect();
            series.push((*name, colors[j], pts, marks));
        }
        let ymax = ymax * 1.25;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{what}, kB; reporting {}, round {}", r.reporting, r.round),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax * 1.02, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the VMM started")
            .y_desc("kB")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(WHITE)
            .draw()?;
        for (k, (name, color, pts, marks)) in series.into_iter().enumerate() {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            let label_y = ymax * (0.96 - 0.07 * k as f64);
            for (t, ph) in marks {
                chart.draw_series(LineSeries::new(
                    vec![(t, 0.0), (t, ymax)],
                    color.mix(0.25).stroke_width(1),
                ))?;
                chart.draw_series(std::iter::once(Text::new(
                    ph.to_string(),
                    (t, label_y),
                    ("sans-serif", 11).into_font().color(&color),
                )))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(true)
}
