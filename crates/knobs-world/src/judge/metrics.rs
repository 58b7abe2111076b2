//! DreamBooth's evaluation measures (Ruiz et al. 2023, section 4.1) over judge outputs, plus a
//! quality score for a base model. Pure functions: embeddings are the judge's L2-normalised
//! vectors, predictions its per-image attributes. Empty inputs give NaN (JSON null).
use crate::caption::PromptAttributes;
use crate::scene::{Background, Colour, Shape};

use super::Prediction;

/// Cosine similarity (the inputs need not be normalised; zero vectors give 0).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

/// The mean of `v` (element-wise).
pub fn centroid(v: &[Vec<f32>]) -> Vec<f32> {
    let d = v.first().map_or(0, |x| x.len());
    let mut c = vec![0f32; d];
    for x in v {
        for (ci, xi) in c.iter_mut().zip(x) {
            *ci += xi / v.len() as f32;
        }
    }
    c
}

fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values.into_iter().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// Subject fidelity (DINO / CLIP-I): mean cosine similarity over all pairs of (generated image,
/// instance image) embeddings.
pub fn subject_fidelity(generated: &[Vec<f32>], instances: &[Vec<f32>]) -> f64 {
    mean(generated.iter().flat_map(|g| instances.iter().map(move |r| cosine(g, r))))
}

/// One image's prompt agreement: the fraction of the attributes the prompt states that the
/// judge finds. A prompt that states none is vacuously satisfied (1).
pub fn prompt_agreement(prompt: &PromptAttributes, prediction: &Prediction) -> f64 {
    let (found, stated) = prediction.agreement(prompt);
    if stated == 0 { 1.0 } else { found as f64 / stated as f64 }
}

/// Prompt fidelity (CLIP-T's role): the mean over images of [`prompt_agreement`]. Each item is
/// the prompt an image was generated from (`parse_prompt`) and the judge's prediction.
pub fn prompt_fidelity(items: &[(PromptAttributes, Prediction)]) -> f64 {
    mean(items.iter().map(|(p, pred)| prompt_agreement(p, pred)))
}

/// Prior preservation: prompt fidelity on other classes' prompts with the tuned model divided
/// by the same with the base model (1 = the tuned model draws other classes as well as before).
pub fn prior_preservation(tuned_fidelity: f64, base_fidelity: f64) -> f64 {
    if base_fidelity > 0.0 { tuned_fidelity / base_fidelity } else { f64::NAN }
}

/// The margin under the instances' own spread that still counts as "looks like the instance".
pub const DRIFT_MARGIN: f64 = 0.95;

/// The language-drift threshold: the lowest cosine of an instance image to the centroid of the
/// *other* instance images (leave one out), times [`DRIFT_MARGIN`]. So a generation counts as
/// the instance when it is at least nearly as close to the instances as the least typical
/// instance image is to the rest. Needs two instances (NaN otherwise).
pub fn drift_threshold(instances: &[Vec<f32>]) -> f64 {
    if instances.len() < 2 {
        return f64::NAN;
    }
    let min = (0..instances.len())
        .map(|i| {
            let others: Vec<Vec<f32>> = instances.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, v)| v.clone()).collect();
            cosine(&instances[i], &centroid(&others))
        })
        .fold(f64::INFINITY, f64::min);
    min * DRIFT_MARGIN
}

/// Language drift: the fraction of class-prompt generations ("a star") whose cosine to the
/// centroid of all instance embeddings reaches [`drift_threshold`], i.e. the class word now
/// draws the subject. 0 = no drift.
pub fn language_drift(class_generations: &[Vec<f32>], instances: &[Vec<f32>]) -> f64 {
    let threshold = drift_threshold(instances);
    if class_generations.is_empty() || threshold.is_nan() {
        return f64::NAN;
    }
    let c = centroid(instances);
    let hits = class_generations.iter().filter(|g| cosine(g, &c) >= threshold).count();
    hits as f64 / class_generations.len() as f64
}

/// Diversity: mean over pairs of distinct generations of (1 - cosine). 0 = all alike. NaN for
/// fewer than two.
pub fn diversity(generations: &[Vec<f32>]) -> f64 {
    mean((0..generations.len()).flat_map(|i| (i + 1..generations.len()).map(move |j| 1.0 - cosine(&generations[i], &generations[j]))))
}

