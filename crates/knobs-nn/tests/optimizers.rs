//! The memory-lean optimizers against their references (transformers' Adafactor and
//! bitsandbytes' AdamW8bit, goldens made by scripts/optimizer_goldens.py), the 8-bit
//! quantisation's error bounds and memory, the 8-bit trajectory against f32 AdamW, training a
//! small regression, and exact checkpoint round trips.
use std::collections::BTreeMap;

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{StateDict, read_safetensors, state_dict, write_safetensors};
use knobs_nn::optim::{
    Adafactor, AdafactorConfig, AdamW, AdamW8bit, AdamWConfig, BLOCK, Blockwise, Grads, Optimizer, QuantMap, collect_grads,
};
use knobs_nn::{Init, Linear, Module, ModuleExt, ParamMut, ParamRef, Tensor, Visitor, VisitorMut, cpu, cpu_autodiff, impl_module};

fn golden() -> StateDict {
    read_safetensors(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/optimizers.safetensors")).unwrap()
}

fn flat(v: Vec<f32>) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), &cpu())
}

fn vals<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data().try_into_vec().unwrap()
}

/// Parameters of rank 1, 2 and 4 under the golden file's names, so that Adafactor factors them.
struct Shaped {
    v7: Tensor<1>,
    m5x6: Tensor<2>,
    t2x3x4x5: Tensor<4>,
}
impl Module for Shaped {
    fn visit(&self, _: &str, v: &mut dyn Visitor) {
        v.param("v7", ParamRef::D1(&self.v7));
        v.param("m5x6", ParamRef::D2(&self.m5x6));
        v.param("t2x3x4x5", ParamRef::D4(&self.t2x3x4x5));
    }
    fn visit_mut(&mut self, _: &str, v: &mut dyn VisitorMut) {
        v.param("v7", ParamMut::D1(&mut self.v7));
        v.param("m5x6", ParamMut::D2(&mut self.m5x6));
        v.param("t2x3x4x5", ParamMut::D4(&mut self.t2x3x4x5));
    }
}

fn shaped(sd: &StateDict, prefix: &str) -> Shaped {
    let t = |k: &str| TensorData::new(sd.f32(&format!("{prefix}{k}.param.0")).unwrap().0, sd.f32(&format!("{prefix}{k}.param.0")).unwrap().1);
    Shaped {
        v7: Tensor::from_data(t("v7"), &cpu()),
        m5x6: Tensor::from_data(t("m5x6"), &cpu()),
        t2x3x4x5: Tensor::from_data(t("t2x3x4x5"), &cpu()),
    }
}

/// The transformers keyword arguments of a golden setting as our config, and its lr.
fn adafactor_config(kwargs: &serde_json::Value) -> (AdafactorConfig, f64) {
    let d = AdafactorConfig::default();
    let flag = |k: &str, def: bool| kwargs.get(k).and_then(|v| v.as_bool()).unwrap_or(def);
    let lr = kwargs.get("lr").and_then(|v| v.as_f64());
    let config = AdafactorConfig {
        beta1: kwargs.get("beta1").and_then(|v| v.as_f64()),
        weight_decay: kwargs.get("weight_decay").and_then(|v| v.as_f64()).unwrap_or(0.0),
        scale_parameter: flag("scale_parameter", d.scale_parameter),
        relative_step: flag("relative_step", d.relative_step),
        warmup_init: flag("warmup_init", d.warmup_init),
        ..d
    };
    (config, lr.unwrap_or(f64::NAN))
}

/// Largest |a - b| / max(|b|, floor) over two slices.
fn rel_dev(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(a, b)| (a - b).abs() / b.abs().max(floor)).fold(0.0, f32::max)
}

