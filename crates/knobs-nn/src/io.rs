//! safetensors in and out. Files are read whole and checked; writes are atomic (a temporary
//! file in the same folder, then a rename) so an interrupted write never leaves half a file.
use std::collections::{BTreeMap, HashMap};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use safetensors::Dtype;

use crate::module::{Module, ModuleExt};
use crate::{Error, Result, Tensor};

/// Named tensors read from one file, with the file's metadata.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    pub file: PathBuf,
    pub tensors: BTreeMap<String, TensorData>,
    pub metadata: HashMap<String, String>,
}

impl StateDict {
    pub fn get(&self, key: &str) -> Result<&TensorData> {
        self.tensors.get(key).ok_or_else(|| Error::key(&self.file, key, "missing from the file"))
    }
    /// The tensor as f32 values with its shape.
    pub fn f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let d = self.get(key)?;
        let shape = d.shape().as_slice().to_vec();
        let values = d.clone().convert::<f32>().try_into_vec::<f32>().map_err(|e| Error::key(&self.file, key, format!("{e:?}")))?;
        Ok((values, shape))
    }
    /// How far `other` is from `self`: the largest absolute difference of any value over the
    /// largest absolute value of `self`, across every tensor (one scale for the whole file:
    /// a freshly zero-initialised tensor has no scale of its own). Both must hold the same
    /// keys and shapes.
    pub fn relative_distance(&self, other: &StateDict) -> Result<f32> {
        let (mut diff, mut scale) = (0f32, 0f32);
        for key in self.tensors.keys() {
            let (a, shape) = self.f32(key)?;
            let (b, other_shape) = other.f32(key)?;
            if shape != other_shape {
                return Err(Error::key(&other.file, key, format!("shape {other_shape:?}, {} has {shape:?}", self.file.display())));
            }
            scale = a.iter().fold(scale, |m, v| m.max(v.abs()));
            diff = a.iter().zip(&b).fold(diff, |m, (x, y)| m.max((x - y).abs()));
        }
        if let Some(key) = other.tensors.keys().find(|k| !self.tensors.contains_key(*k)) {
            return Err(Error::key(&self.file, key, format!("missing; {} has it", other.file.display())));
        }
        Ok(diff / scale)
    }
    /// Refuses NaN and infinite values, naming the first tensor that holds one: such a file
    /// (diverged training, a bad conversion) otherwise loads and silently breaks every output.
    pub fn refuse_non_finite(&self) -> Result<()> {
        for (key, data) in &self.tensors {
            // Integer tensors are always finite; every float tensor is read as f32.
            let Ok(values) = data.as_slice::<f32>() else { continue };
            let bad: Vec<(usize, f32)> = values.iter().copied().enumerate().filter(|(_, v)| !v.is_finite()).collect();
            if let Some(&(i, v)) = bad.first() {
                let msg = format!("{} of {} values are not finite (the first, at flat index {i}, is {v}): the file is corrupt or its training diverged", bad.len(), values.len());
                return Err(Error::key(&self.file, key, msg));
            }
        }
        Ok(())
    }
}

/// The extensions of PyTorch pickle files. Unpickling can run arbitrary code, so knobs never
/// opens such a file; every reader of user-supplied weights refuses these by name.
pub const PICKLE_EXTENSIONS: &[&str] = &["pt", "pth", "bin", "ckpt", "pkl"];

/// Refuses `path` unread when its extension says it is a pickle. `how_to_convert`, when not
/// empty, tells the user what the .safetensors file must hold.
pub fn refuse_pickle(path: impl AsRef<Path>, how_to_convert: &str) -> Result<()> {
    let path = path.as_ref();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    if !PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        return Ok(());
    }
    let how = if how_to_convert.is_empty() { String::new() } else { format!(" ({how_to_convert})") };
    Err(Error::file(path, format!("a PyTorch pickle (.{ext}): knobs never executes pickles; convert it to .safetensors first{how}")))
}

/// True for the first bytes of a torch pickle: a zip archive (torch >= 1.6) or a bare pickle
/// stream (protocol 2+ starts with 0x80), unless they are a safetensors header (an 8-byte
/// length, then `{`).
fn looks_pickled(bytes: &[u8]) -> bool {
    let safetensors = bytes.get(8) == Some(&b'{');
    !safetensors && (bytes.starts_with(b"PK\x03\x04") || bytes.first() == Some(&0x80))
}

