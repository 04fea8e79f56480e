//! `proxqat plot`: the curves of a run's metrics.jsonl as one PNG or SVG figure — train and validation
//! losses (fp, q, fsq), λ, γ, hit and saturation rates, learning rate — over optimizer steps.

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One drawn line: its label and (step, value) points.
struct Series {
    label: &'static str,
    points: Vec<(f64, f64)>,
}

/// A panel: a title and its lines.
struct Panel {
    title: &'static str,
    series: Vec<Series>,
}

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 1200;
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// `(step, value)` of field `key` over the records of `kind`, skipping nulls.
fn column(records: &[serde_json::Value], kind: &str, key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter(|r| r["kind"] == kind)
        .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// A tick label: plain decimals in the usual range, scientific notation outside it. `decimals` comes
/// from the axis's span, so that neighbouring ticks of a narrow axis do not print alike.
fn tick(y: f64, decimals: usize) -> String {
    if y == 0.0 || (1e-2..1e4).contains(&y.abs()) {
        format!("{y:.decimals$}")
    } else {
        format!("{y:.2e}")
    }
}

/// Decimals that tell apart ticks about a tenth of `span` apart: at least 4, as many as that needs.
fn tick_decimals(span: f64) -> usize {
    let needed = -(span / 10.0).log10();
    if needed.is_finite() {
        (needed.ceil().max(0.0) as usize).clamp(4, 12)
    } else {
        4
    }
}

fn panels(records: &[serde_json::Value]) -> Vec<Panel> {
    let one = |title, label, key| Panel {
        title,
        series: vec![Series {
            label,
            points: column(records, "train", key),
        }],
    };
    vec![
        Panel {
            title: "loss",
            series: vec![
                Series {
                    label: "train",
                    points: column(records, "train", "loss"),
                },
                Series {
                    label: "val fp",
                    points: column(records, "eval", "val_loss_fp"),
                },
                Series {
                    label: "val q (hard)",
                    points: column(records, "eval", "val_loss_q"),
                },
                Series {
                    label: "val fsq (selective)",
                    points: column(records, "eval", "val_loss_fsq"),
                },
            ],
        },
        one("λ (dual variable)", "λ", "lambda"),
        one("γ (gamma controller)", "γ", "gamma"),
        one("hit rate (|w − q| ≤ atol)", "hit", "hit_rate"),
        one("saturation rate (q at ±L·s)", "sat", "sat_rate"),
        one("learning rate", "lr", "lr"),
    ]
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, run: &str, panels: &[Panel]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(run, ("sans-serif", 28)).map_err(err)?;
    for (area, panel) in root.split_evenly((3, 2)).into_iter().zip(panels) {
        let points = panel.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            // Nothing logged (e.g. γ in a run without the γ controller).
            area.titled(&format!("{} — not logged", panel.title), ("sans-serif", 20))
                .map_err(err)?;
            continue;
        }
        let pad = ((y1 - y0) * 0.05).max(y1.abs() * 1e-3).max(1e-12);
        let decimals = tick_decimals(y1 - y0 + 2.0 * pad);
        let mut chart = ChartBuilder::on(&area)
            .caption(panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| tick(*y, decimals))
            .light_line_style(WHITE)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        for (s, color) in panel.series.iter().zip(COLORS) {
            if s.points.is_empty() {
                continue;
            }
            let style = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(s.points.clone(), style))
                .map_err(err)?
                .label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            if s.points.len() < 30 {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Plot `run/metrics.jsonl` into `out` (.png or .svg), atomically. Returns the number of records read.
pub fn plot(run: &Path, out: &Path, overwrite: bool) -> Result<usize> {
    let file = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading {} (give --run the run's out_dir)", file.display()))?;
    let records: Vec<serde_json::Value> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}: not JSON", file.display(), i + 1)))
        .collect::<Result<_>>()?;
    if records.iter().all(|r| r["kind"] != "train") {
        bail!("{} has no training records to plot", file.display());
    }
    if out.exists() && !overwrite {
        bail!(
            "{} already exists; choose another --out or pass --overwrite",
            out.display()
        );
    }
    // The font travels inside the binary, so plots look the same on every machine.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    let title = format!("proxqat run {}", run.display());
    let panels = panels(&records);
    let bytes = match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => {
            let mut svg = String::new();
            draw(
                SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area(),
                &title,
                &panels,
            )?;
            svg.into_bytes()
        }
        Some("png") => {
            let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
            draw(
                BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area(),
                &title,
                &panels,
            )?;
            encode_png(&rgb)?
        }
        _ => bail!("--out {}: use a .png or .svg file name", out.display()),
    };
    crate::fsutil::write_atomic(out, &bytes)?;
    Ok(records.len())
}

fn encode_png(rgb: &[u8]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::{tick, tick_decimals};

    #[test]
    fn ticks_of_a_narrow_axis_print_apart() {
        // The saturation rate of a 2400-step run spans 0.1241..0.1245: 4 decimals printed "0.1244" twice.
        for (lo, span) in [(0.1241, 4e-4), (1.3, 1e-3), (0.5, 2e-6), (1.0, 3.0), (100.0, 50.0)] {
            let decimals = tick_decimals(span);
            let labels: Vec<String> = (0..=10).map(|i| tick(lo + span * i as f64 / 10.0, decimals)).collect();
            let mut distinct = labels.clone();
            distinct.dedup();
            assert_eq!(distinct.len(), labels.len(), "span {span}: {labels:?}");
        }
        assert_eq!(
            tick(1.5, tick_decimals(3.0)),
            "1.5000",
            "the usual range keeps 4 decimals"
        );
        assert_eq!(tick(2e-5, 4), "2.00e-5", "small values in scientific notation");
    }
}
