//! The subject an evaluation measures and a comparison trains on: one of the built-in held-out
//! concepts, or the user's own images (`--instance-dir` with its prompts). Both give the same
//! things: instance images, the instance prompt, the class prompt and the class the judge
//! knows, so `eval` and `compare` treat them alike.
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::RgbImage;
use knobs_train::finetune::data::{image_files, open_rgb};
use knobs_world::concept::{ConceptSpec, DEFAULT_INSTANCES};
use knobs_world::{Shape, parse_prompt};

/// The flags that name the user's own subject, shared by `eval` and `compare`.
#[derive(clap::Args, Debug, Clone)]
pub struct FolderArgs {
    /// Your own subject: a folder of its images (png/jpg), measured as --concept measures a
    /// built-in one.
    #[arg(long, requires = "class_prompt")]
    pub instance_dir: Option<PathBuf>,
    /// The prompt naming the subject, e.g. "a sks circle" (default: the images' .txt caption
    /// when they all agree); its own word is the token textual inversion learns.
    #[arg(long, requires = "instance_dir")]
    pub instance_prompt: Option<String>,
    /// The subject's class, e.g. "a circle": language drift and prior preservation are
    /// measured against it.
    #[arg(long, requires = "instance_dir")]
    pub class_prompt: Option<String>,
}