#[test]
fn adafactor_matches_transformers() {
    let sd = golden();
    let mut settings: Vec<&String> = sd.metadata.keys().filter(|k| k.starts_with("adafactor.")).collect();
    settings.sort();
    assert_eq!(settings.len(), 4);
    let mut worst = 0f32;
    for key in settings {
        let name = key.strip_prefix("adafactor.").unwrap();
        let (config, lr) = adafactor_config(&serde_json::from_str(&sd.metadata[key]).unwrap());
        let prefix = format!("adafactor.{name}.");
        let mut model = shaped(&sd, &prefix);
        let mut opt = Adafactor::new(config).unwrap();
        for t in 0..5 {
            let grads: Grads = ["v7", "m5x6", "t2x3x4x5"].iter().map(|k| (k.to_string(), flat(sd.f32(&format!("grad.{k}.{t}")).unwrap().0))).collect();
            opt.step(&mut model, &grads, &|_| lr);
            for (k, got) in [("v7", vals(&model.v7)), ("m5x6", vals(&model.m5x6)), ("t2x3x4x5", vals(&model.t2x3x4x5))] {
                let (want, _) = sd.f32(&format!("{prefix}{k}.param.{}", t + 1)).unwrap();
                let dev = rel_dev(&got, &want, 1e-2);
                assert!(dev < 1e-5, "{name} {k} step {}: relative deviation {dev:e}", t + 1);
                worst = worst.max(dev);
            }
        }
    }
    eprintln!("Adafactor vs transformers: max relative deviation {worst:e}");
}

#[test]
fn adafactor_state_is_factored() {
    let sd = golden();
    let mut model = shaped(&sd, "adafactor.defaults.");
    let mut opt = Adafactor::new(AdafactorConfig::default()).unwrap();
    let grads: Grads = ["v7", "m5x6", "t2x3x4x5"].iter().map(|k| (k.to_string(), flat(sd.f32(&format!("grad.{k}.0")).unwrap().0))).collect();
    opt.step(&mut model, &grads, &|_| f64::NAN);
    // [7] keeps 7 values; [5, 6] keeps 5 + 6; [2, 3, 4, 5] keeps 2*3*(4 + 5).
    assert_eq!(opt.state_bytes(), 4 * (7 + 11 + 54));
    assert!(Adafactor::new(AdafactorConfig { relative_step: false, warmup_init: true, ..Default::default() }).is_err());
}

#[test]
fn dynamic_maps_are_bitsandbytes() {
    let sd = golden();
    for (signed, key) in [(true, "qmap.signed"), (false, "qmap.unsigned")] {
        let want = sd.f32(key).unwrap().0;
        assert_eq!(QuantMap::dynamic(signed).values.to_vec(), want, "{key}");
    }
}

/// The table-started encode gives the binary search's code for every value tried: a stride
/// through all 2^32 bit patterns (both signs, every exponent, NaNs and infinities), each
/// midpoint between codes and its neighbours, each code's value, both maps.
#[test]
fn quantisation_codes_match_the_binary_search() {
    for signed in [true, false] {
        let map = QuantMap::dynamic(signed);
        let mut tried: Vec<f32> = (0..=u32::MAX / 997).map(|k| f32::from_bits(k * 997)).collect();
        for w in map.values.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            tried.extend([mid, mid.next_up(), mid.next_down(), w[0], w[1]]);
        }
        tried.extend([0.0, -0.0, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE, -f32::MIN_POSITIVE]);
        for x in tried {
            assert_eq!(map.encode(x), map.encode_by_search(x), "{x:e} ({:#010x}), signed {signed}", x.to_bits());
        }
    }
}

