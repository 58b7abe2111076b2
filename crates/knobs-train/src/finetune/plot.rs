//! PNG charts drawn with `plotters`: the training loss curve (`loss.png`: the raw loss and a
//! moving average) and a scatter plot with an optional log x axis (`knobs compare`'s
//! `fidelity_vs_size.png`). Every chart has a title, titled axes with tick values and a
//! legend, placed in the corner of the plotting area that covers the fewest data.
//!
//! Text is drawn with the DejaVu Sans subset in `assets/fonts` (embedded, so no system font is
//! needed), registered with plotters as its `sans-serif` family.
use std::error::Error;
use std::sync::Once;

use image::{Rgb, RgbImage};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::element::MultiLineText;
use plotters::prelude::*;

/// Width and height of the loss curve, in pixels.
pub const LOSS_SIZE: (u32, u32) = (640, 360);
/// Width and height of a scatter plot, in pixels.
pub const SCATTER_SIZE: (u32, u32) = (720, 440);

/// The raw loss: light grey, under the moving average.
pub const RAW_LOSS: Rgb<u8> = Rgb([170, 170, 170]);
/// The moving average of the loss.
pub const AVG_LOSS: Rgb<u8> = Rgb([30, 80, 220]);

const FONT: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-Latin1.ttf");
const TITLE_PX: u32 = 20;
const DESC_PX: u32 = 15;
const TICK_PX: u32 = 13;
const LEGEND_PX: u32 = 13;
/// Legend box: margin around its text, and room for each entry's line or marker.
const LEGEND_MARGIN: u32 = 8;
const LEGEND_KEY: u32 = 28;

/// Registers the embedded font once per process (plotters keeps a global table).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_err() {
            panic!("assets/fonts/DejaVuSans-Latin1.ttf is not a font ab_glyph can read");
        }
    });
}

fn colour(c: Rgb<u8>) -> RGBColor {
    RGBColor(c.0[0], c.0[1], c.0[2])
}

/// The smallest and largest finite value, or `None` when there is none.
pub fn finite_range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().filter(|v| v.is_finite()).fold(None, |acc, v| Some(acc.map_or((v, v), |(a, b): (f64, f64)| (a.min(v), b.max(v)))))
}

/// `(lo, hi)` widened by `frac` of its span on each side; a zero span becomes a window around
/// the value, so that a single value or equal values sit in the middle of the axis.
fn padded((lo, hi): (f64, f64), frac: f64) -> (f64, f64) {
    let span = hi - lo;
    if span <= 1e-12 * lo.abs().max(1.0) {
        let d = (lo.abs() * 0.1).max(0.05);
        return (lo - d, hi + d);
    }
    (lo - span * frac, hi + span * frac)
}

/// Tick labels of a linear axis over `(lo, hi)`: as many decimals as ticks about a fifth of
/// the span apart need, and no "-0".
fn linear_label(v: f64, (lo, hi): (f64, f64)) -> String {
    let step = ((hi - lo) / 5.0).abs().max(1e-12);
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') { s.trim_start_matches('-').to_string() } else { s }
}