/// Reads user-supplied weights (adapters, embeddings): pickles are refused by extension,
/// unread, and tensors holding NaN or infinity by name.
pub fn read_checked(path: impl AsRef<Path>, how_to_convert: &str) -> Result<StateDict> {
    let path = path.as_ref();
    refuse_pickle(path, how_to_convert)?;
    let sd = read_safetensors(path)?;
    sd.refuse_non_finite()?;
    Ok(sd)
}

/// Reads a safetensors file. Floating tensors become f32, integer tensors i64.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<StateDict> {
    SafetensorsReader::open(path)?.read_all()
}

/// A safetensors file read tensor by tensor: the header is parsed and checked when the file is
/// opened, each tensor is read from disk and converted to f32 (or i64) only when asked. Loading
/// a model from it holds the model and one tensor in memory, never the whole file beside them
/// (an fp16 UNet file of 1.7 GB costs its 3.4 GB of f32 weights, not 1.7 + 3.4 + 3.4).
pub struct SafetensorsReader {
    path: PathBuf,
    handle: std::fs::File,
    /// Where the tensor data starts: after the 8-byte length and the JSON header.
    data_start: u64,
    tensors: BTreeMap<String, safetensors::tensor::TensorInfo>,
    metadata: HashMap<String, String>,
}

