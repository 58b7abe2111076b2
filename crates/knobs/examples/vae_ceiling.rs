//! Diagnostic: how well the judge recognises renders after a VAE round trip (the ceiling the
//! VAE sets on base-model quality). `cargo run --release -p knobs --example vae_ceiling -- MODEL N
//! [SIGMA]`: with SIGMA, Gaussian noise of SIGMA times the latents' standard deviation is added
//! before decoding, to see how robust the decoder is to the small errors a UNet makes.
use anyhow::Result;
use knobs_diffusion::vae::AutoencoderKL;
use knobs_nn::cpu;
use knobs_world::judge::{Judge, data};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).cloned().unwrap_or("models/knobs-base".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let sigma: f32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let judge = Judge::load("models/judge")?;
    let vae = AutoencoderKL::from_dir(format!("{model}/vae"), &cpu())?;
    let set = data::heldout(0, n, 32);
    let (images, truth): (Vec<_>, Vec<_>) = set.into_iter().unzip();
    let mut recon = Vec::new();
    for chunk in images.chunks(64) {
        let x = knobs_world::images::to_tensor(chunk, &cpu())?;
        let z = vae.encode(x).mean;
        let std = z.clone().var(0).mean().sqrt().into_scalar::<f32>();
        let noise = knobs_nn::Tensor::<4>::random(z.dims(), knobs_nn::burn::tensor::Distribution::Normal(0.0, 1.0), &cpu());
        let z = z + noise * (sigma * std);
        recon.extend(knobs_world::images::from_tensor(vae.decode(z))?);
    }
    for (name, imgs) in [("render", &images), ("vae", &recon)] {
        let preds = judge.predict(imgs);
        let mut hits = [0usize; 6];
        for (p, t) in preds.iter().zip(&truth) {
            let got = data::attribute_labels(&p.attributes());
            let want = data::attribute_labels(t);
            for k in 0..5 {
                hits[k] += usize::from(got[k] == want[k]);
            }
            hits[5] += usize::from(got[0] == want[0] && got[1] == want[1]);
        }
        let f: Vec<String> = hits.iter().map(|h| format!("{:.3}", *h as f64 / n as f64)).collect();
        println!("{name}: shape colour background size position shape+colour = {}", f.join(" "));
    }
    knobs_world::images::grid(&recon[..32], 8).save("/tmp/vae_recon.png")?;
    knobs_world::images::grid(&images[..32], 8).save("/tmp/vae_orig.png")?;
    Ok(())
}