/// Tick labels of a log axis: `500`, `1k`, `20k`, `1M`, `3G` (SI prefixes, no trailing zeros).
pub fn si_label(v: f64) -> String {
    let (scaled, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(p, _)| v.abs() >= *p * 0.999_999)
        .map_or((v, ""), |(p, s)| (v / p, s));
    let s = if (scaled - scaled.round()).abs() < 1e-6 * scaled.abs().max(1.0) {
        format!("{}", scaled.round())
    } else if scaled.abs() >= 1.0 {
        format!("{scaled:.1}").trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{scaled:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    };
    format!("{s}{prefix}")
}

/// Whether `v` is 1, 2 or 5 times a power of ten: the ticks of a log axis that get a label
/// (within one decade plotters puts a tick at every multiple; 7k, 8k, 9k, 10k would collide).
fn one_two_five(v: f64) -> bool {
    if !(v > 0.0 && v.is_finite()) {
        return false;
    }
    let m = v / 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().any(|k| (m - k).abs() < 1e-6 * k)
}

/// The corner of the plotting area (pixels `w` x `h`) where a legend box of `legend` pixels
/// covers the fewest of `data` (pixel positions inside the plotting area); upper right first
/// on ties.
fn emptiest_corner(data: &[(i32, i32)], (w, h): (i32, i32), legend: (i32, i32)) -> SeriesLabelPosition {
    use SeriesLabelPosition::*;
    let slack = 6;
    let corners = [(UpperRight, w - legend.0 - 5, 5), (UpperLeft, 5, 5), (LowerRight, w - legend.0 - 5, h - legend.1 - 5), (LowerLeft, 5, h - legend.1 - 5)];
    corners
        .into_iter()
        .map(|(pos, x, y)| {
            let (x0, y0, x1, y1) = (x - slack, y - slack, x + legend.0 + slack, y + legend.1 + slack);
            let covered = data.iter().filter(|(px, py)| (x0..=x1).contains(px) && (y0..=y1).contains(py)).count();
            (covered, pos)
        })
        .min_by_key(|(covered, _)| *covered)
        .map_or(UpperRight, |(_, pos)| pos)
}

/// The size in pixels of the legend plotters draws for `labels`.
fn legend_size(labels: &[&str]) -> Result<(i32, i32), Box<dyn Error>> {
    let style: TextStyle = (FONT, LEGEND_PX).into_font().into();
    let mut text = MultiLineText::<_, &str>::new((0, 0), &style);
    for l in labels {
        text.push_line(*l);
    }
    let (w, h) = text.estimate_dimension()?;
    Ok((w + (LEGEND_KEY + 2 * LEGEND_MARGIN) as i32, h + 2 * LEGEND_MARGIN as i32))
}

/// Points about 4 pixels apart along each polyline (pixel coordinates), for
/// [`emptiest_corner`].
fn sample_lines(lines: &[Vec<(i32, i32)>]) -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for line in lines {
        out.extend(line.first());
        for w in line.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            let n = ((x1 - x0).abs().max((y1 - y0).abs()) / 4).max(1);
            out.extend((1..=n).map(|i| (x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n)));
        }
    }
    out
}

/// A white canvas of `size` pixels, `draw` on it, as an image. A drawing error (none is
/// expected: the font is embedded and the backend is memory) is logged and leaves what was
/// drawn so far.
fn render(size: (u32, u32), draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), Box<dyn Error>>) -> RgbImage {
    register_font();
    let mut buf = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        let result = draw(&root).and_then(|()| root.present().map_err(Into::into));
        if let Err(e) = result {
            tracing::warn!("drawing a chart failed: {e}");
        }
    }
    RgbImage::from_raw(size.0, size.1, buf).expect("the buffer holds width x height RGB pixels")
}

/// The common frame: a title, axis titles and tick labels with the embedded font, light grid.
fn chart_builder<'a, 'b>(root: &'a DrawingArea<BitMapBackend<'b>, Shift>, title: &str) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, (FONT, TITLE_PX)).margin(12).margin_top(8).x_label_area_size(44).y_label_area_size(64);
    b
}

