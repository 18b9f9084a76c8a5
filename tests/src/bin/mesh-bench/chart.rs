//! PNG chart of the benchmark figures: for each figure, one horizontal bar per path showing its
//! median divided by the baseline's (the first path, direct TCP), with the absolute value beside
//! the bar.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

/// ab_glyph draws only the fonts it is given; these come from a Debian package rather than the
/// repository so no font file is vendored, and no fontconfig/freetype is needed.
const FONT_PACKAGE: &str = "fonts-dejavu-core";
const FONTS: [(&str, FontStyle); 2] = [
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        FontStyle::Normal,
    ),
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
        FontStyle::Bold,
    ),
];
const FAMILY: &str = "sans-serif";

const WIDTH: u32 = 1200;
/// Title and margins above the plot, x axis below it.
const TOP_PX: u32 = 60;
const BOTTOM_PX: u32 = 60;
/// Room for the path names left of the bars.
const LEFT_PX: u32 = 150;
const HEADING_PX: u32 = 30;
const BAR_PX: u32 = 26;
const GROUP_GAP_PX: u32 = 14;
/// Room right of the longest bar for its value text, as a share of the axis.
const VALUE_ROOM: f64 = 0.3;

/// One colour per path position, so a path keeps its colour across figures.
const PATH_COLORS: [RGBColor; 6] = [
    RGBColor(128, 128, 128),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
];

pub struct ChartRow {
    /// e.g. "throughput 1 stream (Gbit/s)"
    pub figure: String,
    pub lower_is_better: bool,
    /// (path label, median; None = not measured).
    pub values: Vec<(String, Option<f64>)>,
    /// Per value, the index of the value its ratio is to; missing: the first (direct TCP).
    pub baselines: Vec<usize>,
}

pub fn draw(path: &Path, title: &str, rows: &[ChartRow]) -> Result<()> {
    register_fonts()?;
    let content_px = rows.iter().map(group_height).sum::<u32>();
    let root = BitMapBackend::new(path, (WIDTH, chart_height(rows))).into_drawing_area();
    root.fill(&WHITE)?;

    let x_max = rows
        .iter()
        .flat_map(row_ratios)
        .flatten()
        .fold(1.0_f64, f64::max)
        * (1.0 + VALUE_ROOM);
    // y counts pixels up from the bottom of the plot, so the layout is plain arithmetic.
    let top = f64::from(content_px);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 26, FontStyle::Bold))
        .margin(10)
        .margin_right(30)
        .x_label_area_size(BOTTOM_PX)
        .y_label_area_size(LEFT_PX)
        .build_cartesian_2d(0.0..x_max, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(12)
        .x_label_formatter(&|x| format!("{x:.1}×"))
        .x_desc("value / direct (direct = 1.0×)")
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    let mut offset = 0;
    for row in rows {
        draw_group(&mut chart, row, Layout { top, offset })?;
        offset += group_height(row);
    }
    root.present()
        .with_context(|| format!("writing the chart {}", path.display()))?;
    Ok(())
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Where a group starts, in pixels from the top of the plot of height `top`.
#[derive(Clone, Copy)]
struct Layout {
    top: f64,
    offset: u32,
}

impl Layout {
    fn y(self, px_below_group_start: u32) -> f64 {
        self.top - f64::from(self.offset + px_below_group_start)
    }
    fn bar_top(self, i: usize) -> u32 {
        HEADING_PX + i as u32 * BAR_PX
    }
}

fn draw_group(chart: &mut Chart<'_, '_>, row: &ChartRow, at: Layout) -> Result<()> {
    let better = if row.lower_is_better {
        "lower"
    } else {
        "higher"
    };
    let heading = format!("{}  ({better} is better)", row.figure);
    let bold =
        TextStyle::from((FAMILY, 18, FontStyle::Bold)).pos(Pos::new(HPos::Left, VPos::Bottom));
    // From the image's left edge, over the path-name column; its bottom well clear of the bars.
    draw_text(
        chart,
        (0.0, at.y(HEADING_PX - 8)),
        -(LEFT_PX as i32),
        heading,
        bold,
    )?;

    let ratios = row_ratios(row);
    for (i, ((label, _), ratio)) in row.values.iter().zip(&ratios).enumerate() {
        let middle = at.y(at.bar_top(i) + BAR_PX / 2);
        let right_aligned = TextStyle::from((FAMILY, 16)).pos(Pos::new(HPos::Right, VPos::Center));
        draw_text(chart, (0.0, middle), -8, label.clone(), right_aligned)?;
        if let Some(r) = ratio {
            let color = PATH_COLORS[i % PATH_COLORS.len()];
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (0.0, at.y(at.bar_top(i) + 3)),
                    (*r, at.y(at.bar_top(i) + BAR_PX - 3)),
                ],
                color.filled(),
            )))?;
        }
    }
    // Over the bars, so a bar past 1.0 still shows where 1.0 is; under the texts, which it
    // would cross; and below the heading, which it would cross too.
    let bars_end = at.bar_top(row.values.len());
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, at.y(HEADING_PX)), (1.0, at.y(bars_end))],
        BLACK.stroke_width(2),
    )))?;
    for (i, ((_, value), ratio)) in row.values.iter().zip(ratios).enumerate() {
        let beside_bar = (ratio.unwrap_or(0.0), at.y(at.bar_top(i) + BAR_PX / 2));
        let left_aligned = TextStyle::from((FAMILY, 16)).pos(Pos::new(HPos::Left, VPos::Center));
        draw_text(
            chart,
            beside_bar,
            6,
            value_text(*value, ratio),
            left_aligned,
        )?;
    }
    Ok(())
}

