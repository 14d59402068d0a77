//! The dashboard drawn from a run: each panel of monitoring/dashboard.json with its queries' series
//! over the run, as one SVG (plotters, SVG backend: no bitmap and no system fonts). No Grafana can
//! be installed here; the queries are the dashboard's own, evaluated by the same Prometheus.

use plotters::prelude::*;

/// One panel: its title, Grafana unit, and named series of (seconds into the run, value).
#[derive(Debug)]
pub(super) struct Panel {
    pub(super) title: String,
    pub(super) unit: String,
    pub(super) lines: Vec<(String, Vec<(f64, f64)>)>,
}

const COLUMNS: u32 = 3;
const PANEL: (u32, u32) = (440, 260);
const FONT: &str = "sans-serif";
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
/// Series a panel draws at most (the rest are left out of the picture, not of the check).
const MAX_LINES: usize = PALETTE.len();

/// The panels as an SVG document, `COLUMNS` to a row.
pub(super) fn svg(panels: &[Panel]) -> anyhow::Result<String> {
    let rows = (panels.len() as u32).div_ceil(COLUMNS).max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (PANEL.0 * COLUMNS, PANEL.1 * rows))
            .into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let areas = root.split_evenly((rows as usize, COLUMNS as usize));
        for (panel, area) in panels.iter().zip(areas) {
            draw(panel, &area).map_err(|err| anyhow::anyhow!("{}: {err}", panel.title))?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn draw_error(err: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the dashboard: {err}")
}

fn draw(
    panel: &Panel,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> Result<(), Box<dyn std::error::Error>> {
    let points = || panel.lines.iter().flat_map(|(_, points)| points.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let (scale, unit) = match panel.unit.as_str() {
        "s" => (1000.0, "ms"),
        "percentunit" => (100.0, "%"),
        "reqps" => (1.0, "/s"),
        "bytes" => (1.0 / 1_048_576.0, "MiB"),
        _ => (1.0, ""),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 14))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max * scale)?;
    chart
        .configure_mesh()
        .x_desc("s into the run")
        .y_desc(unit)
        .label_style((FONT, 10))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()?;
    for (index, (name, points)) in panel.lines.iter().take(MAX_LINES).enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(x, y)| (x, y * scale)),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    if !panel.lines.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 10))
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .draw()?;
    }
    Ok(())
}