/// The training loss per step (step 1 first) as a `LOSS_SIZE` chart: the raw loss in grey and
/// its moving average (over a twentieth of the run, at least one step) in blue. Values that
/// are not finite are skipped: the raw line breaks there and the average leaves them out.
/// With no finite value the chart has its frame, title and legend and no line.
pub fn loss_curve(history: &[f64]) -> RgbImage {
    let n = history.len();
    let window = (n / 20).max(1);
    // Runs of consecutive finite values, each a line; the moving average over finite values.
    let mut raw: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut run: Vec<(f64, f64)> = Vec::new();
    let mut avg: Vec<(f64, f64)> = Vec::new();
    for (i, &v) in history.iter().enumerate() {
        let step = (i + 1) as f64;
        if v.is_finite() {
            run.push((step, v));
        } else if !run.is_empty() {
            raw.push(std::mem::take(&mut run));
        }
        let w: Vec<f64> = history[(i + 1).saturating_sub(window)..=i].iter().copied().filter(|v| v.is_finite()).collect();
        if !w.is_empty() {
            avg.push((step, w.iter().sum::<f64>() / w.len() as f64));
        }
    }
    if !run.is_empty() {
        raw.push(run);
    }
    let x = (1.0, (n as f64).max(2.0));
    let y = padded(finite_range(history.iter().copied()).unwrap_or((0.0, 1.0)), 0.05);
    render(LOSS_SIZE, |root| {
        let mut chart = chart_builder(root, "Training loss").build_cartesian_2d(x.0..x.1, y.0..y.1)?;
        let x_fmt = |v: &f64| if (v - v.round()).abs() < 1e-9 { format!("{}", v.round()) } else { String::new() };
        let y_fmt = |v: &f64| linear_label(*v, y);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .axis_desc_style((FONT, DESC_PX))
            .label_style((FONT, TICK_PX))
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .max_light_lines(4)
            .light_line_style(RGBColor(244, 244, 244))
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()?;
        let (raw_c, avg_c) = (colour(RAW_LOSS), colour(AVG_LOSS));
        for (k, line) in raw.iter().enumerate() {
            let series = if line.len() == 1 {
                chart.draw_series(line.iter().map(|&p| Circle::new(p, 1, raw_c.filled())))?
            } else {
                chart.draw_series(LineSeries::new(line.iter().copied(), raw_c.stroke_width(1)))?
            };
            if k == 0 {
                series.label("loss").legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw_c.stroke_width(2)));
            }
        }
        if raw.is_empty() {
            // The legend still names both lines.
            chart.draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?.label("loss").legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], raw_c.stroke_width(2))
            });
        }
        chart
            .draw_series(LineSeries::new(avg.iter().copied(), avg_c.stroke_width(2)))?
            .label("moving average")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], avg_c.stroke_width(2)));
        let origin = chart.plotting_area().get_base_pixel();
        let to_px = |&(x, y): &(f64, f64)| {
            let (px, py) = chart.backend_coord(&(x, y));
            (px - origin.0, py - origin.1)
        };
        let lines: Vec<Vec<(i32, i32)>> = raw.iter().chain(std::iter::once(&avg)).map(|l| l.iter().map(to_px).collect()).collect();
        let area = chart.plotting_area().dim_in_pixel();
        let corner = emptiest_corner(&sample_lines(&lines), (area.0 as i32, area.1 as i32), legend_size(&["loss", "moving average"])?);
        legend(&mut chart, corner)?;
        Ok(())
    })
}

/// Draws the series labels of `chart` in the given corner: white box, grey border.
fn legend<'a, 'b: 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, Y>>,
    corner: SeriesLabelPosition,
) -> Result<(), Box<dyn Error>> {
    chart
        .configure_series_labels()
        .position(corner)
        .margin(LEGEND_MARGIN)
        .legend_area_size(LEGEND_KEY)
        .label_font((FONT, LEGEND_PX))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(160, 160, 160))
        .draw()?;
    Ok(())
}

/// One legend entry of a scatter plot and its points `(x, y)`.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub colour: Rgb<u8>,
    pub points: Vec<(f64, f64)>,
}

/// What a scatter plot says: its title, the axes' titles, and whether x is on a log scale.
#[derive(Clone, Copy, Debug)]
pub struct Scatter<'a> {
    pub title: &'a str,
    pub x_title: &'a str,
    pub y_title: &'a str,
    pub log_x: bool,
}