/// Six steps of bitsandbytes' AdamW8bit from the golden start; returns the largest relative
/// parameter (or absmax) deviation and the share of final moment codes equal to bitsandbytes'.
fn against_bitsandbytes(variant: &str) -> (f32, f64) {
    let sd = golden();
    let cfg: serde_json::Value = serde_json::from_str(&sd.metadata["adamw8bit"]).unwrap();
    let f = |k: &str| cfg[k].as_f64().unwrap();
    let config = AdamWConfig { lr: f("lr"), beta1: f("beta1"), beta2: f("beta2"), eps: f("eps"), weight_decay: f("weight_decay") };
    struct Pair(Tensor<1>, Tensor<1>);
    impl Module for Pair {
        fn visit(&self, _: &str, v: &mut dyn Visitor) {
            v.param("weight", ParamRef::D1(&self.0));
            v.param("bias", ParamRef::D1(&self.1));
        }
        fn visit_mut(&mut self, _: &str, v: &mut dyn VisitorMut) {
            v.param("weight", ParamMut::D1(&mut self.0));
            v.param("bias", ParamMut::D1(&mut self.1));
        }
    }
    let start = |k: &str| flat(sd.f32(&format!("{variant}.{k}.param.0")).unwrap().0);
    let mut pair = Pair(start("weight"), start("bias"));
    let mut opt = AdamW8bit::new(config);
    let mut worst = 0f32;
    for t in 0..6 {
        let grads: Grads = ["weight", "bias"].iter().map(|k| (k.to_string(), flat(sd.f32(&format!("grad8.{k}.{t}")).unwrap().0))).collect();
        opt.step(&mut pair, &grads, &|_| config.lr);
        if t == 0 || t == 5 {
            for (k, got) in [("weight", vals(&pair.0)), ("bias", vals(&pair.1))] {
                let (want, _) = sd.f32(&format!("{variant}.{k}.param.{}", t + 1)).unwrap();
                let dev = rel_dev(&got, &want, 1e-2);
                eprintln!("8-bit AdamW vs {variant}, {k} after step {}: max relative deviation {dev:e}", t + 1);
                worst = worst.max(dev);
            }
        }
    }
    let (state, _) = opt.state();
    assert!(state["exp_avg.bias"].as_slice::<f32>().is_ok(), "a 7-value tensor keeps f32 moments");
    let (mut same, mut total) = (0, 0);
    for (ours, theirs, absmax) in [("exp_avg.weight", "state1", "absmax1"), ("exp_avg_sq.weight", "state2", "absmax2")] {
        let codes = state[ours].as_slice::<u8>().unwrap();
        let want = sd.f32(&format!("{variant}.weight.{theirs}")).unwrap().0;
        let n = codes.iter().zip(&want).filter(|(a, b)| **a as f32 == **b).count();
        eprintln!("{variant} {ours}: {n}/{} codes equal", codes.len());
        (same, total) = (same + n, total + codes.len());
        let key = ours.replacen('.', "_absmax.", 1);
        let dev = rel_dev(state[&key].as_slice::<f32>().unwrap(), &sd.f32(&format!("{variant}.weight.{absmax}")).unwrap().0, 1e-12);
        eprintln!("{variant} {key}: max relative deviation {dev:e}");
        worst = worst.max(dev);
    }
    (worst, same as f64 / total as f64)
}

#[test]
fn adamw8bit_matches_bitsandbytes() {
    let (dev, same) = against_bitsandbytes("adamw8bit");
    assert!(dev < 1e-5 && same >= 0.999, "against bitsandbytes' reference update: deviation {dev:e}, {same} of the codes equal");
    // bitsandbytes' CPU library rounds small moments to a farther code than the nearest, so it
    // is only followed loosely; the numbers are reported.
    let (dev, same) = against_bitsandbytes("adamw8bit_cpu");
    assert!(dev < 0.1 && same >= 0.99, "against bitsandbytes' CPU library: deviation {dev:e}, {same} of the codes equal");
}

/// Values of magnitudes from 1e-7 to 10 in each block: every value gets its nearest code, the
/// block's scale is its largest magnitude, and the error is at most half the map's widest gap.
#[test]
fn blockwise_quantisation_error_is_bounded_per_block() {
    let mut init = Init::new(3);
    let n = 7 * BLOCK + 100;
    let base = init.normal_vec(n);
    for signed in [true, false] {
        let map = QuantMap::dynamic(signed);
        let x: Vec<f32> = base.iter().enumerate().map(|(i, v)| {
            let mag = 10f32.powi((i / BLOCK) as i32 - 6);
            if signed { v * mag } else { v.abs() * mag }
        }).collect();
        let q = Blockwise::quantise(&x, &map);
        assert_eq!((q.codes.len(), q.absmax.len()), (n, 8));
        let back = q.dequantise(&map);
        let half_gap = map.values.windows(2).map(|w| (w[1] - w[0]) / 2.0).fold(0f32, f32::max);
        let mut worst_rel = 0f32;
        for (b, ((xs, ys), &absmax)) in x.chunks(BLOCK).zip(back.chunks(BLOCK)).zip(&q.absmax).enumerate() {
            assert_eq!(absmax, xs.iter().fold(0f32, |m, v| m.max(v.abs())), "block {b}: absmax");
            for (&x, &y) in xs.iter().zip(ys) {
                let err = (x - y).abs();
                assert!(err <= half_gap * absmax * 1.0001, "block {b}: {x} -> {y}, bound {}", half_gap * absmax);
                let nearest = map.values.iter().map(|c| (x / absmax - c).abs()).fold(f32::INFINITY, f32::min);
                assert!((x / absmax - y / absmax).abs() <= nearest + 1e-6, "block {b}: {x} did not get its nearest code");
                worst_rel = worst_rel.max(err / absmax);
            }
        }
        eprintln!("signed={signed}: max error {worst_rel:.5} x block absmax (bound {half_gap:.5})");
        assert!(half_gap < if signed { 0.0071 } else { 0.0036 }, "widest gap {half_gap}");
    }
}

