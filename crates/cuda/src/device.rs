//! One GPU: its context and stream, the kernels compiled for it, device and pinned host buffers.
//!
//! Kernels are compiled at start-up by NVRTC for the GPU present (so one binary serves every
//! architecture, and the build needs no CUDA toolkit), and the PTX is cached on disk under a key of
//! the source, the compile options, the GPU's compute capability and the driver version: a later
//! start loads it in milliseconds instead of compiling for seconds.
use crate::gemm::Gemm;
use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaStream,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;

/// The CUDA source of every kernel.
pub const KERNELS: &str = include_str!("kernels.cu");

/// A CUDA failure, with what was being done.
#[derive(Debug, Clone)]
pub struct GpuError(pub String);

impl std::fmt::Display for GpuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for GpuError {}

/// Adds context to a CUDA error.
pub(crate) trait Context<T> {
    fn doing(self, what: &str) -> Result<T, GpuError>;
}
impl<T, E: std::fmt::Debug> Context<T> for Result<T, E> {
    fn doing(self, what: &str) -> Result<T, GpuError> {
        self.map_err(|e| GpuError(format!("{what}: {e:?}")))
    }
}

/// Whether a CUDA driver library and at least one device are present. Never panics: the
/// library is probed before cudarc would panic on its absence.
pub fn devices() -> usize {
    // SAFETY: only tries to open the library.
    if !unsafe { sys::is_culib_present() } {
        return 0;
    }
    std::panic::catch_unwind(|| {
        result::init().ok()?;
        CudaContext::device_count().ok()
    })
    .ok()
    .flatten()
    .map_or(0, |n| n.max(0) as usize)
}

/// An open GPU with the kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
    ordinal: usize,
    /// `MOESTREAM_CUDA_PROFILE=1`: every launch timed with a pair of events.
    profile: Option<std::sync::Mutex<Profile>>,
    /// cuBLAS for prompts, opened at first use (`None` inside: not available).
    gemm: std::sync::OnceLock<Option<Gemm>>,
    gemm_min_tokens: usize,
}

/// Launch timings, when profiling.
#[derive(Default)]
struct Profile {
    pending: Vec<(&'static str, CudaEvent, CudaEvent)>,
    totals: HashMap<&'static str, (f64, u64)>,
}

/// A product kernel's name, its one-token variant's (`name_1`), its per-expert-spans
/// variant's (`name_spans`) and its weights' dequantization to f32 (`name_dequant`).
macro_rules! products {
    ($($name:literal),* $(,)?) => {
        &[$($name, concat!($name, "_1"), concat!($name, "_spans"), concat!($name, "_dequant")),*]
    };
}

/// Product kernels in kernels.cu, each with its one-token, spans and dequantization variants.
const PRODUCTS: &[&str] = products!(
    "matvec_f32",
    "matvec_f16",
    "matvec_bf16",
    "matvec_affine2",
    "matvec_affine3",
    "matvec_affine4",
    "matvec_affine5",
    "matvec_affine6",
    "matvec_affine8",
    "matvec_q8_0",
    "matvec_q4_0",
    "matvec_q4_1",
    "matvec_q5_0",
    "matvec_q4_k",
    "matvec_q5_k",
    "matvec_q6_k",
);

/// The other kernels in kernels.cu.
const FUNCTIONS: &[&str] = &[
    "rms_norm",
    "rope",
    "attention",
    "attention_combine",
    "silu_mul",
    "add_into",
    "split_query_gate",
    "mul_sigmoid",
    "combine_experts",
    "combine_rows",
    "gather_rows",
    "add_gated",
    "route_top_k",
    "head_norm_rope",
    "append_kv",
    "conv1d_silu",
    "l2norm_heads",
    "delta_gates",
    "gated_delta",
    "gated_rms_norm",
    "unfuse_qkvz",
    "quantize_q8",
    "rms_norm_q8",
    "silu_mul_q8",
    "matvec_q4_k_q8",
    "matvec_q6_k_q8",
    "matvec_q4_k_q8_combine",
    "matvec_q6_k_q8_combine",
    "qk_norm_rope_append",
    "matvec_f32_1_split",
    "matvec_q8_multi",
];

impl Gpu {
    /// Opens device `ordinal` and loads the kernels (compiling them if the PTX cache has none
    /// for this GPU and driver).
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let count = devices();
        if ordinal >= count {
            return Err(GpuError(if count == 0 {
                "no CUDA device: libcuda or a GPU is missing".into()
            } else {
                format!("no CUDA device {ordinal}: this machine has {count}")
            }));
        }
        let ctx = CudaContext::new(ordinal).doing("creating the CUDA context")?;
        // The engine orders its work on one stream itself: no per-buffer events.
        // SAFETY: nothing here relies on cudarc's automatic stream synchronisation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().doing("creating a stream")?;
        let name = ctx.name().doing("reading the device name")?;
        let (major, minor) = ctx
            .compute_capability()
            .doing("reading the compute capability")?;
        let ptx = compiled_kernels(major, minor)?;
        let module = ctx.load_module(ptx).doing("loading the kernels")?;
        let mut functions = HashMap::new();
        for &f in PRODUCTS.iter().chain(FUNCTIONS) {
            functions.insert(f, module.load_function(f).doing(f)?);
        }
        let profile = std::env::var_os("MOESTREAM_CUDA_PROFILE")
            .filter(|v| v != "0")
            .map(|_| std::sync::Mutex::new(Profile::default()));
        Ok(Gpu {
            ctx,
            stream,
            _module: module,
            functions,
            name,
            ordinal,
            profile,
            gemm: std::sync::OnceLock::new(),
            gemm_min_tokens: crate::gemm::min_tokens(),
        })
    }