/// A `SCATTER_SIZE` scatter plot: each series' points as filled circles (radius 4) of its
/// colour, and a legend entry per series with a point that can be placed. A point that
/// cannot be placed (a value not finite, or x <= 0 on a log axis) is left out. A log x axis
/// runs over whole powers of ten, tick labels in SI prefixes (`1k`, `10M`); y is padded by
/// 8% of its span. A single point or equal values sit mid-axis.
pub fn scatter(plot: &Scatter, series: &[Series]) -> RgbImage {
    let placeable = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!plot.log_x || x > 0.0);
    let series: Vec<(&Series, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s, s.points.iter().copied().filter(placeable).collect::<Vec<_>>()))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let all = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let y = padded(finite_range(all().map(|p| p.1)).unwrap_or((0.0, 1.0)), 0.08);
    let labels: Vec<&str> = series.iter().map(|(s, _)| s.label.as_str()).collect();
    render(SCATTER_SIZE, |root| {
        let builder = chart_builder(root, plot.title);
        if plot.log_x {
            let (lo, hi) = finite_range(all().map(|p| p.0.log10())).unwrap_or((0.0, 1.0));
            // Whole decades (ticks at both ends), plus 3% so that no dot is cut by the frame.
            let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
            let pad = (hi - lo) * 0.03;
            // Within one decade plotters yields its upper end twice; label it once.
            let last = std::cell::Cell::new(f64::NAN);
            let x_fmt = |v: &f64| {
                let repeat = (last.replace(*v) - *v).abs() < 1e-9 * v.abs();
                if one_two_five(*v) && !repeat { si_label(*v) } else { String::new() }
            };
            let coord = (10f64.powf(lo - pad)..10f64.powf(hi + pad)).log_scale();
            draw_scatter(builder, coord, y, &x_fmt, plot, &series, &labels)
        } else {
            let x = padded(finite_range(all().map(|p| p.0)).unwrap_or((0.0, 1.0)), 0.05);
            let x_fmt = move |v: &f64| linear_label(*v, x);
            draw_scatter(builder, x.0..x.1, y, &x_fmt, plot, &series, &labels)
        }
    })
}

