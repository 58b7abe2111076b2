//! A deterministic rasteriser: analytic inside-tests in the shape's own frame, 4x4 supersampling
//! for anti-aliased edges. Coordinates are fractions of the canvas, so any size works and the
//! same scene looks the same at 32 and at 64.
use std::f32::consts::{FRAC_PI_2, PI};
use std::sync::LazyLock;

use image::RgbImage;

use crate::scene::{Rgb, Scene, Shape};

/// Samples per pixel side.
const SUPERSAMPLE: u32 = 4;
/// Every shape lies inside this radius of its local frame; pixels outside it are background.
const EXTENT: f32 = 1.2;

/// Regular star polygon with alternating outer and inner vertices, first point straight up.
fn star(points: usize, outer: f32, inner: f32) -> Vec<[f32; 2]> {
    (0..2 * points)
        .map(|k| {
            let a = FRAC_PI_2 + k as f32 * PI / points as f32;
            let r = if k % 2 == 0 { outer } else { inner };
            [r * a.cos(), r * a.sin()]
        })
        .collect()
}

/// Regular polygon, first vertex at `start` radians.
fn regular(n: usize, radius: f32, start: f32) -> Vec<[f32; 2]> {
    (0..n)
        .map(|k| {
            let a = start + k as f32 * 2.0 * PI / n as f32;
            [radius * a.cos(), radius * a.sin()]
        })
        .collect()
}

// Sizes chosen so every class covers a similar area (about 1.7..3.1 in unit-radius units) and
// is recognisable at a radius of 5 pixels.
static TRIANGLE: LazyLock<Vec<[f32; 2]>> = LazyLock::new(|| regular(3, 1.15, FRAC_PI_2));
static STAR: LazyLock<Vec<[f32; 2]>> = LazyLock::new(|| star(5, 1.12, 0.52));
static HEXAGON: LazyLock<Vec<[f32; 2]>> = LazyLock::new(|| regular(6, 1.0, 0.0));

/// Crossing-number test; works for the non-convex star too.
fn in_polygon(poly: &[[f32; 2]], u: f32, v: f32) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let ([xi, yi], [xj, yj]) = (poly[i], poly[j]);
        if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Heart: a diamond whose two upper edges each carry a half-disc, shifted so the outline is
/// vertically centred.
fn in_heart(u: f32, v: f32) -> bool {
    const D: f32 = 0.75; // half-diagonal of the diamond
    const R: f32 = D * std::f32::consts::FRAC_1_SQRT_2; // half the diamond's side
    const V0: f32 = -0.2; // diamond centre: the lobes hold more area than the tip, so the centroid sits near 0
    let w = v - V0;
    if u.abs() + w.abs() <= D {
        return true;
    }
    let (lu, lv) = (u.abs() - D / 2.0, w - D / 2.0);
    lu * lu + lv * lv <= R * R
}

/// Whether the point (u, v) of the shape's local frame (v up, the unit circle is the shape's
/// nominal radius) is inside the shape.
pub fn inside(shape: Shape, u: f32, v: f32) -> bool {
    match shape {
        Shape::Circle => u * u + v * v <= 1.0,
        Shape::Square => u.abs() <= 0.8 && v.abs() <= 0.8,
        Shape::Triangle => in_polygon(&TRIANGLE, u, v),
        Shape::Star => in_polygon(&STAR, u, v),
        Shape::Heart => in_heart(u, v),
        Shape::Cross => {
            let (a, b) = (u.abs(), v.abs());
            (a <= 0.95 && b <= 0.32) || (a <= 0.32 && b <= 0.95)
        }
        // Taller than wide, so it never reads as a rotated square.
        Shape::Diamond => u.abs() / 0.75 + v.abs() / 1.08 <= 1.0,
        Shape::Hexagon => in_polygon(&HEXAGON, u, v),
    }
}

/// The scene with its shape filled by the scene's flat colour.
pub fn render(scene: &Scene, size: u32) -> RgbImage {
    let colour = scene.colour.rgb();
    render_with(scene, size, &|_, _| colour)
}

/// The scene with its shape filled by `fill(u, v)`, where (u, v) is the point in the shape's
/// local frame (v up, roughly [-1, 1]), so a pattern turns and scales with the object. Pure: the
/// same scene and fill give identical bytes.
pub fn render_with(scene: &Scene, size: u32, fill: &dyn Fn(f32, f32) -> Rgb) -> RgbImage {
    assert!(size > 0, "render: size must be positive");
    let bg = scene.background.rgb();
    let n = size as f32;
    let (cx, cy) = scene.centre();
    let r = scene.radius();
    let (sin, cos) = scene.rotation.sin_cos();
    let mut img = RgbImage::from_pixel(size, size, image::Rgb(bg));

    // Only pixels near the shape need sampling.
    let reach = EXTENT * r * n;
    let span = |c: f32| ((c * n - reach).floor().max(0.0) as u32, ((c * n + reach).ceil().min(n)) as u32);
    let ((x0, x1), (y0, y1)) = (span(cx), span(cy));
    let step = 1.0 / SUPERSAMPLE as f32;
    let count = SUPERSAMPLE * SUPERSAMPLE;
    for py in y0..y1 {
        for px in x0..x1 {
            let mut acc = [0u32; 3];
            for sy in 0..SUPERSAMPLE {
                for sx in 0..SUPERSAMPLE {
                    let x = (px as f32 + (sx as f32 + 0.5) * step) / n;
                    let y = (py as f32 + (sy as f32 + 0.5) * step) / n;
                    let (dx, dy) = ((x - cx) / r, (y - cy) / r);
                    // Undo the on-screen (clockwise, y-down) rotation, then flip so v points up.
                    let u = dx * cos + dy * sin;
                    let v = dx * sin - dy * cos;
                    let c = if inside(scene.shape, u, v) { fill(u, v) } else { bg };
                    for k in 0..3 {
                        acc[k] += c[k] as u32;
                    }
                }
            }
            // Rounded mean: a pixel fully inside keeps the exact fill colour.
            let px_rgb = acc.map(|a| ((a + count / 2) / count) as u8);
            img.put_pixel(px, py, image::Rgb(px_rgb));
        }
    }
    img
}
