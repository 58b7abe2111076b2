//! Where tensor work runs. burn dispatches on the device at run time, so every layer, adapter
//! and pipeline runs unchanged on any backend compiled in; a command picks one with
//! `--device` and passes it down. The CPU (burn's `flex`) is always there; GPU backends come
//! with the cargo features `cuda`, `wgpu` and `vulkan`.
use std::fmt;
use std::str::FromStr;
use std::sync::RwLock;

use burn::tensor::Device;

use crate::{Error, Result};

/// A backend and which of its devices, as `--device` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Target {
    /// burn's pure-Rust CPU backend.
    #[default]
    Cpu,
    /// NVIDIA GPU `N` (CUDA runtime, cargo feature `cuda`).
    Cuda(usize),
    /// A GPU through wgpu on the platform's own API (cargo feature `wgpu`).
    Wgpu(Adapter),
    /// A GPU through wgpu pinned to Vulkan (cargo feature `vulkan`).
    Vulkan(Adapter),
}

/// Which wgpu adapter: the one wgpu prefers, discrete GPU `N`, or a CPU driver (lavapipe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adapter {
    Default,
    Discrete(usize),
    Cpu,
}

impl Target {
    /// Whether this build can run on `self` (its cargo feature was compiled in).
    pub fn compiled_in(self) -> bool {
        match self {
            Target::Cpu => true,
            Target::Cuda(_) => cfg!(feature = "cuda"),
            Target::Wgpu(_) => cfg!(feature = "wgpu"),
            Target::Vulkan(_) => cfg!(feature = "vulkan"),
        }
    }

    /// The cargo feature that brings this backend in.
    fn feature(self) -> &'static str {
        match self {
            Target::Cpu => "",
            Target::Cuda(_) => "cuda",
            Target::Wgpu(_) => "wgpu",
            Target::Vulkan(_) => "vulkan",
        }
    }

    /// Whether the fused CPU kernels (attention, frozen half-precision linear) apply.
    pub fn is_cpu(self) -> bool {
        self == Target::Cpu
    }

    /// The burn device, without autodiff. Errors when the backend was not compiled in.
    pub fn device(self) -> Result<Device> {
        if !self.compiled_in() {
            return Err(Error::Invalid(format!(
                "--device {self}: this knobs was built without the `{}` feature (rebuild with `cargo build --release --features {}`); compiled in: {}",
                self.feature(),
                self.feature(),
                compiled_in().join(", ")
            )));
        }
        Ok(self.device_unchecked())
    }

    /// [`Self::device`], checked to come up: a first tensor made and read back there.
    fn bring_up(self) -> Result<Device> {
        let device = self.device()?;
        probe(&device, self)?;
        Ok(device)
    }

    #[allow(unused_variables)]
    fn device_unchecked(self) -> Device {
        match self {
            Target::Cpu => Device::flex(),
            #[cfg(feature = "cuda")]
            Target::Cuda(n) => Device::cuda(n),
            #[cfg(feature = "wgpu")]
            Target::Wgpu(a) => Device::wgpu(a.kind()),
            #[cfg(feature = "vulkan")]
            Target::Vulkan(a) => Device::vulkan(a.kind()),
            #[allow(unreachable_patterns)]
            _ => unreachable!("checked by compiled_in"),
        }
    }
}

impl Adapter {
    #[cfg(any(feature = "wgpu", feature = "vulkan"))]
    fn kind(self) -> burn::tensor::DeviceKind {
        use burn::tensor::DeviceKind;
        match self {
            Adapter::Default => DeviceKind::DefaultDevice,
            Adapter::Discrete(n) => DeviceKind::DiscreteGpu(n),
            Adapter::Cpu => DeviceKind::Cpu,
        }
    }
}

/// Backends this build can run on, as `--device` names them.
pub fn compiled_in() -> Vec<&'static str> {
    let mut names = vec!["cpu"];
    if cfg!(feature = "cuda") {
        names.push("cuda[:N]");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu[:N|:cpu]");
    }
    if cfg!(feature = "vulkan") {
        names.push("vulkan[:N|:cpu]");
    }
    names
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let adapter = |f: &mut fmt::Formatter<'_>, name: &str, a: &Adapter| match a {
            Adapter::Default => write!(f, "{name}"),
            Adapter::Discrete(n) => write!(f, "{name}:{n}"),
            Adapter::Cpu => write!(f, "{name}:cpu"),
        };
        match self {
            Target::Cpu => write!(f, "cpu"),
            Target::Cuda(n) => write!(f, "cuda:{n}"),
            Target::Wgpu(a) => adapter(f, "wgpu", a),
            Target::Vulkan(a) => adapter(f, "vulkan", a),
        }
    }
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Target> {
        let bad = || Error::Invalid(format!("--device {s:?}: expected cpu, cuda[:N], wgpu[:N|:cpu] or vulkan[:N|:cpu]"));
        let (name, index) = match s.trim().split_once(':') {
            Some((n, i)) => (n, Some(i)),
            None => (s.trim(), None),
        };
        let number = |i: &str| i.parse::<usize>().map_err(|_| bad());
        let adapter = |i: Option<&str>| match i {
            None => Ok(Adapter::Default),
            Some("cpu") => Ok(Adapter::Cpu),
            Some(i) => number(i).map(Adapter::Discrete),
        };
        match name.to_ascii_lowercase().as_str() {
            "cpu" if index.is_none() => Ok(Target::Cpu),
            "cuda" => Ok(Target::Cuda(index.map(number).transpose()?.unwrap_or(0))),
            "wgpu" => Ok(Target::Wgpu(adapter(index)?)),
            "vulkan" => Ok(Target::Vulkan(adapter(index)?)),
            _ => Err(bad()),
        }
    }
}

