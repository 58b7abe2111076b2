//! Every `--optimizer` trains the built-in model's whole UNet (a DreamBooth-style full
//! fine-tune): the loss on a fixed batch, with fixed noise and timesteps, falls.
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::StableDiffusion;
use knobs_nn::ModuleExt;
use knobs_nn::optim::{Optimizer, collect_grads};
use knobs_train::finetune::config::{OptimizerKind, TrainConfig};
use knobs_train::finetune::trainer::set_trainable;
use knobs_train::finetune::{Method, data};
use knobs_train::objective::{Objective, resolution};
use knobs_train::rng::step_rng;

#[test]
fn every_optimizer_fine_tunes_the_builtin_unet() {
    let model = knobs_train::builtin::model_or_default(None).unwrap();
    let dev = knobs_nn::cpu_autodiff();
    let mut cfg = TrainConfig { method: Method::parse("dreambooth").unwrap(), ..Default::default() };
    cfg.data.concept = Some("striped-star".into());
    cfg.validate().unwrap();
    let base = StableDiffusion::from_dir(&model, &dev).unwrap();
    let res = resolution(&base);
    let examples = data::instance_examples(&cfg, res).unwrap();
    let mut rng = step_rng(0, "test", 0);
    let images: Vec<_> = examples.iter().take(2).map(|e| data::crop(e, res, true, false, &mut rng)).collect();
    let prompts: Vec<String> = examples.iter().take(2).map(|e| e.prompt.clone()).collect();
    for kind in [OptimizerKind::Adamw, OptimizerKind::Adamw8bit, OptimizerKind::Adafactor] {
        let mut sd = StableDiffusion::from_dir(&model, &dev).unwrap();
        sd.vae.for_inference();
        let attached = cfg.method.attach(&cfg, &mut sd, &mut PipelineAdapters::new(0)).unwrap();
        let n = set_trainable(&cfg, &mut sd, &attached.trainable).unwrap();
        let objective = Objective::new(&sd, &dev);
        // The same noise and timesteps every time: the loss of one fixed problem.
        let loss = |sd: &StableDiffusion| objective.per_sample(sd, &images, &prompts, &mut step_rng(0, "fixed", 0), Default::default()).unwrap().mean();
        let mut opt: Box<dyn Optimizer> = kind.build(&cfg.optim, 3e-4);
        let before = loss(&sd).into_scalar::<f32>();
        for _ in 0..6 {
            let grads = collect_grads(&sd, &loss(&sd).backward());
            opt.step(&mut sd, &grads, &|_| 3e-4);
        }
        let after = loss(&sd).into_scalar::<f32>();
        let bytes = opt.state_bytes() as f64 / n as f64;
        eprintln!("{kind:?}: {n} trained values, state {bytes:.2} bytes per value; fixed-batch loss {before:.5} -> {after:.5}");
        assert!(after < 0.8 * before, "{kind:?} must lower the loss: {before} -> {after}");
        let most = match kind {
            OptimizerKind::Adamw => 8.0,
            OptimizerKind::Adamw8bit => 2.2,
            OptimizerKind::Adafactor => 2.0,
        };
        assert!(bytes <= most, "{kind:?}: {bytes} bytes per value");
    }
}
