//! 8-bit RGB images <-> `[N, 3, H, W]` tensors in [-1, 1], the range SD's VAE works in.
use anyhow::{Result, anyhow};
use image::RgbImage;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::{Device, Tensor};

pub fn to_tensor(images: &[RgbImage], device: &Device) -> Result<Tensor<4>> {
    let first = images.first().ok_or_else(|| anyhow!("no images"))?;
    let (w, h) = first.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut v = vec![0f32; images.len() * 3 * h * w];
    for (i, img) in images.iter().enumerate() {
        if img.dimensions() != first.dimensions() {
            return Err(anyhow!("image {i} is {:?}, the first is {:?}", img.dimensions(), first.dimensions()));
        }
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                v[((i * 3 + c) * h + y as usize) * w + x as usize] = p[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(Tensor::from_data(TensorData::new(v, [images.len(), 3, h, w]), device))
}

/// Images from a tensor in [-1, 1], rounded as diffusers' `numpy_to_pil` does.
pub fn from_tensor(t: Tensor<4>) -> Result<Vec<RgbImage>> {
    let [n, c, h, w] = t.dims();
    if c != 3 {
        return Err(anyhow!("expected 3 channels, got {c}"));
    }
    let v: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().map_err(|e| anyhow!("{e:?}"))?;
    Ok((0..n)
        .map(|i| {
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let at = |c: usize| {
                    let x01 = (v[((i * 3 + c) * h + y as usize) * w + x as usize] + 1.0) / 2.0;
                    (x01.clamp(0.0, 1.0) * 255.0).round() as u8
                };
                image::Rgb([at(0), at(1), at(2)])
            })
        })
        .collect())
}

/// The images in a grid of `cols` columns, black where a row is short.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let Some(first) = images.first() else { return RgbImage::new(1, 1) };
    let (w, h) = first.dimensions();
    let cols = cols.clamp(1, images.len()) as u32;
    let rows = (images.len() as u32).div_ceil(cols);
    let mut out = RgbImage::new(cols * w, rows * h);
    for (i, img) in images.iter().enumerate() {
        let i = i as u32;
        image::imageops::replace(&mut out, img, ((i % cols) * w) as i64, ((i / cols) * h) as i64);
    }
    out
}