    /// cuBLAS, when a product of `n` tokens should use it and it is available.
    pub(crate) fn gemm(&self, n: usize) -> Option<&Gemm> {
        if n < self.gemm_min_tokens {
            return None;
        }
        self.gemm.get_or_init(|| Gemm::open(&self.stream)).as_ref()
    }

    /// `cuda:N NAME`.
    pub fn describe(&self) -> String {
        format!("cuda:{} {}", self.ordinal, self.name)
    }

    /// Makes this GPU's context current on the calling thread (server workers come and go).
    pub fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().doing("binding the CUDA context")
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        self.ctx.mem_get_info().doing("reading device memory")
    }

    /// The raw stream all work is ordered on.
    pub(crate) fn stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// Waits for all work queued so far.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().doing("waiting for the GPU")
    }

    /// Launches kernel `name` with `args` (pointers to each argument's value, in order).
    pub(crate) fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        let (&key, f) = self
            .functions
            .get_key_value(name)
            .ok_or_else(|| GpuError(format!("no kernel {name}")))?;
        let timing = match &self.profile {
            Some(_) => {
                let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
                let a = self.ctx.new_event(flags).doing("profiling")?;
                let b = self.ctx.new_event(flags).doing("profiling")?;
                a.record(&self.stream).doing("profiling")?;
                Some((a, b))
            }
            None => None,
        };
        // SAFETY: every kernel's arguments are built by the typed wrappers in this crate.
        unsafe {
            result::launch_kernel(f.cu_function(), grid, (block, 1, 1), 0, self.stream(), args)
        }
        .doing(name)?;
        if let (Some(p), Some((a, b))) = (&self.profile, timing) {
            b.record(&self.stream).doing("profiling")?;
            p.lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending
                .push((key, a, b));
        }
        Ok(())
    }

    /// With `MOESTREAM_CUDA_PROFILE=1`: GPU time per kernel so far (name, total ms, launches),
    /// largest first. Synchronizes.
    pub fn profile(&self) -> Vec<(&'static str, f64, u64)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let _ = self.synchronize();
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        let pending = std::mem::take(&mut p.pending);
        for (name, a, b) in pending {
            let ms = a.elapsed_ms(&b).unwrap_or(0.0) as f64;
            let e = p.totals.entry(name).or_default();
            e.0 += ms;
            e.1 += 1;
        }
        let mut v: Vec<_> = p.totals.iter().map(|(k, (ms, n))| (*k, *ms, *n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Launches a one-dimensional element-wise kernel over `n` items.
    pub(crate) fn launch_elements(
        &self,
        name: &str,
        n: usize,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        const BLOCK: u32 = 256;
        let blocks = u32::try_from(n.div_ceil(BLOCK as usize))
            .map_err(|_| GpuError(format!("{name}: {n} elements are too many")))?;
        if blocks == 0 {
            return Ok(());
        }
        self.launch(name, (blocks, 1, 1), BLOCK, args)
    }

    /// Allocates `len` floats of device memory (contents undefined).
    pub fn alloc_f32(&self, len: usize) -> Result<DeviceBuffer, GpuError> {
        DeviceBuffer::new(len * 4)
    }

    /// Copies `data` to a new device buffer.
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DeviceBuffer, GpuError> {
        let b = DeviceBuffer::new(std::mem::size_of_val(data))?;
        self.write(&b, 0, data)?;
        Ok(b)
    }

    /// Copies `data` into `dst` at byte `offset`, ordered on the stream. Returns once `data` may
    /// be reused (pageable memory is staged by the driver).
    pub fn write<T: Copy>(
        &self,
        dst: &DeviceBuffer,
        offset: usize,
        data: &[T],
    ) -> Result<(), GpuError> {
        let bytes = std::mem::size_of_val(data);
        if offset + bytes > dst.bytes {
            return Err(GpuError(format!(
                "writing {bytes} bytes at {offset} into a buffer of {}",
                dst.bytes
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked above; the source outlives the call, which returns after the
        // driver has taken the pageable data.
        unsafe { result::memcpy_htod_async(dst.ptr + offset as u64, data, self.stream()) }
            .doing("copying to the GPU")
    }

    /// Copies `data` to device address `dst` (a range the caller owns), ordered on the stream.
    pub(crate) fn write_to<T: Copy>(&self, dst: u64, data: &[T]) -> Result<(), GpuError> {
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the caller names a device range of at least size_of_val(data) bytes.
        unsafe { result::memcpy_htod_async(dst, data, self.stream()) }.doing("copying to the GPU")
    }

    /// Copies pinned host memory to the device asynchronously: `src` must stay untouched until
    /// the stream passes this point.
    pub(crate) fn write_pinned(
        &self,
        dst: u64,
        src: &PinnedBuffer,
        offset: usize,
        bytes: usize,
    ) -> Result<(), GpuError> {
        if offset + bytes > src.bytes {
            return Err(GpuError("pinned copy out of range".into()));
        }
        // SAFETY: in range; the caller keeps the pinned buffer alive and unmodified until synced.
        unsafe {
            let s = std::slice::from_raw_parts(src.ptr.add(offset), bytes);
            result::memcpy_htod_async(dst, s, self.stream())
        }
        .doing("copying an expert to the GPU")
    }

    /// Copies `out.len()` floats from device address `src` and waits for them.
    pub fn read(&self, src: u64, out: &mut [f32]) -> Result<(), GpuError> {
        // SAFETY: the caller names a device range of at least out.len() floats.
        unsafe { result::memcpy_dtoh_async(out, src, self.stream()) }
            .doing("copying from the GPU")?;
        self.synchronize()
    }

    /// Whether kernel timings are being collected (CUDA graphs are then not used, so that each
    /// launch is timed).
    pub fn profiling(&self) -> bool {
        self.profile.is_some()
    }

    /// Starts recording the work queued on the stream into a graph instead of running it.
    pub(crate) fn begin_capture(&self) -> Result<(), GpuError> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .doing("starting a graph capture")
    }

    /// Ends a capture and instantiates what was recorded.
    pub(crate) fn end_capture(&self) -> Result<CudaGraph, GpuError> {
        self.stream
            .end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            )
            .doing("ending a graph capture")?
            .ok_or_else(|| GpuError("the graph capture recorded nothing".into()))
    }

    /// Zeroes `n` floats at device address `dst`, ordered on the stream.
    pub(crate) fn zero(&self, dst: u64, n: usize) -> Result<(), GpuError> {
        // SAFETY: the caller names a valid device range.
        unsafe { result::memset_d8_async(dst, 0, 4 * n, self.stream()) }.doing("zeroing")
    }

    /// Copies `bytes` between device addresses, ordered on the stream.
    pub(crate) fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the caller names valid device ranges.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream()) }
            .doing("copying on the GPU")
    }
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Device memory, freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    /// Device address.
    pub ptr: u64,
    /// Size.
    pub bytes: usize,
}

impl DeviceBuffer {
    pub(crate) fn new(bytes: usize) -> Result<DeviceBuffer, GpuError> {
        // SAFETY: a plain allocation; a zero-size one is made 1 byte so the pointer is valid.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }
            .doing(&format!("allocating {bytes} bytes of device memory"))?;
        Ok(DeviceBuffer { ptr, bytes })
    }

    /// Address of float `i`.
    pub fn f32_at(&self, i: usize) -> u64 {
        self.ptr + 4 * i as u64
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_sync and not freed elsewhere.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// Page-locked host memory, the staging area of asynchronous copies to the GPU.
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: plain memory; users write disjoint ranges from different threads.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocates `bytes` of pinned memory.
    pub fn new(bytes: usize) -> Result<PinnedBuffer, GpuError> {
        // SAFETY: plain allocation.
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }
            .doing(&format!("allocating {bytes} bytes of pinned memory"))?;
        Ok(PinnedBuffer {
            ptr: ptr as *mut u8,
            bytes,
        })
    }

    /// Size.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Copies `data` to byte `offset`.
    ///
    /// # Safety
    /// No other thread may write the same range, and no copy from it may be in flight.
    pub unsafe fn fill(&self, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= self.bytes,
            "pinned write out of range"
        );
        std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len());
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host.
        let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
    }
}

