//! Small PNG charts drawn with the `image` crate: the loss curve (raw loss in grey, a moving
//! average in blue) and a scatter plot with an optional log x axis (`knobs compare`). Both
//! share [`Chart`]: a white canvas, black axes, and the mapping from values to pixels.
use image::{Rgb, RgbImage};

const W: u32 = 480;
const H: u32 = 240;
const PAD: u32 = 16;

/// A canvas whose plotting area maps `x` in `[x0, x1]` and `y` in `[y0, y1]` (after `log10`
/// for a log x axis) to pixels inside a `PAD` margin.
pub struct Chart {
    pub img: RgbImage,
    x: (f64, f64),
    y: (f64, f64),
    log_x: bool,
}

impl Chart {
    /// A `W` x `H` canvas with axes; `x` and `y` are the value ranges (in `log10` units when
    /// `log_x`).
    pub fn new(x: (f64, f64), y: (f64, f64), log_x: bool) -> Chart {
        let mut chart = Chart { img: RgbImage::from_pixel(W, H, Rgb([255, 255, 255])), x, y, log_x };
        chart.axes();
        chart
    }

    /// The x axis along the bottom and the y axis along the left of the plotting area.
    pub fn axes(&mut self) {
        let (l, r, t, b) = (PAD as f64, (W - PAD) as f64, PAD as f64, (H - PAD) as f64);
        self.line_px((l, b), (r, b), Rgb([0, 0, 0]));
        self.line_px((l, t), (l, b), Rgb([0, 0, 0]));
    }

    /// The pixel of value `(x, y)`.
    pub fn px(&self, x: f64, y: f64) -> (f64, f64) {
        let x = if self.log_x { x.log10() } else { x };
        let span = |(a, b): (f64, f64)| (b - a).max(1e-12);
        let fx = (x - self.x.0) / span(self.x);
        let fy = (y - self.y.0) / span(self.y);
        (PAD as f64 + (W - 2 * PAD) as f64 * fx, PAD as f64 + (H - 2 * PAD) as f64 * (1.0 - fy))
    }

    /// A straight line between two pixels, clipped to the canvas.
    pub fn line_px(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), colour: Rgb<u8>) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            self.dot_px((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t), 0, colour);
        }
    }

    /// A filled square of half-width `r` pixels centred on a pixel, clipped to the canvas.
    pub fn dot_px(&mut self, (x, y): (f64, f64), r: i64, colour: Rgb<u8>) {
        if !(x.is_finite() && y.is_finite()) {
            return;
        }
        // The epsilon keeps 245.99999 (an interpolated 246) on pixel 246: no gaps in lines.
        let (cx, cy) = ((x + 1e-6).floor() as i64, (y + 1e-6).floor() as i64);
        for py in cy - r..=cy + r {
            for px in cx - r..=cx + r {
                if px >= 0 && py >= 0 && (px as u32) < W && (py as u32) < H {
                    self.img.put_pixel(px as u32, py as u32, colour);
                }
            }
        }
    }

    /// A polyline through values.
    pub fn polyline(&mut self, points: &[(f64, f64)], colour: Rgb<u8>) {
        for w in points.windows(2) {
            self.line_px(self.px(w[0].0, w[0].1), self.px(w[1].0, w[1].1), colour);
        }
    }
}

/// The smallest and largest finite value, or `None` when there is none.
pub fn finite_range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().filter(|v| v.is_finite()).fold(None, |acc, v| Some(acc.map_or((v, v), |(a, b): (f64, f64)| (a.min(v), b.max(v)))))
}

pub fn loss_curve(losses: &[f64]) -> RgbImage {
    let n = losses.len();
    let range = finite_range(losses.iter().copied()).filter(|_| losses.iter().filter(|v| v.is_finite()).count() >= 2);
    let Some(y) = range else {
        return RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    };
    let mut chart = Chart::new((0.0, (n - 1) as f64), y, false);
    let window = (n / 20).max(1);
    let avg: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            let s = &losses[i.saturating_sub(window - 1)..=i];
            (i as f64, s.iter().sum::<f64>() / s.len() as f64)
        })
        .collect();
    let raw: Vec<(f64, f64)> = losses.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect();
    chart.polyline(&raw, Rgb([190, 190, 190]));
    chart.polyline(&avg, Rgb([30, 80, 220]));
    chart.img
}

