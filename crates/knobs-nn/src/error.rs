use std::path::{Path, PathBuf};

/// Every failure names what was at fault: the file, the key or the setting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {msg}", file.display())]
    File { file: PathBuf, msg: String },
    #[error("{}: key `{key}`: {msg}", file.display())]
    Key { file: PathBuf, key: String, msg: String },
    #[error("`{key}`: {msg}")]
    Param { key: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn file(file: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::File { file: file.as_ref().to_path_buf(), msg: msg.to_string() }
    }
    pub fn key(file: impl AsRef<Path>, key: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Key { file: file.as_ref().to_path_buf(), key: key.into(), msg: msg.to_string() }
    }
    pub fn param(key: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Param { key: key.into(), msg: msg.to_string() }
    }
    /// Attaches a file to an error that only knew its key.
    pub fn in_file(self, file: impl AsRef<Path>) -> Self {
        match self {
            Error::Param { key, msg } => Error::key(file, key, msg),
            Error::Invalid(msg) => Error::file(file, msg),
            other => other,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The message a caught panic carried (`panic!` with a literal or a formatted string), to
/// name in the error it becomes.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}