/// Parses a comma-separated `--devices` list (data-parallel training), each as `--device`.
pub fn parse_list(s: &str) -> Result<Vec<Target>> {
    let list = s.split(',').filter(|p| !p.trim().is_empty()).map(str::parse).collect::<Result<Vec<Target>>>()?;
    if list.is_empty() {
        return Err(Error::Invalid(format!("--devices {s:?}: name at least one device")));
    }
    Ok(list)
}

static SELECTED: RwLock<Target> = RwLock::new(Target::Cpu);

/// Makes `target` the device of this process's commands (`--device`), after checking that it
/// is compiled in and comes up (a first tensor is made and read back there).
pub fn select(target: Target) -> Result<()> {
    crate::ops::conv2d_by_matmul::Mode::from_env()?;
    target.bring_up()?;
    *SELECTED.write().unwrap_or_else(|e| e.into_inner()) = target;
    Ok(())
}

/// The device `--device` chose (the CPU unless a command selected another).
pub fn selected() -> Target {
    *SELECTED.read().unwrap_or_else(|e| e.into_inner())
}

/// The selected device, without autodiff: generation, evaluation, loading.
pub fn inference() -> Device {
    selected().device_unchecked()
}

/// The selected device with autodiff, for training.
pub fn training() -> Device {
    inference().autodiff()
}

/// `target` with autodiff, for a training replica on it (data-parallel training); brought
/// up like [`select`] does.
pub fn training_on(target: Target) -> Result<Device> {
    Ok(target.bring_up()?.autodiff())
}

/// A backend that is compiled in may still find no device (no driver, no GPU): burn panics
/// inside its runtime then. Caught here once, so the user reads which device and why. The
/// runtimes bring a device up on a thread of their own, where the driver's reason is; the
/// caller's panic only says a channel closed. So the first panic of any thread meanwhile is
/// kept as the reason, and none is printed. The hook is the process's, so probes take turns:
/// two at once (tests selecting devices on parallel threads) took each other's hooks, and a
/// reason went to the wrong probe.
fn probe(device: &Device, target: Target) -> Result<()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let device = device.clone();
    let first_panic = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let previous_hook = std::panic::take_hook();
    let seen = first_panic.clone();
    std::panic::set_hook(Box::new(move |info| {
        let mut first = seen.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| info.payload_as_str().unwrap_or("a panic without a message").to_string());
    }));
    let outcome = std::panic::catch_unwind(move || {
        let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device);
        (t * 2.0).into_data().convert::<f32>().try_into_vec::<f32>().ok()
    });
    std::panic::set_hook(previous_hook);
    match outcome {
        Ok(Some(v)) if v == [2.0, 4.0] => Ok(()),
        Ok(other) => Err(Error::Invalid(format!("--device {target}: a first tensor came back wrong ({other:?})"))),
        Err(panic) => {
            let reason = first_panic.lock().unwrap_or_else(|e| e.into_inner()).take();
            let reason = reason.unwrap_or_else(|| crate::error::panic_message(&*panic));
            Err(Error::Invalid(format!("--device {target}: the device did not come up: {reason}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip() {
        for s in ["cpu", "cuda:0", "cuda:3", "wgpu", "wgpu:1", "wgpu:cpu", "vulkan", "vulkan:cpu"] {
            assert_eq!(s.parse::<Target>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<Target>().unwrap(), Target::Cuda(0));
        assert_eq!(parse_list("cuda:0,cuda:1").unwrap(), vec![Target::Cuda(0), Target::Cuda(1)]);
    }

    #[test]
    fn bad_device_names_are_refused_by_flag() {
        for s in ["gpu", "cpu:1", "cuda:x", "wgpu:-1", ""] {
            let e = s.parse::<Target>().unwrap_err().to_string();
            assert!(e.contains("--device"), "{s}: {e}");
        }
        assert!(parse_list(",").unwrap_err().to_string().contains("--devices"));
    }

    #[test]
    fn backends_not_compiled_in_are_named_with_the_feature() {
        if !cfg!(feature = "cuda") {
            let e = Target::Cuda(0).device().unwrap_err().to_string();
            assert!(e.contains("--device cuda:0") && e.contains("`cuda` feature"), "{e}");
        }
        assert!(Target::Cpu.device().is_ok());
        select(Target::Cpu).unwrap();
        assert_eq!(selected(), Target::Cpu);
    }
}