/// The kernels compiled for compute capability `major.minor`, from the disk cache when there.
fn compiled_kernels(major: i32, minor: i32) -> Result<Ptx, GpuError> {
    let arch = format!("compute_{major}{minor}");
    let mut driver = 0i32;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut driver) };
    let options = vec![
        format!("--gpu-architecture={arch}"),
        "-lineinfo".to_string(),
    ];
    let key = fnv1a(&[
        KERNELS.as_bytes(),
        options.join(" ").as_bytes(),
        &driver.to_le_bytes(),
    ]);
    let path = ptx_cache_dir().map(|d| d.join(format!("kernels-{arch}-{driver}-{key:016x}.ptx")));
    if let Some(p) = &path {
        if let Ok(src) = std::fs::read_to_string(p) {
            return Ok(Ptx::from_src(src));
        }
    }
    let t = std::time::Instant::now();
    let ptx = compile(&options)?;
    tracing::info!(
        "compiled the CUDA kernels for {arch} in {:.1?}",
        t.elapsed()
    );
    if let Some(p) = &path {
        let src = ptx.to_src();
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, src).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(ptx)
}

/// Compiles [`KERNELS`] with NVRTC for `compute_{major}{minor}` and returns the PTX (no GPU is
/// needed, only libnvrtc).
pub fn compile_kernels(major: i32, minor: i32) -> Result<String, GpuError> {
    let options = vec![format!("--gpu-architecture=compute_{major}{minor}")];
    Ok(compile(&options)?.to_src())
}