/// y = W* x + b* with a 64 -> 96 linear layer: its weight (6144 values) gets 8-bit moments, its
/// bias f32 ones.
struct Regression {
    lin: Linear,
}
impl_module!(Regression { "lin" => lin });

fn regression_problem() -> (Regression, Tensor<2>, Tensor<2>) {
    let dev = cpu_autodiff();
    let mut init = Init::new(11);
    let mut model = Regression { lin: Linear::new(64, 96, true, &mut init, &dev) };
    model.train_only(|_| true);
    let x: Tensor<2> = init.normal([32, 64], 1.0, &dev);
    let w: Tensor<2> = init.normal([64, 96], 0.2, &dev);
    let y = x.clone().matmul(w) + 0.5;
    (model, x, y)
}

fn loss(m: &Regression, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
    (m.lin.forward(x.clone()) - y.clone()).powi_scalar(2).mean()
}

fn train(opt: &mut dyn Optimizer, steps: usize, lr: f64) -> (Vec<f32>, Regression) {
    let (mut m, x, y) = regression_problem();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let l = loss(&m, &x, &y);
        losses.push(l.clone().into_scalar::<f32>());
        let grads = collect_grads(&m, &l.backward());
        opt.step(&mut m, &grads, &|_| lr);
    }
    losses.push(loss(&m, &x, &y).into_scalar::<f32>());
    (losses, m)
}

fn flat_params(m: &Regression) -> Vec<f32> {
    let mut out = Vec::new();
    m.for_each_param(|_, p| out.extend(vals(&p.flat())));
    out
}

