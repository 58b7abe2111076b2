//! Aspect-ratio bucketing (kohya's `--enable_bucket`): images of any size and ratio train at a
//! bucket size near their own ratio instead of being cropped to a square. The buckets hold at
//! most the square's pixel count, have sides that are multiples of the model's size unit
//! between half and twice the resolution, and every batch is drawn from one bucket so that
//! its images stack into one tensor.
use std::collections::BTreeMap;

/// A `(width, height)` in pixels.
pub type Size = (u32, u32);

#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// Sorted by width, then height.
    pub sizes: Vec<Size>,
}

impl Buckets {
    /// kohya's `make_bucket_resolutions` for a `res` x `res` pixel budget with sides that are
    /// multiples of `unit`, from `res / 2` to `2 * res` (its defaults 256 and 1024 at 512).
    pub fn new(res: u32, unit: u32) -> Buckets {
        assert!(unit > 0 && res >= unit, "resolution {res} below the size unit {unit}");
        let area = res as u64 * res as u64;
        let (min, max) = ((res / 2).max(unit), 2 * res);
        let mut sizes = vec![(res / unit * unit, res / unit * unit)];
        let mut width = min.div_ceil(unit) * unit;
        while width <= max {
            let height = (((area / width as u64) as u32) / unit * unit).min(max);
            if height >= min {
                sizes.push((width, height));
                sizes.push((height, width));
            }
            width += unit;
        }
        sizes.sort();
        sizes.dedup();
        Buckets { sizes }
    }

    /// The bucket whose ratio is nearest the image's (the first such, in order).
    pub fn nearest(&self, (w, h): Size) -> Size {
        let ratio = w as f64 / h as f64;
        let error = |s: &Size| (s.0 as f64 / s.1 as f64 - ratio).abs();
        *self.sizes.iter().min_by(|a, b| error(a).total_cmp(&error(b))).expect("at least the square bucket")
    }
}

/// The size an image of `image` pixels is resized to so that it covers `bucket` with one side
/// exact (kohya: the wider image matches the bucket's height, the narrower its width).
pub fn cover(image: Size, bucket: Size) -> Size {
    let (w, h) = (image.0 as f64, image.1 as f64);
    let scale = if w / h > bucket.0 as f64 / bucket.1 as f64 { bucket.1 as f64 / h } else { bucket.0 as f64 / w };
    (((w * scale + 0.5) as u32).max(bucket.0), ((h * scale + 0.5) as u32).max(bucket.1))
}

/// How many images each bucket holds, as "WxH" -> count.
pub fn counts(sizes: impl Iterator<Item = Size>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (w, h) in sizes {
        *out.entry(format!("{w}x{h}")).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_buckets_are_kohyas() {
        // kohya's buckets at 512 with 64-pixel steps (sd-scripts' defaults).
        let b = Buckets::new(512, 64);
        for s in [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (768, 320), (1024, 256)] {
            assert!(b.sizes.contains(&s), "{s:?} missing from {:?}", b.sizes);
        }
        assert!(b.sizes.iter().all(|&(w, h)| w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0));
        assert_eq!(b.nearest((1920, 1080)), (640, 384));
        assert_eq!(b.nearest((1000, 1000)), (512, 512));
        assert_eq!(b.nearest((600, 1200)), (320, 704));
    }

    #[test]
    fn the_built_in_models_buckets() {
        let b = Buckets::new(32, 8);
        assert_eq!(b.sizes, vec![(16, 48), (16, 56), (16, 64), (24, 40), (32, 32), (40, 24), (48, 16), (56, 16), (64, 16)]);
        assert_eq!(b.nearest((48, 32)), (40, 24));
        assert_eq!(b.nearest((32, 48)), (24, 40));
        assert_eq!(b.nearest((32, 32)), (32, 32));
    }

    #[test]
    fn cover_keeps_the_ratio_and_covers_the_bucket() {
        assert_eq!(cover((48, 32), (40, 24)), (40, 27));
        assert_eq!(cover((32, 48), (24, 40)), (27, 40));
        assert_eq!(cover((1920, 1080), (640, 384)), (683, 384));
        assert_eq!(cover((32, 32), (40, 24)), (40, 40));
        for (img, bucket) in [((33, 77), (24, 40)), ((100, 7), (64, 16))] {
            let (w, h) = cover(img, bucket);
            assert!(w >= bucket.0 && h >= bucket.1);
        }
    }
}