/// Points `(x, y, colour)` as 5 x 5 dots. With `log_x`, x must be positive: the axis runs over
/// whole powers of ten, with a tick (and a faint grid line) at each. Points with a value that
/// cannot be placed (not finite, or x <= 0 on a log axis) are left out. Returns the image
/// and the value ranges drawn (`x` in powers of ten when `log_x`), for a caption.
pub fn scatter(points: &[(f64, f64, Rgb<u8>)], log_x: bool) -> (RgbImage, (f64, f64), (f64, f64)) {
    let placeable: Vec<&(f64, f64, Rgb<u8>)> =
        points.iter().filter(|(x, y, _)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0)).collect();
    let xs = placeable.iter().map(|p| if log_x { p.0.log10() } else { p.0 });
    let (mut x0, mut x1) = finite_range(xs).unwrap_or((0.0, 1.0));
    let (mut y0, mut y1) = finite_range(placeable.iter().map(|p| p.1)).unwrap_or((0.0, 1.0));
    if log_x {
        (x0, x1) = (x0.floor(), x1.ceil().max(x0.floor() + 1.0));
    } else if x1 - x0 < 1e-9 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    let pad_y = ((y1 - y0) * 0.08).max(1e-3);
    (y0, y1) = (y0 - pad_y, y1 + pad_y);
    let mut chart = Chart::new((x0, x1), (y0, y1), log_x);
    if log_x {
        for decade in x0 as i64..=x1 as i64 {
            let (x, _) = chart.px(10f64.powi(decade as i32), y0);
            chart.line_px((x, PAD as f64), (x, (H - PAD) as f64 - 1.0), Rgb([225, 225, 225]));
            chart.line_px((x, (H - PAD) as f64), (x, (H - PAD + 5) as f64), Rgb([0, 0, 0]));
        }
        chart.axes();
    }
    for (x, y, colour) in placeable {
        let p = chart.px(*x, *y);
        chart.dot_px(p, 2, *colour);
    }
    (chart.img, (x0, x1), (y0, y1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_places_points_on_a_log_axis() {
        let red = Rgb([255, 0, 0]);
        let blue = Rgb([0, 0, 255]);
        let (img, x, y) = scatter(&[(100.0, 0.2, red), (1e6, 0.8, blue), (-1.0, 0.5, red), (10.0, f64::NAN, red)], true);
        assert_eq!((x.0, x.1), (2.0, 6.0));
        assert!(y.0 < 0.2 && y.1 > 0.8);
        // 100 sits on the left axis end, 1e6 on the right; lower fidelity lower in the image.
        let find = |c: Rgb<u8>| img.enumerate_pixels().find(|(_, _, p)| **p == c).map(|(x, y, _)| (x, y)).unwrap();
        let (rx, ry) = find(red);
        let (bx, by) = find(blue);
        assert!(rx < 20 && bx > W - 24, "{rx} {bx}");
        assert!(ry > by);
        assert_eq!(img.pixels().filter(|p| **p == red).count(), 25, "one 5x5 red dot: the bad points are left out");
        let black = Rgb([0, 0, 0]);
        assert!((PAD..=W - PAD).all(|x| *img.get_pixel(x, H - PAD) == black), "the x axis has no gaps");
        // The y axis is drawn over the grid line at 10^2 (the red dot sits on it, 5 pixels).
        assert_eq!((PAD..=H - PAD).filter(|&y| *img.get_pixel(PAD, y) != black).count(), 5);
    }

    #[test]
    fn loss_curve_draws_both_lines() {
        let losses: Vec<f64> = (0..60).map(|i| 1.0 / (1.0 + i as f64) + if i % 2 == 0 { 0.2 } else { 0.0 }).collect();
        let img = loss_curve(&losses);
        assert!(img.pixels().any(|p| *p == Rgb([30, 80, 220])), "the moving average is drawn");
        assert!(img.pixels().any(|p| *p == Rgb([190, 190, 190])), "the raw loss is drawn");
        assert_eq!(loss_curve(&[1.0]).pixels().filter(|p| **p != Rgb([255, 255, 255])).count(), 0);
    }
}