#[test]
fn adamw8bit_stays_close_to_adamw_and_takes_two_bytes_per_value() {
    let config = AdamWConfig { lr: 1e-2, ..Default::default() };
    let (l32, m32) = train(&mut AdamW::new(config), 20, 1e-2);
    let mut opt8 = AdamW8bit::new(config);
    let (l8, m8) = train(&mut opt8, 20, 1e-2);
    let p0 = flat_params(&regression_problem().0);
    let (p32, p8) = (flat_params(&m32), flat_params(&m8));
    // The difference in parameters against how far f32 AdamW moved them.
    let moved = p32.iter().zip(&p0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let diff = p32.iter().zip(&p8).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let l2 = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let rel_l2 = l2(&mut p32.iter().zip(&p0).map(|(a, b)| a - b));
    let rel_l2 = l2(&mut p32.iter().zip(&p8).map(|(a, b)| a - b)) / rel_l2;
    let loss_gap = l8.iter().zip(&l32).map(|(a, b)| (a - b).abs() / b).fold(0f32, f32::max);
    eprintln!(
        "20 steps: 8-bit minus f32 AdamW parameters: {:.2}% of f32's movement in L2 (worst value {:.1}%); losses differ by at most {:.2}% ({} -> {} vs {})",
        100.0 * rel_l2, 100.0 * diff / moved, 100.0 * loss_gap, l32[0], l32[20], l8[20]
    );
    assert!(rel_l2 < 0.05, "8-bit AdamW left f32 AdamW's trajectory: {rel_l2}");
    assert!(loss_gap < 0.05, "8-bit AdamW's losses {l8:?} vs f32 {l32:?}");
    assert!(l8[20] < 0.1 * l8[0], "8-bit AdamW must train: {} -> {}", l8[0], l8[20]);
    let n = 64 * 96;
    let bytes = opt8.state_bytes() - 8 * 96;
    let per_value = bytes as f64 / n as f64;
    eprintln!("8-bit state: {per_value:.4} bytes per value (f32 AdamW: 8)");
    assert!((2.0..2.04).contains(&per_value), "{per_value} bytes per value");
}

#[test]
fn adafactor_trains() {
    for config in [AdafactorConfig::with_lr(1e-2), AdafactorConfig { beta1: Some(0.9), ..AdafactorConfig::with_lr(0.0) }] {
        let mut opt = Adafactor::new(config).unwrap();
        let (l, _) = train(&mut opt, 30, 3e-2);
        eprintln!("Adafactor {config:?}: loss {} -> {}", l[0], l[30]);
        assert!(l[30] < 0.5 * l[0], "Adafactor must train: {} -> {}", l[0], l[30]);
    }
}

/// Adafactor as transformers writes it, in f64 with plain loops: one parameter `p` of shape
/// `[lead.., rows, cols]` (`rows` 0: a vector), `steps` gradients, learning rate `lr`.
fn adafactor_by_the_book(p: &[f32], dims: (usize, usize), grads: &[Vec<f32>], lr: f64, beta1: Option<f64>) -> Vec<f64> {
    let (rows, cols) = dims;
    let n = p.len();
    let mut p: Vec<f64> = p.iter().map(|&x| x as f64).collect();
    let mut m = vec![0f64; n];
    let (mut row, mut col, mut full) = (vec![0f64; n / cols.max(1)], vec![0f64; n.checked_div(rows).unwrap_or(0)], vec![0f64; n]);
    for (t, g) in grads.iter().enumerate() {
        let beta2t = 1.0 - ((t + 1) as f64).powf(-0.8);
        let sq: Vec<f64> = g.iter().map(|&x| (x as f64) * (x as f64) + 1e-30).collect();
        let mut u = vec![0f64; n];
        if rows == 0 {
            for k in 0..n {
                full[k] = full[k] * beta2t + sq[k] * (1.0 - beta2t);
                u[k] = g[k] as f64 / full[k].sqrt();
            }
        } else {
            for mat in 0..n / (rows * cols) {
                let at = |i: usize, j: usize| mat * rows * cols + i * cols + j;
                for i in 0..rows {
                    let mean = (0..cols).map(|j| sq[at(i, j)]).sum::<f64>() / cols as f64;
                    row[mat * rows + i] = row[mat * rows + i] * beta2t + mean * (1.0 - beta2t);
                }
                for j in 0..cols {
                    let mean = (0..rows).map(|i| sq[at(i, j)]).sum::<f64>() / rows as f64;
                    col[mat * cols + j] = col[mat * cols + j] * beta2t + mean * (1.0 - beta2t);
                }
                let row_mean = (0..rows).map(|i| row[mat * rows + i]).sum::<f64>() / rows as f64;
                for i in 0..rows {
                    for j in 0..cols {
                        u[at(i, j)] = g[at(i, j)] as f64 / (row[mat * rows + i] / row_mean).sqrt() / col[mat * cols + j].sqrt();
                    }
                }
            }
        }
        let rms = (u.iter().map(|x| x * x).sum::<f64>() / n as f64).sqrt();
        let scale = lr / rms.max(1.0);
        for k in 0..n {
            let step = match beta1 {
                Some(b) => {
                    m[k] = m[k] * b + u[k] * scale * (1.0 - b);
                    m[k]
                }
                None => u[k] * scale,
            };
            p[k] -= step;
        }
    }
    p
}

/// The fused Adafactor step against [`adafactor_by_the_book`] on shapes that span its pieces
/// (3x3 kernels past one piece of small matrices and of summed values, a matrix wider than a
/// block of columns, a vector), with and without a first moment, and the same bits on one
/// thread as on three.
#[test]
fn adafactor_matches_the_book_across_pieces_and_threads() {
    struct Net {
        conv: knobs_nn::Conv2d,
        linear: Linear,
    }
    impl_module!(Net { "conv" => conv, "linear" => linear });
    let shapes = [("conv.weight", (3, 3)), ("conv.bias", (0, 0)), ("linear.weight", (150, 200)), ("linear.bias", (0, 0))];
    for beta1 in [None, Some(0.9)] {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut init = Init::new(3);
                let mut net = Net { conv: knobs_nn::Conv2d::new(80, 96, 3, 1, 1, true, &mut init, &cpu()), linear: Linear::new(200, 150, true, &mut init, &cpu()) };
                let start = state_dict(&net);
                let mut opt = Adafactor::new(AdafactorConfig { beta1, ..AdafactorConfig::with_lr(0.0) }).unwrap();
                let mut given: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
                for _ in 0..2 {
                    let mut grads = Grads::new();
                    net.for_each_param(|path, p| {
                        let g = init.normal_vec(p.numel()).iter().map(|x| x * 1e-3).collect::<Vec<f32>>();
                        given.entry(path.to_string()).or_default().push(g.clone());
                        grads.insert(path.to_string(), flat(g));
                    });
                    opt.step(&mut net, &grads, &|_| 1e-3);
                }
                (start, state_dict(&net), given)
            })
        };
        let (start, one, given) = run(1);
        let (_, three, _) = run(3);
        assert_eq!(one, three, "beta1 {beta1:?}: the thread count changed the bits");
        for (path, dims) in shapes {
            let p0 = start[path].try_to_vec::<f32>().unwrap();
            let want = adafactor_by_the_book(&p0, dims, &given[path], 1e-3, beta1);
            let got = one[path].try_to_vec::<f32>().unwrap();
            let moved = want.iter().zip(&p0).map(|(w, &p)| (w - p as f64).abs()).fold(0f64, f64::max);
            let err = want.iter().zip(&got).map(|(w, &g)| (w - g as f64).abs()).fold(0f64, f64::max);
            assert!(err < 1e-4 * moved, "{path} beta1 {beta1:?}: off by {err:e}, moved by {moved:e}");
        }
    }
}

