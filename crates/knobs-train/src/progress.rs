//! What a training loop tells its caller after each optimizer step (the CLI draws a bar).
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    pub phase: &'static str,
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    /// Mean seconds per optimizer step so far in this process, where the loop measures it.
    pub seconds_per_step: Option<f64>,
}

pub type Progress<'a> = &'a mut dyn FnMut(&Tick);

/// Peak resident memory of this process in bytes (Linux `VmHWM`); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resident memory of this process now, in bytes (Linux `VmRSS`); `None` elsewhere.
pub fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// A `kB` line of `/proc/self/status`, in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