impl SafetensorsReader {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        use std::os::unix::fs::FileExt;
        let path = path.as_ref().to_path_buf();
        let io_err = |e: std::io::Error| Error::file(&path, format!("cannot read: {e}"));
        let handle = std::fs::File::open(&path).map_err(io_err)?;
        let file_len = handle.metadata().map_err(io_err)?.len();
        let mut head = [0u8; 9];
        let got = handle.read_at(&mut head, 0).map_err(io_err)?;
        let invalid = |why: String| {
            if looks_pickled(&head[..got]) {
                Error::file(&path, "a PyTorch pickle by its content, whatever its name: knobs never executes pickles; convert it to .safetensors first")
            } else {
                Error::file(&path, format!("not a valid safetensors file ({why})"))
            }
        };
        if got < 9 {
            return Err(invalid(format!("only {file_len} bytes")));
        }
        let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if n > 100 << 20 || 8 + n > file_len {
            return Err(invalid(format!("header length {n} in a file of {file_len} bytes")));
        }
        let mut header = vec![0u8; n as usize];
        handle.read_exact_at(&mut header, 8).map_err(io_err)?;
        // safetensors' own Metadata checks that the tensors tile the data without gaps.
        let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header).map_err(|e| invalid(e.to_string()))?;
        let data_len = meta.tensors().values().map(|t| t.data_offsets.1).max().unwrap_or(0) as u64;
        if 8 + n + data_len != file_len {
            return Err(invalid(format!("the header describes {} bytes, the file holds {file_len}", 8 + n + data_len)));
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = meta.tensors().into_iter().map(|(k, t)| (k, t.clone())).collect();
        Ok(SafetensorsReader { path, handle, data_start: 8 + n, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shape of `key`, from the header (nothing is read).
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    /// The string metadata of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    /// One tensor: floating types as f32, integer types as i64, u8 as u8.
    pub fn read(&self, key: &str) -> Result<TensorData> {
        let info = self.tensors.get(key).ok_or_else(|| Error::key(&self.path, key, "missing from the file"))?;
        let (start, end) = info.data_offsets;
        let n: usize = info.shape.iter().product();
        let shape = info.shape.clone();
        Ok(match info.dtype {
            Dtype::F32 => {
                let mut v: Vec<f32> = self.read_values(key, n)?;
                v.iter_mut().for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
                TensorData::new(v, shape)
            }
            Dtype::F16 | Dtype::BF16 => {
                let bf16 = info.dtype == Dtype::BF16;
                TensorData::new(self.read_halves_through(key, |src, dst| crate::ops::precision::half_to_f32(src, bf16, dst))?, shape)
            }
            // Optimizer state kept as 8-bit codes (8-bit AdamW).
            Dtype::U8 => TensorData::new(self.read_values::<u8>(key, n)?, shape),
            Dtype::F64 | Dtype::I64 | Dtype::I32 => {
                let bytes: Vec<u8> = self.read_values(key, end - start)?;
                let eight = |b: &[u8]| -> [u8; 8] { b.try_into().expect("8 bytes") };
                match info.dtype {
                    Dtype::F64 => TensorData::new(bytes.chunks_exact(8).map(|b| f64::from_le_bytes(eight(b)) as f32).collect(), shape),
                    Dtype::I64 => TensorData::new(bytes.chunks_exact(8).map(|b| i64::from_le_bytes(eight(b))).collect::<Vec<_>>(), shape),
                    _ => TensorData::new(bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64).collect::<Vec<_>>(), shape),
                }
            }
            other => return Err(Error::key(&self.path, key, format!("unsupported dtype {other:?}"))),
        })
    }

    /// [`Self::read`], except that f16 or bf16 data comes back in `keep` when that is f16 or
    /// bf16: as the file holds it where the dtypes agree (a model loaded in half precision from
    /// a half-precision file is neither widened nor narrowed back), else converted piece by
    /// piece, rounded as narrowing its f32 values rounds them. `keep` is for what is stored
    /// narrow: a vector read so would be widened again from the rounded values.
    pub fn read_as(&self, key: &str, keep: Option<DType>) -> Result<TensorData> {
        let Some(info) = self.tensors.get(key) else { return self.read(key) };
        let shape = info.shape.clone();
        match (info.dtype, keep) {
            (Dtype::F16, Some(DType::F16)) => Ok(TensorData::new(self.read_halves::<half::f16>(key)?, shape)),
            (Dtype::BF16, Some(DType::BF16)) => Ok(TensorData::new(self.read_halves::<half::bf16>(key)?, shape)),
            // Converted as they arrive, never widened whole.
            (Dtype::F16, Some(DType::BF16)) => Ok(TensorData::new(self.read_halves_through::<half::bf16>(key, |src, dst| crate::ops::precision::half_to_half(src, false, dst))?, shape)),
            (Dtype::BF16, Some(DType::F16)) => Ok(TensorData::new(self.read_halves_through::<half::f16>(key, |src, dst| crate::ops::precision::half_to_half(src, true, dst))?, shape)),
            _ => self.read(key),
        }
    }

    /// `key`'s half-precision values, read in pieces through one buffer and each piece
    /// converted by `convert` as it arrives: a buffer for the whole tensor would be fresh pages
    /// to fault in, 1.7 GB for SD-1.5's UNet.
    fn read_halves_through<T: Default>(&self, key: &str, convert: impl Fn(&[u16], &mut [MaybeUninit<T>])) -> Result<Vec<T>> {
        use std::os::unix::fs::FileExt;
        const PIECE: usize = 1 << 20;
        let info = &self.tensors[key];
        let n: usize = info.shape.iter().product();
        let mut bits = vec![0u16; n.min(PIECE)];
        let mut fill = |out: &mut [MaybeUninit<T>]| -> Result<()> {
            for (i, dst) in out.chunks_mut(PIECE).enumerate() {
                let src = &mut bits[..dst.len()];
                let at = self.data_start + (info.data_offsets.0 + 2 * i * PIECE) as u64;
                self.handle.read_exact_at(as_bytes_mut(src), at).map_err(|e| Error::key(&self.path, key, format!("cannot read: {e}")))?;
                from_le_halves(src);
                convert(src, dst);
            }
            Ok(())
        };
        let mut failed = Ok(());
        // SAFETY: the pieces cover all n values, each converted in full, and a failed read
        // leaves none unwritten (zeros, then the error is returned).
        let out = unsafe {
            crate::ops::fresh::written(n, |out| {
                failed = fill(out);
                if failed.is_err() {
                    out.iter_mut().for_each(|v| {
                        v.write(T::default());
                    });
                }
            })
        };
        failed.map(|()| out)
    }

    /// The 16-bit values of `key` as they are stored, as `H` (half::f16 or bf16).
    fn read_halves<H: Plain>(&self, key: &str) -> Result<Vec<H>> {
        let mut values = self.read_values(key, self.tensors[key].shape.iter().product())?;
        from_le_halves(&mut values);
        Ok(values)
    }

    /// The first `n` values of `key`'s data as the file stores them, read straight into a new
    /// vector: not zeroed first (with freed memory kept for reuse, `vec![0; n]` clears
    /// recycled memory in full, a tenth of an SDXL load).
    fn read_values<T: Plain>(&self, key: &str, n: usize) -> Result<Vec<T>> {
        use std::os::fd::AsRawFd;
        let offset = self.data_start + self.tensors[key].data_offsets.0 as u64;
        let len = n * size_of::<T>();
        let mut out = Vec::<T>::with_capacity(n);
        let (base, mut done) = (out.as_mut_ptr().cast::<u8>(), 0);
        while done < len {
            // SAFETY: the kernel writes at most `len - done` bytes from `done`, all inside the
            // vector's allocation; no reference to the unwritten bytes is made.
            let got = unsafe { libc::pread(self.handle.as_raw_fd(), base.add(done).cast(), len - done, (offset + done as u64) as libc::off_t) };
            match got {
                0 => return Err(Error::key(&self.path, key, "cannot read: the file ends early")),
                g if g < 0 => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::key(&self.path, key, format!("cannot read: {e}")));
                    }
                }
                g => done += g as usize,
            }
        }
        // SAFETY: all n values were read, and any bit pattern is a valid T (`Plain`).
        unsafe { out.set_len(n) };
        Ok(out)
    }

    /// Every tensor in memory at once (adapters, small files, tests).
    pub fn read_all(&self) -> Result<StateDict> {
        let tensors = self.keys().map(|k| Ok((k.to_string(), self.read(k)?))).collect::<Result<_>>()?;
        Ok(StateDict { file: self.path.clone(), tensors, metadata: self.metadata.clone() })
    }
}