/// Saved after 3 steps, loaded into a fresh optimizer, 3 more steps: the same bits as 6 straight.
fn round_trips(make: &dyn Fn() -> Box<dyn Optimizer>) {
    let (mut a, x, y) = regression_problem();
    let mut opt = make();
    let step = |m: &mut Regression, opt: &mut dyn Optimizer| {
        let grads = collect_grads(m, &loss(m, &x, &y).backward());
        opt.step(m, &grads, &|_| 1e-2);
    };
    for _ in 0..3 {
        step(&mut a, opt.as_mut());
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("opt.safetensors");
    let (tensors, meta) = opt.state();
    write_safetensors(&file, &tensors, &meta).unwrap();
    let mut resumed = make();
    let sd = read_safetensors(&file).unwrap();
    resumed.load_state(&sd, &cpu()).unwrap();
    assert_eq!(resumed.state(), (tensors, meta), "the loaded state is the saved one");
    let (mut b, _, _) = regression_problem();
    b.for_each_param_mut(|p, mut t| t.assign(p, state_dict(&a)[p].clone()).unwrap());
    for _ in 0..3 {
        step(&mut a, opt.as_mut());
        step(&mut b, resumed.as_mut());
    }
    assert_eq!(state_dict(&a), state_dict(&b), "a resumed optimizer continues exactly");
    // A state with a tensor missing is refused by key.
    let mut broken = sd.clone();
    let gone = broken.tensors.keys().find(|k| k.ends_with("lin.weight")).unwrap().clone();
    broken.tensors.remove(&gone);
    let e = make().load_state(&broken, &cpu()).unwrap_err().to_string();
    assert!(e.contains(&gone), "{e}");
}

#[test]
fn states_round_trip_exactly() {
    round_trips(&|| Box::new(AdamW8bit::new(AdamWConfig { lr: 1e-2, ..Default::default() })));
    round_trips(&|| Box::new(Adafactor::new(AdafactorConfig::with_lr(0.0)).unwrap()));
    round_trips(&|| Box::new(Adafactor::new(AdafactorConfig { beta1: Some(0.9), ..Default::default() }).unwrap()));
    round_trips(&|| Box::new(AdamW::new(AdamWConfig::default())));
    let map: BTreeMap<String, TensorData> = BTreeMap::new();
    let e = AdamW8bit::new(AdamWConfig::default()).load_state(&StateDict { tensors: map, ..Default::default() }, &cpu()).unwrap_err().to_string();
    assert!(e.contains("adamw8bit_steps"), "{e}");
}