fn compile(options: &[String]) -> Result<Ptx, GpuError> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError(
            "libnvrtc (CUDA's run-time compiler) was not found: install the CUDA runtime \
             (e.g. pip's nvidia-cuda-nvrtc) and put the folder of libnvrtc.so on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    compile_ptx_with_opts(
        KERNELS,
        CompileOptions {
            options: options.to_vec(),
            name: Some("kernels.cu".into()),
            ..Default::default()
        },
    )
    .map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => GpuError(format!(
            "compiling the CUDA kernels ({}): {}",
            options.join(" "),
            log.to_string_lossy()
        )),
        e => GpuError(format!("compiling the CUDA kernels: {e:?}")),
    })
}

/// `$MOESTREAM_PTX_CACHE`, else `$XDG_CACHE_HOME/moestream/ptx` or `~/.cache/moestream/ptx`.
fn ptx_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MOESTREAM_PTX_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("moestream").join("ptx"))
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    /// The kernels compile for Hopper and for the oldest architecture we claim (Turing), where
    /// libnvrtc is present (no GPU needed); skipped with a note elsewhere.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: no libnvrtc on the library path");
            return;
        }
        for (major, minor) in [(9, 0), (7, 5)] {
            let ptx = super::compile_kernels(major, minor).expect("NVRTC compiles kernels.cu");
            for f in super::PRODUCTS.iter().chain(super::FUNCTIONS) {
                assert!(
                    ptx.contains(&format!(".entry {f}(")),
                    "no kernel {f} in the PTX"
                );
            }
            // And every kernel in the PTX is loaded (a launch of one that is not fails at run
            // time, on the GPU only).
            for line in ptx.lines() {
                if let Some(rest) = line.split(".entry ").nth(1) {
                    let name = rest.split('(').next().unwrap_or(rest).trim();
                    assert!(
                        super::PRODUCTS
                            .iter()
                            .chain(super::FUNCTIONS)
                            .any(|f| *f == name),
                        "kernel {name} is not in device.rs's lists"
                    );
                }
            }
        }
    }
}