fn draw_scatter<'a, 'b, XR>(
    mut builder: ChartBuilder<'a, 'b, BitMapBackend<'b>>,
    x: XR,
    y: (f64, f64),
    x_fmt: &dyn Fn(&f64) -> String,
    plot: &Scatter,
    series: &[(&Series, Vec<(f64, f64)>)],
    labels: &[&str],
) -> Result<(), Box<dyn Error>>
where
    XR: AsRangedCoord<Value = f64>,
    XR::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut chart = builder.build_cartesian_2d(x, y.0..y.1)?;
    let y_fmt = |v: &f64| linear_label(*v, y);
    chart
        .configure_mesh()
        .x_desc(plot.x_title)
        .y_desc(plot.y_title)
        .axis_desc_style((FONT, DESC_PX))
        .label_style((FONT, TICK_PX))
        .x_labels(10)
        .y_labels(6)
        .x_label_formatter(x_fmt)
        .y_label_formatter(&y_fmt)
        .x_max_light_lines(0)
        .y_max_light_lines(4)
        .light_line_style(RGBColor(244, 244, 244))
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;
    let origin = chart.plotting_area().get_base_pixel();
    let mut data = Vec::new();
    for (s, points) in series {
        let c = colour(s.colour);
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?
            .label(s.label.clone())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
        data.extend(points.iter().map(|p| {
            let (px, py) = chart.backend_coord(p);
            (px - origin.0, py - origin.1)
        }));
    }
    if !series.is_empty() {
        let area = chart.plotting_area().dim_in_pixel();
        let corner = emptiest_corner(&data, (area.0 as i32, area.1 as i32), legend_size(labels)?);
        legend(&mut chart, corner)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHITE_PX: Rgb<u8> = Rgb([255, 255, 255]);

    fn count(img: &RgbImage, c: Rgb<u8>) -> usize {
        img.pixels().filter(|p| **p == c).count()
    }

    /// Pixels in a rectangle `[x0, x1) x [y0, y1)` dark enough to be text or axis lines.
    fn dark(img: &RgbImage, (x0, y0, x1, y1): (u32, u32, u32, u32)) -> usize {
        (y0..y1).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 110)).count()
    }

    /// The bounding box of the pixels of colour `c`, or `None`.
    fn bbox(img: &RgbImage, c: Rgb<u8>) -> Option<(u32, u32, u32, u32)> {
        img.enumerate_pixels().filter(|(_, _, p)| **p == c).fold(None, |acc, (x, y, _)| {
            Some(acc.map_or((x, y, x, y), |(a, b, c, d): (u32, u32, u32, u32)| (a.min(x), b.min(y), c.max(x), d.max(y))))
        })
    }

    fn noisy_loss(n: usize) -> Vec<f64> {
        (0..n).map(|i| 1.0 / (1.0 + i as f64 * 0.1) + if i % 2 == 0 { 0.15 } else { 0.0 }).collect()
    }

    fn save(img: &RgbImage, name: &str) {
        // KNOBS_PLOT_DIR=dir keeps the test charts, to look at them.
        if let Ok(dir) = std::env::var("KNOBS_PLOT_DIR") {
            img.save(std::path::Path::new(&dir).join(name)).unwrap();
        }
    }

    #[test]
    fn loss_curve_draws_both_lines_title_axes_and_legend() {
        let img = loss_curve(&noisy_loss(120));
        save(&img, "loss.png");
        assert_eq!(img.dimensions(), LOSS_SIZE);
        // Both series in their colours: the lines and the legend keys.
        assert!(count(&img, AVG_LOSS) > 300, "the moving average is drawn: {}", count(&img, AVG_LOSS));
        // (The legend's key is 40 pixels of each; lines are partly antialiased.)
        assert!(count(&img, RAW_LOSS) > 150, "the raw loss is drawn: {}", count(&img, RAW_LOSS));
        let (w, h) = LOSS_SIZE;
        // Text is drawn (the font works): the title across the top, the x axis title and
        // tick values along the bottom, the y axis title and ticks at the left.
        assert!(dark(&img, (w / 3, 0, 2 * w / 3, 28)) > 80, "title: {}", dark(&img, (w / 3, 0, 2 * w / 3, 28)));
        assert!(dark(&img, (w / 3, h - 26, 2 * w / 3, h)) > 20, "x axis title 'step'");
        assert!(dark(&img, (0, h / 3, 24, 2 * h / 3)) > 20, "y axis title 'loss'");
        assert!(dark(&img, (80, h - 44, w - 20, h - 26)) > 60, "x tick values");
        assert!(dark(&img, (24, 40, 70, h - 50)) > 60, "y tick values");
    }

    #[test]
    fn loss_curve_legend_sits_where_the_lines_are_not() {
        // A falling loss fills the upper left; the legend goes to the upper right, clear of
        // both lines: no line pixel inside its box.
        let img = loss_curve(&noisy_loss(200));
        let (x0, y0, x1, y1) = bbox(&img, AVG_LOSS).unwrap();
        assert!(x0 < 100 && x1 > LOSS_SIZE.0 - 60 && y0 < 80 && y1 > 200, "the average spans the plot: {:?}", (x0, y0, x1, y1));
        // Legend keys: the only blue pixels in rows well above where the average ends.
        let key_rows: Vec<(u32, u32)> = img.enumerate_pixels().filter(|(x, y, p)| **p == AVG_LOSS && *x > LOSS_SIZE.0 / 2 && *y < 100).map(|(x, y, _)| (x, y)).collect();
        assert!(!key_rows.is_empty(), "the legend is in the upper right");
        let rising: Vec<f64> = (0..200).map(|i| i as f64).collect();
        let img = loss_curve(&rising);
        save(&img, "loss_rising.png");
        assert!(img.enumerate_pixels().any(|(x, y, p)| *p == AVG_LOSS && x < LOSS_SIZE.0 / 2 && y < 100), "a rising line sends it to the upper left");
    }

    #[test]
    fn loss_curve_skips_values_that_are_not_finite() {
        let mut losses = noisy_loss(60);
        losses[10] = f64::NAN;
        losses[11] = f64::INFINITY;
        losses[30] = f64::NEG_INFINITY;
        let img = loss_curve(&losses);
        save(&img, "loss_nan.png");
        assert!(count(&img, AVG_LOSS) > 200 && count(&img, RAW_LOSS) > 120, "{} {}", count(&img, AVG_LOSS), count(&img, RAW_LOSS));
        // The average skips them: one unbroken line (a blue pixel in every column it spans).
        let (x0, _, x1, _) = bbox(&img, AVG_LOSS).unwrap();
        let gaps: Vec<u32> = (x0..=x1).filter(|&x| (0..LOSS_SIZE.1).all(|y| *img.get_pixel(x, y) != AVG_LOSS)).collect();
        assert!(gaps.is_empty(), "the moving average has gaps at columns {gaps:?}");
        // ... and never goes below the raw loss (a NaN in a window would send it off the plot).
        // (Rows above the tick labels: antialiased text has pixels of every grey.)
        let lowest = |c: Rgb<u8>| img.enumerate_pixels().filter(|(x, y, p)| **p == c && *x > 80 && *y < LOSS_SIZE.1 - 50).map(|(_, y, _)| y).max().unwrap();
        let (avg_low, raw_low) = (lowest(AVG_LOSS), lowest(RAW_LOSS));
        assert!(avg_low <= raw_low, "the average reaches row {avg_low}, the raw loss only {raw_low}");
        // Only non-finite values, a single value, or nothing: a frame, no panic.
        for h in [vec![f64::NAN, f64::INFINITY], vec![1.0], vec![], vec![2.0, 2.0, 2.0]] {
            let img = loss_curve(&h);
            assert_eq!(img.dimensions(), LOSS_SIZE);
            assert!(dark(&img, (LOSS_SIZE.0 / 3, 0, 2 * LOSS_SIZE.0 / 3, 28)) > 80, "the title is there for {h:?}");
        }
        assert!(count(&loss_curve(&[2.0, 2.0, 2.0]), AVG_LOSS) > 300, "a flat loss is a line mid-plot");
    }

    fn red() -> Rgb<u8> {
        Rgb([214, 39, 40])
    }
    fn blue() -> Rgb<u8> {
        Rgb([31, 119, 180])
    }
    const LOG: Scatter = Scatter { title: "Fidelity against size", x_title: "file size (bytes)", y_title: "subject fidelity", log_x: true };

    /// Centres of the blobs of colour `c` (pixels within 12 of a blob's first pixel), in
    /// reading order.
    fn discs(img: &RgbImage, c: Rgb<u8>) -> Vec<(f64, f64)> {
        // Each blob's first pixel and all its pixels.
        type Blob = ((u32, u32), Vec<(u32, u32)>);
        let mut blobs: Vec<Blob> = Vec::new();
        for (x, y, p) in img.enumerate_pixels() {
            if *p != c {
                continue;
            }
            match blobs.iter_mut().find(|(first, _)| first.0.abs_diff(x) <= 12 && first.1.abs_diff(y) <= 12) {
                Some((_, px)) => px.push((x, y)),
                None => blobs.push(((x, y), vec![(x, y)])),
            }
        }
        let mean = |v: &[(u32, u32)], f: fn(&(u32, u32)) -> u32| v.iter().map(f).sum::<u32>() as f64 / v.len() as f64;
        blobs.iter().map(|(_, px)| (mean(px, |p| p.0), mean(px, |p| p.1))).collect()
    }

    /// The x of the y axis: the column with the most dark pixels in the middle rows.
    fn y_axis_x(img: &RgbImage) -> u32 {
        let (w, h) = img.dimensions();
        (0..w / 3).max_by_key(|&x| (h / 4..3 * h / 4).filter(|&y| img.get_pixel(x, y).0.iter().all(|&c| c < 60)).count()).unwrap()
    }

    #[test]
    fn scatter_places_points_on_a_log_axis() {
        let series = [
            Series { label: "lora".into(), colour: red(), points: vec![(100.0, 0.2), (-1.0, 0.5), (10.0, f64::NAN)] },
            Series { label: "dreambooth".into(), colour: blue(), points: vec![(1e6, 0.8), (1e4, 0.5)] },
        ];
        let img = scatter(&LOG, &series);
        save(&img, "scatter.png");
        assert_eq!(img.dimensions(), SCATTER_SIZE);
        let (w, h) = SCATTER_SIZE;
        // The legend takes the empty upper left: its markers are the discs above the data.
        let red_discs = discs(&img, red());
        let blue_discs = discs(&img, blue());
        assert_eq!(red_discs.len(), 2, "one red dot (the bad points are left out) and its legend marker: {red_discs:?}");
        assert_eq!(blue_discs.len(), 3, "two blue dots and a legend marker: {blue_discs:?}");
        let lowest = |d: &[(f64, f64)]| d.iter().copied().fold((0.0, 0.0), |a, p| if p.1 > a.1 { p } else { a });
        let rightmost = |d: &[(f64, f64)]| d.iter().copied().fold((0.0, 0.0), |a, p| if p.0 > a.0 { p } else { a });
        let (x2, y2) = lowest(&red_discs); // 100 bytes, fidelity 0.2
        let (x4, y4) = lowest(&blue_discs); // 1e4, 0.5
        let (x6, y6) = rightmost(&blue_discs); // 1e6, 0.8
        // 100 sits just right of the y axis (3% padding), 1e6 near the right edge, and 1e4
        // halfway between them: a log axis. Lower fidelity is lower in the image, linearly.
        let axis = y_axis_x(&img) as f64;
        assert!(x2 > axis + 4.0 && x2 < axis + 30.0, "1e2 at the left end: {x2} (axis at {axis})");
        assert!(x6 > w as f64 - 50.0, "1e6 at the right end: {x6}");
        assert!((x4 - (x2 + x6) / 2.0).abs() < 3.0, "1e4 halfway between 1e2 and 1e6: {x2} {x4} {x6}");
        assert!(y2 > y4 && y4 > y6 && ((y4 - (y2 + y6) / 2.0).abs() < 3.0), "fidelity 0.2, 0.5, 0.8: {y2} {y4} {y6}");
        // Tick labels along the x axis and the axis titles are drawn.
        assert!(dark(&img, (60, h - 44, w - 10, h - 26)) > 60, "x tick values");
        assert!(dark(&img, (w / 3, h - 26, 2 * w / 3, h)) > 40, "x axis title");
        assert!(dark(&img, (0, h / 4, 24, 3 * h / 4)) > 40, "y axis title");
        assert!(dark(&img, (w / 4, 0, 3 * w / 4, 28)) > 80, "title");
    }

    #[test]
    fn scatter_legend_has_an_entry_per_series() {
        let greens = [Rgb([44, 160, 44]), Rgb([148, 103, 189]), Rgb([255, 127, 14])];
        let series: Vec<Series> = greens.iter().enumerate().map(|(i, &c)| Series { label: format!("method {i}"), colour: c, points: vec![(1e3 * 10f64.powi(i as i32), 0.3 + 0.1 * i as f64)] }).collect();
        let img = scatter(&LOG, &series);
        save(&img, "scatter_legend.png");
        // Each colour twice: its dot and its legend marker; the markers in a column, in the
        // order of the series, at a corner away from the dots.
        let d: Vec<Vec<(f64, f64)>> = greens.iter().map(|&c| discs(&img, c)).collect();
        assert!(d.iter().all(|d| d.len() == 2), "a dot and a legend marker per colour: {d:?}");
        let markers: Vec<(f64, f64)> = d[0]
            .iter()
            .find_map(|&(x, y)| {
                let same_column = |d: &Vec<(f64, f64)>| d.iter().copied().find(|p| (p.0 - x).abs() < 1.0);
                Some(vec![(x, y), same_column(&d[1])?, same_column(&d[2])?])
            })
            .expect("the three legend markers share a column");
        assert!(markers.windows(2).all(|m| m[1].1 - m[0].1 > 10.0 && m[1].1 - m[0].1 < 30.0), "one entry under the other: {markers:?}");
        // A single series: one dot and one legend marker.
        let one: Vec<Series> = vec![Series { label: "only".into(), colour: greens[0], points: vec![(1e3, 0.5)] }];
        let n = count(&scatter(&LOG, &one), greens[0]);
        assert!(n > 60 && n < 130, "one dot and one marker: {n}");
    }

    #[test]
    fn scatter_takes_a_single_point_equal_values_and_no_point() {
        let c = Rgb([44, 160, 44]);
        for (points, log_x) in [
            (vec![(5000.0, 0.5)], true),
            (vec![(5000.0, 0.5)], false),
            (vec![(7.0, 0.25), (7.0, 0.25), (7.0, 0.25)], true),
            (vec![(7.0, 0.25), (7.0, 0.25)], false),
            (vec![(0.0, 0.5), (-3.0, 0.5)], true),
            (vec![], false),
        ] {
            let placed = points.iter().any(|p| !log_x || p.0 > 0.0);
            let plot = Scatter { log_x, ..LOG };
            let img = scatter(&plot, &[Series { label: "m".into(), colour: c, points: points.clone() }]);
            save(&img, &format!("scatter_{}_{log_x}.png", points.len()));
            assert_eq!(img.dimensions(), SCATTER_SIZE);
            assert!(dark(&img, (SCATTER_SIZE.0 / 4, 0, 3 * SCATTER_SIZE.0 / 4, 28)) > 80, "title for {points:?}");
            if placed {
                // The point sits inside the plot, away from the axes.
                let (x0, y0, x1, y1) = bbox(&img, c).unwrap();
                assert!(x0 > 80 && y1 < SCATTER_SIZE.1 - 50, "{points:?} log {log_x}: {:?}", (x0, y0, x1, y1));
                assert!(count(&img, c) > 60, "dot and legend marker");
            } else {
                assert_eq!(count(&img, c), 0, "nothing placeable, no dot and no legend entry: {points:?}");
            }
            assert!(img.pixels().any(|p| *p != WHITE_PX));
        }
    }

    #[test]
    fn labels() {
        assert_eq!(si_label(100.0), "100");
        assert_eq!(si_label(1000.0), "1k");
        assert_eq!(si_label(20000.0), "20k");
        assert_eq!(si_label(1e6), "1M");
        assert_eq!(si_label(2.5e9), "2.5G");
        assert_eq!(si_label(0.5), "0.5");
        assert!(one_two_five(2000.0) && one_two_five(1e6) && one_two_five(0.5) && one_two_five(10.0));
        assert!(!one_two_five(3000.0) && !one_two_five(9e3) && !one_two_five(0.0) && !one_two_five(f64::NAN));
        assert_eq!(linear_label(0.3, (0.0, 1.0)), "0.3");
        assert_eq!(linear_label(0.25, (0.2, 0.3)), "0.25");
        assert_eq!(linear_label(-0.0001, (-1.0, 1.0)), "0.0");
        assert_eq!(linear_label(120.0, (0.0, 500.0)), "120");
    }
}