/// Text anchored at a chart coordinate, shifted `dx` pixels sideways.
fn draw_text(
    chart: &mut Chart<'_, '_>,
    at: (f64, f64),
    dx: i32,
    text: String,
    style: TextStyle<'_>,
) -> Result<()> {
    chart.draw_series(std::iter::once(
        EmptyElement::at(at) + Text::new(text, (dx, 0), style),
    ))?;
    Ok(())
}

/// Each value over its baseline; None where either is missing or the baseline is 0 (e.g. the
/// agents' CPU on the direct path), since no ratio means anything there.
fn row_ratios(row: &ChartRow) -> Vec<Option<f64>> {
    let baseline = |i: usize| {
        let at = row.baselines.get(i).copied().unwrap_or(0);
        row.values
            .get(at)
            .and_then(|(_, v)| *v)
            .filter(|b| *b > 0.0)
    };
    row.values
        .iter()
        .enumerate()
        .map(|(i, (_, v))| Some((*v)? / baseline(i)?).filter(|r| r.is_finite()))
        .collect()
}

fn value_text(value: Option<f64>, ratio: Option<f64>) -> String {
    match (value, ratio) {
        (None, _) => "n/a".into(),
        (Some(v), Some(r)) => format!("{}  ({r:.2}×)", format_value(v)),
        (Some(v), None) => format!("{}  (no baseline)", format_value(v)),
    }
}

/// Three significant digits or so, as in the markdown report.
fn format_value(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        _ => format!("{x:.2}"),
    }
}

fn group_height(row: &ChartRow) -> u32 {
    HEADING_PX + row.values.len() as u32 * BAR_PX + GROUP_GAP_PX
}

fn chart_height(rows: &[ChartRow]) -> u32 {
    TOP_PX + rows.iter().map(group_height).sum::<u32>() + BOTTOM_PX
}