/// Numbers for which every bit pattern is a value, read from a file as they lie.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for u16 {}
impl Plain for u8 {}
// Transparent u16s.
impl Plain for half::f16 {}
impl Plain for half::bf16 {}

/// 16-bit values read as the file stores them (little-endian) in this machine's order.
fn from_le_halves<H: Plain>(values: &mut [H]) {
    const { assert!(size_of::<H>() == 2) };
    if cfg!(target_endian = "big") {
        as_bytes_mut(values).chunks_exact_mut(2).for_each(|b| b.swap(0, 1));
    }
}

/// The bytes of plain numbers, to write them as they lie.
fn as_bytes<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: as for `as_bytes_mut`, read-only.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The bytes of a vector of plain numbers, to read a file straight into it.
fn as_bytes_mut<T: Plain>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: a `Plain` type has no padding and no invalid bit patterns; the byte view covers
    // exactly the slice's memory and lives no longer than its borrow.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A floating-point precision: of tensors written to files, or of frozen weights in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    #[default]
    F32,
    F16,
    BF16,
}

impl FloatDtype {
    pub fn dtype(self) -> DType {
        match self {
            FloatDtype::F32 => DType::F32,
            FloatDtype::F16 => DType::F16,
            FloatDtype::BF16 => DType::BF16,
        }
    }

    /// The name flags take (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "f32",
            FloatDtype::F16 => "f16",
            FloatDtype::BF16 => "bf16",
        }
    }
}

impl std::str::FromStr for FloatDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(FloatDtype::F32),
            "f16" | "fp16" | "float16" => Ok(FloatDtype::F16),
            "bf16" | "bfloat16" => Ok(FloatDtype::BF16),
            other => Err(format!("`{other}` is not a weight precision (f32, f16 or bf16)")),
        }
    }
}

