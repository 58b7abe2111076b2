//! How a child process of `knobs bench` / `knobs compare` ended, in words.
use std::process::ExitStatus;

/// `exit status 1`, or for a process killed by a signal its number and, for SIGKILL, the
/// likeliest sender: the kernel's out-of-memory killer, which leaves the child no time to
/// say anything, so this is the only report of it.
pub fn ended(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(9) => "killed by signal 9 (SIGKILL): most often the kernel's out-of-memory killer (`dmesg` says)".into(),
        Some(s) => format!("killed by signal {s}"),
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_killed_child_is_named_as_such() {
        assert!(ended(ExitStatus::from_raw(9)).contains("out-of-memory"));
        assert_eq!(ended(ExitStatus::from_raw(15)), "killed by signal 15");
        assert_eq!(ended(ExitStatus::from_raw(1 << 8)), "exit status: 1");
    }
}
