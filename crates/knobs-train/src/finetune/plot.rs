//! The loss curve as a small PNG: raw loss in grey, a moving average in blue.
use image::{Rgb, RgbImage};

const W: u32 = 480;
const H: u32 = 240;
const PAD: u32 = 16;

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), colour: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < W && (y as u32) < H {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

pub fn loss_curve(losses: &[f64]) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let finite: Vec<f64> = losses.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.len() < 2 {
        return img;
    }
    let (lo, hi) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let span = (hi - lo).max(1e-12);
    let n = losses.len();
    let px = |i: usize, v: f64| {
        let x = PAD as f64 + (W - 2 * PAD) as f64 * i as f64 / (n - 1) as f64;
        let y = PAD as f64 + (H - 2 * PAD) as f64 * (1.0 - (v - lo) / span);
        (x, y)
    };
    line(&mut img, (PAD as f64, (H - PAD) as f64), ((W - PAD) as f64, (H - PAD) as f64), Rgb([0, 0, 0]));
    line(&mut img, (PAD as f64, PAD as f64), (PAD as f64, (H - PAD) as f64), Rgb([0, 0, 0]));
    let window = (n / 20).max(1);
    let mut avg = Vec::with_capacity(n);
    for i in 0..n {
        let s = &losses[i.saturating_sub(window - 1)..=i];
        avg.push(s.iter().sum::<f64>() / s.len() as f64);
    }
    for i in 1..n {
        line(&mut img, px(i - 1, losses[i - 1]), px(i, losses[i]), Rgb([190, 190, 190]));
    }
    for i in 1..n {
        line(&mut img, px(i - 1, avg[i - 1]), px(i, avg[i]), Rgb([30, 80, 220]));
    }
    img
}