/// A tensor to write, borrowed or shared rather than copied: its values are read out only
/// when the writer reaches it, one tensor at a time, so a checkpoint or model of gigabytes is
/// never in memory twice (a burn tensor's clone shares its storage).
pub enum TensorRef<'a> {
    Data(&'a TensorData),
    Owned(TensorData),
    /// A tensor's values in order, written with `shape`.
    Shared(Tensor<1>, Vec<usize>),
    F32(&'a [f32]),
    U8(&'a [u8]),
}

impl TensorRef<'_> {
    /// A flat tensor, shared.
    pub fn flat(t: &Tensor<1>) -> TensorRef<'static> {
        TensorRef::Shared(t.clone(), t.dims().to_vec())
    }

    /// A parameter, shared.
    pub fn param(p: &crate::ParamRef<'_>) -> TensorRef<'static> {
        TensorRef::Shared(p.flat(), p.dims())
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            TensorRef::Shared(_, shape) => shape.clone(),
            TensorRef::F32(v) => vec![v.len()],
            TensorRef::U8(v) => vec![v.len()],
            TensorRef::Data(d) => d.shape().as_slice().to_vec(),
            TensorRef::Owned(d) => d.shape().as_slice().to_vec(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::Shared(t, _) => t.dtype(),
            TensorRef::F32(_) => DType::F32,
            TensorRef::U8(_) => DType::U8,
            TensorRef::Data(d) => d.dtype(),
            TensorRef::Owned(d) => d.dtype(),
        }
    }

    /// The values as a [`TensorData`] of the tensor's shape (a copy).
    pub fn to_data(&self) -> TensorData {
        let data = match self {
            TensorRef::Shared(t, _) => t.to_data(),
            TensorRef::F32(v) => TensorData::new(v.to_vec(), [v.len()]),
            TensorRef::U8(v) => TensorData::new(v.to_vec(), [v.len()]),
            TensorRef::Data(d) => return (*d).clone(),
            TensorRef::Owned(d) => return d.clone(),
        };
        let (bytes, _, dtype) = data.into_parts();
        TensorData::from_bytes(bytes, self.shape(), dtype)
    }

    /// Writes the values stored as `stored` (from [`stored_dtype`]), little-endian, checking
    /// there are `numel` of them. f32 values stored as f32 and bytes go out as they lie in
    /// memory (a parameter's or moment's storage borrowed, not copied); others are converted.
    fn write(&self, key: &str, stored: Dtype, numel: usize, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut put = |bytes: &[u8]| {
            if bytes.len() != numel * stored.bitsize() / 8 {
                return Err(std::io::Error::other(format!("`{key}`: {} bytes of values for {numel} values", bytes.len())));
            }
            w.write_all(bytes)
        };
        let err = |e: Error| std::io::Error::other(e.to_string());
        let as_is = cfg!(target_endian = "little") && stored == Dtype::F32 && self.dtype() == DType::F32;
        let bytes: std::borrow::Cow<[u8]> = match self {
            TensorRef::U8(v) => (*v).into(),
            TensorRef::F32(v) if as_is => as_bytes(v).into(),
            TensorRef::F32(v) => float_bytes(v, stored).into(),
            TensorRef::Shared(t, _) if as_is => return crate::optim::with_values(t, |v| put(as_bytes(v))),
            TensorRef::Shared(t, _) => to_bytes(key, &t.to_data(), stored).map_err(err)?.into(),
            TensorRef::Data(d) => data_bytes(key, d, stored, as_is).map_err(err)?,
            TensorRef::Owned(d) => data_bytes(key, d, stored, as_is).map_err(err)?,
        };
        put(&bytes)
    }
}

/// `d`'s bytes as [`TensorRef::write`] writes them: borrowed when they go out `as_is`.
fn data_bytes<'d>(key: &str, d: &'d TensorData, stored: Dtype, as_is: bool) -> Result<std::borrow::Cow<'d, [u8]>> {
    match d.as_slice::<f32>() {
        Ok(v) if as_is => Ok(as_bytes(v).into()),
        _ => Ok(to_bytes(key, d, stored)?.into()),
    }
}

/// How a tensor of `dtype` is stored in a file: bytes as u8, integers as i64, floats as `float`.
fn stored_dtype(dtype: DType, float: FloatDtype) -> Dtype {
    match (dtype, float) {
        (DType::U8, _) => Dtype::U8,
        (DType::I64 | DType::I32, _) => Dtype::I64,
        (_, FloatDtype::F32) => Dtype::F32,
        (_, FloatDtype::F16) => Dtype::F16,
        (_, FloatDtype::BF16) => Dtype::BF16,
    }
}