/// How well a base model draws the world.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct BaseQuality {
    /// Images whose shape AND colour are the ones the prompt asks for.
    pub shape_colour_accuracy: f64,
    /// Images with the background the prompt asks for (among prompts that name one).
    pub background_accuracy: f64,
}

/// Base quality over (prompt, prediction) pairs, e.g. from [`base_quality_prompts`].
pub fn base_quality(items: &[(PromptAttributes, Prediction)]) -> BaseQuality {
    let shape_colour = mean(items.iter().map(|(p, pred)| {
        let ok = p.shape.is_none_or(|s| s == pred.shape.value) && p.colour.is_none_or(|c| c == pred.colour.value);
        f64::from(u8::from(ok))
    }));
    let background = mean(
        items
            .iter()
            .filter_map(|(p, pred)| p.background.map(|b| f64::from(u8::from(b == pred.background.value)))),
    );
    BaseQuality { shape_colour_accuracy: shape_colour, background_accuracy: background }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

/// The fixed base-quality prompts: every shape x colour (64), each on a background, cycling so
/// that every background appears 16 times and with every shape twice:
/// "a red circle on a white background".
pub fn base_quality_prompts() -> Vec<String> {
    let mut out = Vec::new();
    for (s, shape) in Shape::ALL.iter().enumerate() {
        for (c, colour) in Colour::ALL.iter().enumerate() {
            let bg = Background::ALL[(s + c) % Background::ALL.len()];
            out.push(format!("{} {} {} on a {} background", article(colour.name()), colour.name(), shape.name(), bg.name()));
        }
    }
    out
}

/// The fixed other-class prompts for prior preservation with a subject of class `class`: six
/// prompts, each of a different other class, with a colour, half of them with a background.
pub fn other_class_prompts(class: Shape) -> Vec<String> {
    let n = Shape::ALL.len();
    (1..=6)
        .map(|k| {
            let shape = Shape::ALL[(class.index() + k) % n];
            let colour = Colour::ALL[(class.index() + 3 * k) % Colour::ALL.len()];
            let mut p = format!("{} {} {}", article(colour.name()), colour.name(), shape.name());
            if k % 2 == 0 {
                p += &format!(" on a {} background", Background::ALL[k / 2 % Background::ALL.len()].name());
            }
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caption::parse_prompt;
    use crate::judge::Scored;
    use crate::scene::{Position, Size};

    fn pred(shape: Shape, colour: Colour, background: Background) -> Prediction {
        Prediction {
            shape: Scored { value: shape, prob: 1.0 },
            colour: Scored { value: colour, prob: 1.0 },
            background: Scored { value: background, prob: 1.0 },
            size: Scored { value: Size::Large, prob: 1.0 },
            position: Scored { value: Position::Center, prob: 1.0 },
            pattern: Scored { value: "none", prob: 1.0 },
            mark: Scored { value: false, prob: 1.0 },
        }
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn cosine_and_centroid() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert!((cosine(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert_eq!(centroid(&[vec![1.0, 2.0], vec![3.0, 4.0]]), vec![2.0, 3.0]);
    }

    #[test]
    fn subject_fidelity_is_the_mean_over_all_pairs() {
        let inst = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        assert!((subject_fidelity(&[vec![1.0, 0.0]], &inst) - 0.5).abs() < 1e-12);
        assert!((subject_fidelity(&inst, &inst) - 0.5).abs() < 1e-12);
        assert!((subject_fidelity(&[vec![1.0, 1.0]], &inst) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert!(subject_fidelity(&[], &inst).is_nan());
    }

    #[test]
    fn prompt_fidelity_counts_stated_attributes() {
        let p = parse_prompt("a red star on a black background");
        assert_eq!(p.count(), 3);
        let items = vec![
            (p, pred(Shape::Star, Colour::Red, Background::Black)),   // 3/3
            (p, pred(Shape::Star, Colour::Blue, Background::Black)),  // 2/3
            (p, pred(Shape::Circle, Colour::Blue, Background::White)), // 0/3
            (parse_prompt("a sks thing"), pred(Shape::Circle, Colour::Blue, Background::White)), // nothing stated: 1
        ];
        assert!((prompt_fidelity(&items) - (1.0 + 2.0 / 3.0 + 0.0 + 1.0) / 4.0).abs() < 1e-12);
        assert!((prompt_agreement(&parse_prompt("a sks star"), &items[0].1) - 1.0).abs() < 1e-12);
        assert!(prompt_fidelity(&[]).is_nan());
    }

    #[test]
    fn prior_preservation_is_a_ratio() {
        assert!((prior_preservation(0.45, 0.9) - 0.5).abs() < 1e-12);
        assert!((prior_preservation(0.9, 0.9) - 1.0).abs() < 1e-12);
        assert!(prior_preservation(0.5, 0.0).is_nan());
    }

    #[test]
    fn drift_threshold_is_the_worst_leave_one_out_cosine_with_a_margin() {
        // Three instances at angles -0.2, 0, 0.3 rad: the worst leave-one-out is the one at 0.3
        // against the centroid of the other two (angle -0.1): cos(0.4).
        let at = |a: f32| vec![a.cos(), a.sin()];
        let inst = vec![at(-0.2), at(0.0), at(0.3)];
        let want = (0.4f64).cos() * DRIFT_MARGIN;
        assert!((drift_threshold(&inst) - want).abs() < 1e-6, "{} vs {want}", drift_threshold(&inst));
        assert!(drift_threshold(&inst[..1]).is_nan());
    }

    #[test]
    fn language_drift_counts_class_images_that_look_like_the_instance() {
        let at = |a: f32| vec![a.cos(), a.sin()];
        let inst = vec![at(-0.1), at(0.0), at(0.1)];
        // Centroid at angle 0; threshold = cos(0.15) * 0.95 ~ 0.939, i.e. within ~0.35 rad.
        let class = vec![at(0.05), at(0.3), at(1.0), at(-1.5)];
        assert!((language_drift(&class, &inst) - 0.5).abs() < 1e-12);
        assert_eq!(language_drift(&[at(1.2), at(2.0)], &inst), 0.0);
        assert!(language_drift(&[], &inst).is_nan());
    }

    #[test]
    fn diversity_is_mean_pairwise_distance() {
        let same = vec![unit(&[1.0, 2.0]); 3];
        assert!(diversity(&same).abs() < 1e-6);
        let orth = vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]];
        assert!((diversity(&orth) - 1.0).abs() < 1e-12);
        let mixed = vec![vec![1.0, 0.0], vec![1.0, 0.0], vec![-1.0, 0.0]];
        assert!((diversity(&mixed) - 4.0 / 3.0).abs() < 1e-12);
        assert!(diversity(&same[..1]).is_nan());
    }

    #[test]
    fn base_quality_scores_shape_and_colour_together() {
        let p = parse_prompt("a red star on a black background");
        let q = parse_prompt("a blue circle");
        let items = vec![
            (p, pred(Shape::Star, Colour::Red, Background::Black)),
            (p, pred(Shape::Star, Colour::Orange, Background::Black)),
            (p, pred(Shape::Heart, Colour::Red, Background::White)),
            (q, pred(Shape::Circle, Colour::Blue, Background::White)),
        ];
        let b = base_quality(&items);
        assert!((b.shape_colour_accuracy - 0.5).abs() < 1e-12);
        assert!((b.background_accuracy - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn fixed_prompt_sets_cover_what_they_claim() {
        let prompts = base_quality_prompts();
        assert_eq!(prompts.len(), 64);
        let parsed: Vec<PromptAttributes> = prompts.iter().map(|p| parse_prompt(p)).collect();
        for s in Shape::ALL {
            for c in Colour::ALL {
                assert_eq!(parsed.iter().filter(|p| p.shape == Some(s) && p.colour == Some(c)).count(), 1, "{s} {c}");
            }
        }
        for b in Background::ALL {
            assert_eq!(parsed.iter().filter(|p| p.background == Some(b)).count(), 16);
        }
        assert!(prompts.contains(&"an orange circle on a black background".to_string()));
        for class in Shape::ALL {
            let other = other_class_prompts(class);
            assert_eq!(other.len(), 6);
            let shapes: std::collections::HashSet<Shape> = other.iter().map(|p| parse_prompt(p).shape.unwrap()).collect();
            assert_eq!(shapes.len(), 6);
            assert!(!shapes.contains(&class));
            assert!(other.iter().all(|p| parse_prompt(p).colour.is_some()));
        }
    }
}