/// plotters keeps registered fonts for the whole process and wants `'static` bytes, so each
/// file is read and leaked once.
fn register_fonts() -> Result<()> {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    if REGISTERED.get().is_some() {
        return Ok(());
    }
    for (file, style) in FONTS {
        let bytes = std::fs::read(file).with_context(|| {
            format!(
                "reading the chart font {file}: install the Debian package {FONT_PACKAGE} \
                 (`cargo xtask setup` does)"
            )
        })?;
        register_font(FAMILY, style, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| anyhow!("{file} is not a usable TrueType font"))?;
    }
    let _ = REGISTERED.set(());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(figure: &str, lower_is_better: bool, v: [Option<f64>; 4]) -> ChartRow {
        let paths = ["direct", "mesh", "stunnel peer", "mesh same-node"];
        ChartRow {
            figure: figure.into(),
            lower_is_better,
            values: paths.iter().map(|p| p.to_string()).zip(v).collect(),
            baselines: Vec::new(),
        }
    }

    fn bench_rows() -> Vec<ChartRow> {
        vec![
            row(
                "throughput 1 stream (Gbit/s)",
                false,
                [Some(18.6), Some(4.29), Some(3.53), None],
            ),
            row(
                "throughput 8 streams (Gbit/s)",
                false,
                [Some(19.1), Some(3.90), Some(5.48), None],
            ),
            row(
                "RR 1 KiB latency p50 (µs)",
                true,
                [Some(37.3), Some(166.0), Some(122.0), None],
            ),
            row(
                "RR 1 KiB latency p99 (µs)",
                true,
                [Some(56.5), Some(220.0), Some(164.0), None],
            ),
            row(
                "new connections/s",
                false,
                [Some(4427.0), Some(1527.0), Some(465.0), None],
            ),
            row(
                "agents CPU s, 1 stream",
                true,
                [Some(0.0), Some(14.5), Some(14.0), None],
            ),
        ]
    }

    #[test]
    fn chart_is_a_png_of_the_expected_size_with_a_bar_per_measured_path() -> Result<()> {
        let rows = bench_rows();
        let file =
            std::env::temp_dir().join(format!("mesh-bench-chart-{}.png", std::process::id()));
        draw(&file, "mesh-bench: each path relative to direct TCP", &rows)?;
        let bytes = std::fs::read(&file)?;
        std::fs::remove_file(&file)?;

        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        let width = u32::from_be_bytes(bytes[16..20].try_into()?);
        let height = u32::from_be_bytes(bytes[20..24].try_into()?);
        assert_eq!((width, height), (WIDTH, chart_height(&rows)));

        let mut reader = png::Decoder::new(&bytes[..]).read_info()?;
        let mut pixels = vec![0; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut pixels)?;
        assert_eq!(frame.color_type, png::ColorType::Rgb);
        let pixel = |x: u32, y: u32| {
            let i = (y * width + x) as usize * 3;
            RGBColor(pixels[i], pixels[i + 1], pixels[i + 2])
        };
        let count =
            |xs: std::ops::Range<u32>, ys: std::ops::Range<u32>, f: &dyn Fn(RGBColor) -> bool| {
                ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
                    .filter(|&(x, y)| f(pixel(x, y)))
                    .count()
            };
        let inked = |c: RGBColor| c != WHITE;
        // Title, path names, bars and value texts, x axis.
        assert!(count(0..width, 0..TOP_PX, &inked) > 500, "no title");
        assert!(
            count(0..LEFT_PX, TOP_PX..height - BOTTOM_PX, &inked) > 2000,
            "no labels"
        );
        assert!(
            count(LEFT_PX..width, TOP_PX..height - BOTTOM_PX, &inked) > 20000,
            "no bars"
        );
        assert!(
            count(0..width, height - BOTTOM_PX..height, &inked) > 500,
            "no x axis"
        );
        // Direct, mesh and stunnel have bars in their colours; same-node (None) has none.
        let all = |c: RGBColor| count(0..width, 0..height, &move |p| p == c);
        for color in &PATH_COLORS[..3] {
            assert!(all(*color) > 1000, "no bar of colour {color:?}");
        }
        assert_eq!(all(PATH_COLORS[3]), 0, "a bar for a path not measured");
        Ok(())
    }

    #[test]
    fn chart_ratios_skip_missing_values_and_a_zero_baseline() {
        let r = row("f", false, [Some(2.0), Some(1.0), None, Some(4.0)]);
        assert_eq!(row_ratios(&r), [Some(1.0), Some(0.5), None, Some(2.0)]);
        let r = row("f", true, [Some(0.0), Some(1.0), None, None]);
        assert_eq!(row_ratios(&r), [None, None, None, None]);
    }
}