/// The little-endian bytes of `data` stored as `stored` (from [`stored_dtype`]).
fn to_bytes(key: &str, data: &TensorData, stored: Dtype) -> Result<Vec<u8>> {
    let err = |e| Error::param(key, format!("{e:?}"));
    if stored == Dtype::U8 {
        return Ok(data.as_slice::<u8>().map_err(err)?.to_vec());
    }
    if stored == Dtype::I64 {
        let v: Vec<i64> = data.clone().convert::<i64>().try_into_vec().map_err(err)?;
        return Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    let v: Vec<f32> = data.clone().convert::<f32>().try_into_vec().map_err(err)?;
    Ok(float_bytes(&v, stored))
}

/// f32 values as `stored` (f32, f16 or bf16), little-endian.
fn float_bytes(v: &[f32], stored: Dtype) -> Vec<u8> {
    match stored {
        Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Writes tensors (f32, i64 or u8) and metadata atomically.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, TensorData>,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    write_safetensors_as(path, tensors, metadata, FloatDtype::F32)
}

/// [`write_safetensors`] with floating tensors rounded to `float` (to nearest even).
pub fn write_safetensors_as(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, TensorData>,
    metadata: &HashMap<String, String>,
    float: FloatDtype,
) -> Result<()> {
    let refs = tensors.iter().map(|(k, d)| (k.clone(), TensorRef::Data(d))).collect();
    write_tensor_refs(path, &refs, metadata, float)
}

/// [`write_safetensors_as`] from tensors read out one at a time as they are written.
pub fn write_tensor_refs(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, TensorRef<'_>>,
    metadata: &HashMap<String, String>,
    float: FloatDtype,
) -> Result<()> {
    let path = path.as_ref();
    let width = |dt: Dtype| dt.bitsize() / 8;
    // Wider types first (then by name), so every tensor starts aligned to its element size.
    let mut order: Vec<(&String, &TensorRef, Dtype, Vec<usize>)> = tensors.iter().map(|(k, t)| (k, t, stored_dtype(t.dtype(), float), t.shape())).collect();
    order.sort_by(|a, b| width(b.2).cmp(&width(a.2)).then(a.0.cmp(b.0)));
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for (k, _, dt, shape) in &order {
        let bytes = shape.iter().product::<usize>() * width(*dt);
        header.insert((*k).clone(), serde_json::json!({ "dtype": dt, "shape": shape, "data_offsets": [offset, offset + bytes] }));
        offset += bytes;
    }
    if !metadata.is_empty() {
        let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), serde_json::json!(sorted));
    }
    let mut text = serde_json::to_vec(&header).map_err(|e| Error::file(path, e.to_string()))?;
    text.resize(text.len().div_ceil(8) * 8, b' ');
    atomic_write_with(path, |w| {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(&text)?;
        for (k, t, dt, shape) in &order {
            t.write(k, *dt, shape.iter().product(), w)?;
        }
        Ok(())
    })
}

/// Every parameter of `module` by path, shared rather than copied (see [`TensorRef`]): what a
/// model file is written from.
pub fn param_refs<M: Module + ?Sized>(module: &M) -> BTreeMap<String, TensorRef<'static>> {
    let mut out = BTreeMap::new();
    module.for_each_param(|path, p| {
        out.insert(path.to_string(), TensorRef::param(&p));
    });
    out
}

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a part.
pub fn atomic_write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |w| w.write_all(bytes))
}

/// Writes what `write` produces to `path` atomically: into a temporary file beside it, synced,
/// then renamed over it.
pub fn atomic_write_with(path: impl AsRef<Path>, write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>) -> Result<()> {
    use std::io::Write;
    let path = path.as_ref();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create folder: {e}")))?;
    let mut temp = tempfile::Builder::new();
    // As any new file gets them (the umask applies), not a temporary file's owner-only mode:
    // a model or adapter is read by other users' tools (a web UI's service account).
    #[cfg(unix)]
    temp.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let tmp = temp.tempfile_in(dir).map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp);
    write(&mut out).and_then(|_| out.flush()).map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
    let tmp = out.into_inner().map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
    tmp.as_file().sync_all().map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
    tmp.persist(path).map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
    Ok(())
}