impl FolderArgs {
    /// The subject these flags name, if `--instance-dir` is given.
    pub fn subject(&self) -> Result<Option<Subject>> {
        match &self.instance_dir {
            Some(dir) => Ok(Some(Subject::folder(dir, self.instance_prompt.as_deref(), self.class_prompt.as_deref())?)),
            None => Ok(None),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Images {
    Concept(ConceptSpec),
    Folder(PathBuf),
}

/// A subject: where its images come from and the prompts that name it.
#[derive(Clone, Debug, PartialEq)]
pub struct Subject {
    /// The concept's name, or the folder's name (run folders and reports use it).
    pub name: String,
    pub instance_prompt: String,
    pub class_prompt: String,
    /// The class the judge reads from the class prompt; other-class prompts avoid it.
    pub class: Shape,
    /// The subject's own word: the concept's token, or the first word of the instance prompt
    /// that the class prompt does not have (a learned token's placeholder).
    pub token: String,
    images: Images,
}

impl Subject {
    /// A built-in concept, named in prompts by `token` (its own token, or a learned embedding's).
    pub fn concept(spec: ConceptSpec, token: &str) -> Subject {
        Subject {
            name: spec.name.clone(),
            instance_prompt: format!("a {token} {}", spec.shape.name()),
            class_prompt: spec.class_prompt(),
            class: spec.shape,
            token: token.to_string(),
            images: Images::Concept(spec),
        }
    }

    /// The user's images in `dir`. The instance prompt defaults to the images' `.txt` captions
    /// when they all say the same; the class prompt must name a class the judge knows.
    pub fn folder(dir: &Path, instance_prompt: Option<&str>, class_prompt: Option<&str>) -> Result<Subject> {
        let files = image_files(dir, "--instance-dir")?;
        let instance_prompt = match instance_prompt {
            Some(p) if p.trim().is_empty() => bail!("--instance-prompt must not be empty"),
            Some(p) => p.to_string(),
            None => common_caption(&files).with_context(|| {
                format!("--instance-dir {}: give --instance-prompt (the images have no single shared .txt caption)", dir.display())
            })?,
        };
        let Some(class_prompt) = class_prompt else {
            bail!("--instance-dir {} needs --class-prompt (e.g. \"a circle\"): language drift and prior preservation are measured against it", dir.display());
        };
        let Some(class) = parse_prompt(class_prompt).shape else {
            let known: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
            bail!("--class-prompt \"{class_prompt}\" names no class the judge knows; it knows {}", known.join(", "));
        };
        let class_words: Vec<String> = words(class_prompt).collect();
        let token = words(&instance_prompt).find(|w| !class_words.contains(w)).with_context(|| {
            format!("--instance-prompt \"{instance_prompt}\" has no word of its own beside --class-prompt \"{class_prompt}\"")
        })?;
        let name = dir.file_name().map_or_else(|| "instances".to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Subject {
            name,
            instance_prompt,
            class_prompt: class_prompt.to_string(),
            class,
            token,
            images: Images::Folder(dir.to_path_buf()),
        })
    }

    /// The instance images: a concept's rendered at `size`, a folder's as they are (the judge
    /// resizes what is not its size).
    pub fn instance_images(&self, size: u32) -> Result<Vec<RgbImage>> {
        match &self.images {
            Images::Concept(spec) => Ok(spec.instance_images(DEFAULT_INSTANCES, size).into_iter().map(|(img, _)| img).collect()),
            Images::Folder(dir) => image_files(dir, "--instance-dir")?.iter().map(|p| open_rgb(p)).collect(),
        }
    }

    /// The flags that select this subject in `knobs train`; `learns_token`: the method learns
    /// a new token (a concept names its own; a folder's is its token, started from its class).
    pub fn train_flags(&self, learns_token: bool) -> Vec<OsString> {
        match &self.images {
            Images::Concept(spec) => vec!["--concept".into(), spec.name.clone().into()],
            Images::Folder(dir) => {
                let mut v: Vec<OsString> =
                    vec!["--instance-dir".into(), dir.into(), "--instance-prompt".into(), self.instance_prompt.clone().into()];
                if learns_token {
                    v.extend(["--placeholder-token".into(), self.token.clone().into(), "--initializer-token".into(), self.class.name().into()]);
                }
                v
            }
        }
    }

    /// The flags that select this subject in `knobs eval`.
    pub fn eval_flags(&self) -> Vec<OsString> {
        match &self.images {
            Images::Concept(spec) => vec!["--concept".into(), spec.name.clone().into()],
            Images::Folder(dir) => vec![
                "--instance-dir".into(),
                dir.into(),
                "--instance-prompt".into(),
                self.instance_prompt.clone().into(),
                "--class-prompt".into(),
                self.class_prompt.clone().into(),
            ],
        }
    }

    /// What identifies the subject in a comparison's settings, so that runs on other images or
    /// prompts are never mixed into one report.
    pub fn settings(&self) -> serde_json::Value {
        match &self.images {
            Images::Concept(spec) => spec.name.clone().into(),
            Images::Folder(dir) => serde_json::json!({
                "instance_dir": dir.display().to_string(),
                "instance_prompt": self.instance_prompt,
                "class_prompt": self.class_prompt,
            }),
        }
    }
}

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase)
}

/// The caption every image's `.txt` holds, if they all exist and agree.
fn common_caption(files: &[PathBuf]) -> Option<String> {
    let mut caption: Option<String> = None;
    for f in files {
        let text = std::fs::read_to_string(f.with_extension("txt")).ok()?.trim().to_string();
        match &caption {
            Some(c) if *c != text => return None,
            _ => caption = Some(text),
        }
    }
    caption.filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_concept_folder_reads_back_as_the_concept() {
        let spec = knobs_world::concept::held_out().remove(0);
        let dir = std::env::temp_dir().join(format!("knobs-subject-{}", std::process::id()));
        knobs_world::dataset::write_concept(&dir.join(&spec.name), &spec, DEFAULT_INSTANCES, 32).unwrap();
        let folder = Subject::folder(&dir.join(&spec.name), None, Some(&spec.class_prompt())).unwrap();
        let builtin = Subject::concept(spec.clone(), &spec.token);
        assert_eq!(folder.instance_prompt, builtin.instance_prompt);
        assert_eq!(folder.token, spec.token);
        assert_eq!((folder.class_prompt.as_str(), folder.class, folder.name.as_str()), (builtin.class_prompt.as_str(), builtin.class, builtin.name.as_str()));
        assert_eq!(folder.instance_images(32).unwrap(), builtin.instance_images(32).unwrap());

        let err = Subject::folder(&dir.join(&spec.name), None, Some("a dog")).unwrap_err().to_string();
        assert!(err.contains("--class-prompt \"a dog\""), "{err}");
        let err = Subject::folder(&dir.join(&spec.name), None, None).unwrap_err().to_string();
        assert!(err.contains("needs --class-prompt"), "{err}");
        std::fs::write(dir.join(&spec.name).join("00001.txt"), "something else").unwrap();
        let err = Subject::folder(&dir.join(&spec.name), None, Some("a circle")).unwrap_err().to_string();
        assert!(err.contains("give --instance-prompt"), "{err}");
        let err = Subject::folder(&dir.join(&spec.name), Some("a circle"), Some("a circle")).unwrap_err().to_string();
        assert!(err.contains("no word of its own"), "{err}");
        let err = Subject::folder(&dir.join("missing"), Some("a x circle"), Some("a circle")).unwrap_err().to_string();
        assert!(err.contains("--instance-dir") && err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