/// Every parameter of `module` by path.
pub fn state_dict<M: Module + ?Sized>(module: &M) -> BTreeMap<String, TensorData> {
    let mut out = BTreeMap::new();
    module.for_each_param(|path, p| {
        out.insert(path.to_string(), p.to_data());
    });
    out
}

/// How strictly a file must fit a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Model parameters absent from the file keep their values.
    pub allow_missing: bool,
    /// File tensors that fit no parameter are ignored.
    pub allow_unexpected: bool,
    /// Frozen matrices and kernels are stored in this dtype as they load (see
    /// [`crate::ParamMut::assign_as`]); `None` keeps f32.
    pub frozen_dtype: Option<DType>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
}

impl LoadOptions {
    /// Strict, with frozen matrices and kernels stored in `dtype` as they load.
    pub fn frozen_as(dtype: DType) -> Self {
        LoadOptions { frozen_dtype: Some(dtype), ..Default::default() }
    }
}

/// Copies `sd` into `module` by path. Shapes must match; missing and unexpected keys are
/// errors unless `opts` allows them, so a wrong file never loads half-way in silence.
pub fn load_state_dict<M: Module + ?Sized>(module: &mut M, sd: &StateDict, opts: LoadOptions) -> Result<LoadReport> {
    let keys: Vec<&str> = sd.tensors.keys().map(|k| k.as_str()).collect();
    load_from(module, &sd.file, &keys, |key, _| sd.tensors.get(key).map(|d| Ok(d.clone())), opts)
}

/// [`load_state_dict`] straight from a file, one tensor at a time (see [`SafetensorsReader`]):
/// how model weights load.
pub fn load_file<M: Module + ?Sized>(module: &mut M, path: impl AsRef<Path>, opts: LoadOptions) -> Result<LoadReport> {
    load_reader(module, &SafetensorsReader::open(path)?, opts)
}

/// [`load_file`] from a file opened before (a load deferred until its weights are needed).
pub fn load_reader<M: Module + ?Sized>(module: &mut M, file: &SafetensorsReader, opts: LoadOptions) -> Result<LoadReport> {
    let keys: Vec<&str> = file.keys().collect();
    load_from(module, file.path(), &keys, |key, keep| file.tensors.contains_key(key).then(|| file.read_as(key, keep)), opts)
}

/// Loads `module` from any source of tensors by parameter path: `tensor(path, narrow)` gives
/// the parameter's data, or `None` when the source lacks it; `narrow` is the half-precision
/// dtype the parameter is stored in under `opts` (a frozen matrix or kernel), which data
/// may come in already. `keys` are the source's own names,
/// for the report of unexpected ones (a source read through a name map passes none).
pub fn load_from<M: Module + ?Sized>(
    module: &mut M,
    file: &Path,
    keys: &[&str],
    mut tensor: impl FnMut(&str, Option<DType>) -> Option<Result<TensorData>>,
    opts: LoadOptions,
) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut first_err = None;
    module.for_each_param_mut(|path, mut p| {
        if first_err.is_some() {
            return;
        }
        match tensor(path, p.narrow_storage(opts.frozen_dtype)) {
            Some(data) => match data.and_then(|d| p.assign_as(path, d, opts.frozen_dtype.unwrap_or(DType::F32))) {
                Ok(()) => report.loaded.push(path.to_string()),
                Err(e) => first_err = Some(e.in_file(file)),
            },
            None => report.missing.push(path.to_string()),
        }
    });
    if let Some(e) = first_err {
        return Err(e);
    }
    let loaded: std::collections::HashSet<&str> = report.loaded.iter().map(|s| s.as_str()).collect();
    report.unexpected = keys.iter().filter(|k| !loaded.contains(*k)).map(|k| k.to_string()).collect();
    if !opts.allow_missing && !report.missing.is_empty() {
        return Err(Error::key(file, &report.missing[0], format!("the model needs this tensor and the file lacks it ({} missing in all)", report.missing.len())));
    }
    if !opts.allow_unexpected && !report.unexpected.is_empty() {
        return Err(Error::key(file, &report.unexpected[0], format!("no parameter of the model has this name ({} such keys in all)", report.unexpected.len())));
    }
    Ok(report)
}
