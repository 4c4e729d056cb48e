//! The expert store: the one place that knows where expert bytes come from.
//!
//! Model code asks it to run a function over a layer's chosen experts
//! ([`ExpertStore::with_experts`]) and gets kernel views of each expert's matrices; it never sees
//! files. Two policies:
//!
//! - **Resident**: experts stay in the memory map (the whole model fits in memory).
//! - **Streamed**: experts stay on disk. Each layer's misses (every tensor of every chosen expert)
//!   are read together at a deep queue ([`io`]) into a fixed pool of persistent, aligned slot
//!   buffers; kernels compute on the slots directly. Experts are computed as their reads complete,
//!   so compute overlaps the remaining reads, and the next layer's predicted experts are read
//!   while this layer computes (prefetch). Slots that are not needed keep their expert until
//!   reused, so a pool larger than the minimum (`--expert-cache`) is an in-process expert cache.
//!   The page cache serves repeated reads by default; `--direct-io` bypasses it.
//!
//! Results are returned in the caller's order whatever order the reads complete in, so a streamed
//! model computes bit for bit what the resident one does.
pub mod io;
mod layout;

use crate::models::blocks::Mlp;
use crate::weights::Bytes;
use io::{Completion, IoBackend, ModelFile, OpKind, ReadFailure, ReadOp, ReadQueue};
use layout::ExpertLayout;
use moestream_formats::MappedFile;
use moestream_kernels::features::ProductMode;
use moestream_kernels::Matrix;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Whether expert weights are streamed from disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StreamMode {
    /// Stream when the model does not fit in available memory.
    #[default]
    Auto,
    /// Always stream.
    On,
    /// Keep experts memory-mapped.
    Off,
}

impl std::str::FromStr for StreamMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(StreamMode::Auto),
            "on" | "true" | "1" => Ok(StreamMode::On),
            "off" | "false" | "0" => Ok(StreamMode::Off),
            _ => Err(format!("expected auto, on or off, not {s:?}")),
        }
    }
}

/// How the next layer's experts are predicted for prefetching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// `Router` when there is no in-process expert cache (reads through the page cache), `None`
    /// with one. Measured (BENCHMARKS.md, streaming; 30B-A3B Q4_K_M): with the cache each
    /// prediction of an expert the cache lacks evicts a cached one, and few of those predictions
    /// are used (2% of needed experts), so the router prefetch read 2.5x (8 GiB cap) and 1.8x
    /// (4 GiB) the disk bytes per decode token of no prefetch, and decoded 1.3x slower under
    /// 4 GiB (level under 8 GiB, within the noise); without the cache it hits ~78%.
    #[default]
    Auto,
    /// No prefetch.
    None,
    /// Apply the next layer's router to the hidden state after this layer's attention.
    Router,
    /// The experts the next layer chose for the previous token.
    Previous,
}

impl std::str::FromStr for Prefetch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Prefetch::Auto),
            "none" | "off" => Ok(Prefetch::None),
            "router" => Ok(Prefetch::Router),
            "previous" => Ok(Prefetch::Previous),
            _ => Err(format!("expected router, previous or none, not {s:?}")),
        }
    }
}

/// How streamed expert bytes reach the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// Positional reads into the store's own slot buffers (io_uring or pread; O_DIRECT with
    /// `direct_io`). A page-cache hit still costs a copy.
    #[default]
    Copy,
    /// Reader threads populate the expert's range of the file mapping (`MADV_WILLNEED` +
    /// `MADV_POPULATE_READ`): missing pages are read into the page cache, cached ones are only
    /// mapped, and the kernels read the page cache in place, with no copy.
    Map,
}

impl std::str::FromStr for ReadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "copy" => Ok(ReadMode::Copy),
            "map" => Ok(ReadMode::Map),
            _ => Err(format!("expected copy or map, not {s:?}")),
        }
    }
}

/// Size of the in-process expert cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheSize {
    /// This many bytes.
    Bytes(u64),
    /// The memory available once the resident weights are loaded (page cache counts as
    /// available: with O_DIRECT the cache takes its place), less [`CacheSize::AUTO_RESERVE`].
    #[default]
    Auto,
}

impl CacheSize {
    /// Memory `Auto` leaves for the KV cache, activations, the slot pool and the page cache of
    /// everything that is not an expert.
    pub const AUTO_RESERVE: u64 = 768 << 20;
}

/// Whether streamed reads bypass the page cache (O_DIRECT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// On when the in-process expert cache is not empty (then the page cache would only hold a
    /// second copy of what the expert cache holds), and the file system allows it.
    #[default]
    Auto,
    /// Always (an error where the file system refuses O_DIRECT).
    On,
    /// Never: reads go through the page cache.
    Off,
}

impl std::str::FromStr for DirectIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DirectIo::Auto),
            "on" | "true" | "1" => Ok(DirectIo::On),
            "off" | "false" | "0" => Ok(DirectIo::Off),
            _ => Err(format!("expected auto, on or off, not {s:?}")),
        }
    }
}

/// Which cached expert a new one replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Eviction {
    /// The least recently used.
    Lru,
    /// The least frequently used (uses per forward pass, halved every [`Eviction::HALF_LIFE`]
    /// passes so that the counts follow the text), ties broken by recency. A prefill pass
    /// counts once per expert, so it cannot flush the experts decode keeps using.
    #[default]
    Lfu,
}

impl Eviction {
    /// Forward passes after which use counts halve.
    pub const HALF_LIFE: u64 = 64;
}

impl std::str::FromStr for Eviction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(Eviction::Lru),
            "lfu" => Ok(Eviction::Lfu),
            _ => Err(format!("expected lru or lfu, not {s:?}")),
        }
    }
}

/// How the store is set up.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Stream or map.
    pub stream: StreamMode,
    /// Read backend.
    pub io: IoBackend,
    /// Reads in flight at most.
    pub queue_depth: usize,
    /// Copy into our buffers, or populate the file mapping.
    pub reads: ReadMode,
    /// Read with O_DIRECT, bypassing the page cache (copy mode only).
    pub direct_io: DirectIo,
    /// Slot buffers beyond the minimum pool, kept as an in-process expert cache (copy mode only).
    pub cache: CacheSize,
    /// Which cached expert a new one replaces.
    pub eviction: Eviction,
    /// Next-layer prediction.
    pub prefetch: Prefetch,
    /// Fault injection for tests: the read with this number (1-based, counted from load) fails.
    pub fail_read: Option<u64>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            stream: StreamMode::Auto,
            io: IoBackend::Auto,
            queue_depth: 32,
            reads: ReadMode::default(),
            direct_io: DirectIo::default(),
            cache: CacheSize::default(),
            eviction: Eviction::default(),
            prefetch: Prefetch::Router,
            fail_read: None,
        }
    }
}

/// Why expert bytes could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A read failed or came back short.
    #[error("reading {len} bytes of {path} at offset {offset} failed: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Byte offset of the read.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// What went wrong (and, when it did, how the file changed).
        reason: String,
    },
    /// A weight file changed under the running model.
    #[error("{path}: {reason}; reload the model")]
    Changed {
        /// The file.
        path: PathBuf,
        /// How it changed.
        reason: String,
    },
    /// The options contradict each other.
    #[error("{0}")]
    Options(String),
    /// The device running the model failed (a CUDA error, device memory exhausted).
    #[error("device: {0}")]
    Device(String),
    /// The files could not be opened for streaming.
    #[error("cannot stream experts from {path}: {reason}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Counters of expert traffic, cumulative since load (subtract two snapshots for an interval).
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStats {
    /// Expert uses asked for (one per expert per layer per forward pass).
    pub experts_needed: u64,
    /// Bytes of those experts' tensors.
    pub bytes_needed: u64,
    /// Expert loads started (demand misses + prefetches).
    pub experts_read: u64,
    /// Bytes of reads issued (streamed only; includes prefetches and alignment).
    pub bytes_read: u64,
    /// Read operations issued.
    pub reads: u64,
    /// Experts loaded because they were predicted.
    pub prefetch_issued: u64,
    /// Needed experts that a prefetch had loaded (or was loading).
    pub prefetch_hits: u64,
    /// Needed experts in layers for which a prediction was made.
    pub prefetch_opportunities: u64,
    /// Needed experts still held in a slot from an earlier use (the in-process cache).
    pub slot_hits: u64,
    /// Nanoseconds spent blocked waiting for reads.
    pub wait_ns: u64,
    /// Nanoseconds spent computing experts.
    pub compute_ns: u64,
}

impl StoreStats {
    /// `self - earlier`, for the traffic of an interval.
    pub fn since(&self, earlier: &StoreStats) -> StoreStats {
        StoreStats {
            experts_needed: self.experts_needed - earlier.experts_needed,
            bytes_needed: self.bytes_needed - earlier.bytes_needed,
            experts_read: self.experts_read - earlier.experts_read,
            bytes_read: self.bytes_read - earlier.bytes_read,
            reads: self.reads - earlier.reads,
            prefetch_issued: self.prefetch_issued - earlier.prefetch_issued,
            prefetch_hits: self.prefetch_hits - earlier.prefetch_hits,
            prefetch_opportunities: self.prefetch_opportunities - earlier.prefetch_opportunities,
            slot_hits: self.slot_hits - earlier.slot_hits,
            wait_ns: self.wait_ns - earlier.wait_ns,
            compute_ns: self.compute_ns - earlier.compute_ns,
        }
    }

    /// Fraction of needed experts a prefetch had brought in, where predictions were made.
    pub fn prefetch_hit_rate(&self) -> Option<f64> {
        (self.prefetch_opportunities > 0)
            .then(|| self.prefetch_hits as f64 / self.prefetch_opportunities as f64)
    }
}

/// Gate, up and down projections of one expert as kernel views.
pub struct ExpertWeights<'a> {
    /// `[F, H]`.
    pub gate: Matrix<'a>,
    /// `[F, H]`.
    pub up: Matrix<'a>,
    /// `[H, F]`.
    pub down: Matrix<'a>,
}

impl ExpertWeights<'_> {
    /// `down(silu(gate(x)) * up(x))` for `n` rows of `x`, in the product mode of the forward
    /// pass this is part of ([`ProductMode`]).
    pub fn forward(&self, x: &[f32], n: usize, mode: ProductMode, out: &mut [f32]) {
        use moestream_kernels::matmul_at;
        let f = self.gate.rows;
        let mut g = vec![0f32; n * f];
        let mut u = vec![0f32; n * f];
        matmul_at(mode, &self.gate, x, n, &mut g);
        matmul_at(mode, &self.up, x, n, &mut u);
        moestream_kernels::ops::silu_mul(&mut g, &u);
        matmul_at(mode, &self.down, &g, n, out);
    }
}

/// Memory a streamed store holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreMemory {
    /// Slot buffers in total.
    pub slot_bytes: u64,
    /// Number of slots.
    pub slots: usize,
}

/// The smallest slot pool: a layer's experts plus the next layer's predictions, with room to
/// spare so that prefill waves keep reads in flight while earlier experts compute. More slots
/// than this are the in-process expert cache.
fn minimum_slots(top_k: usize) -> usize {
    (2 * top_k + 4).max(8)
}

/// Where expert weights come from: see the module docs.
pub struct ExpertStore {
    /// `experts[layer]` (empty for dense layers).
    n_experts: Vec<usize>,
    policy: Policy,
    stats: Mutex<StoreStats>,
}

enum Policy {
    Resident(Vec<Vec<Mlp>>),
    Streamed(Box<Mutex<Streamer>>),
}

impl ExpertStore {
    /// Keeps the experts as they are (memory-mapped).
    pub fn resident(experts: Vec<Vec<Mlp>>) -> ExpertStore {
        ExpertStore {
            n_experts: experts.iter().map(Vec::len).collect(),
            policy: Policy::Resident(experts),
            stats: Mutex::default(),
        }
    }

    /// The same store with resident experts copied into process memory (a streamed store is
    /// returned as it is).
    pub fn into_memory(self) -> ExpertStore {
        match self.policy {
            Policy::Resident(e) => ExpertStore::resident(
                e.iter()
                    .map(|layer| layer.iter().map(Mlp::to_resident).collect())
                    .collect(),
            ),
            Policy::Streamed(_) => self,
        }
    }

    /// Streams the experts of a resident store from their files instead (unchanged if already
    /// streamed). `top_k` is the most experts one token uses in a layer (it sizes the minimum
    /// pool).
    pub fn into_streamed(
        self,
        top_k: usize,
        options: &StoreOptions,
    ) -> Result<ExpertStore, StoreError> {
        let experts = match self.policy {
            Policy::Resident(e) => e,
            Policy::Streamed(_) => return Ok(self),
        };
        let map = options.reads == ReadMode::Map;
        if map && options.direct_io == DirectIo::On {
            return Err(StoreError::Options(
                "--direct-io reads into the engine's buffers: use it with --stream-reads copy"
                    .into(),
            ));
        }
        if map && options.io == IoBackend::Uring {
            return Err(StoreError::Options(
                "io_uring cannot populate mappings: use --stream-reads copy, or the threads backend"
                    .into(),
            ));
        }
        let minimum = minimum_slots(top_k);
        let total: usize = experts.iter().map(Vec::len).sum();
        // The expert cache is sized first: whether there is one decides automatic O_DIRECT.
        // Map mode computes on the page cache and has no use for one.
        let cache_bytes = match (map, options.cache) {
            (true, _) => 0,
            (false, CacheSize::Bytes(b)) => b,
            (false, CacheSize::Auto) => crate::models::available_memory_bytes()
                .unwrap_or(0)
                .saturating_sub(CacheSize::AUTO_RESERVE),
        };
        let largest = experts
            .iter()
            .flatten()
            .map(Mlp::size_bytes)
            .max()
            .unwrap_or(0);
        let caching = total > minimum && largest > 0 && cache_bytes >= largest as u64;
        let mut direct = match options.direct_io {
            DirectIo::On => true,
            DirectIo::Off => false,
            DirectIo::Auto => !map && caching,
        };
        // Mapped pages and O_DIRECT both want page-aligned ranges.
        let align = |direct: bool| if direct || map { 4096 } else { 1 };
        let mut plan = ReadPlan::new(&experts, align(direct));
        let files = match plan.open(direct) {
            Ok(files) => files,
            Err(e) if direct && options.direct_io == DirectIo::Auto => {
                tracing::info!("{e}; reading through the page cache instead");
                direct = false;
                plan = ReadPlan::new(&experts, align(false));
                plan.open(false)?
            }
            Err(e) => return Err(e),
        };
        let ReadPlan { layouts, maps, .. } = plan;
        let n_experts_per_layer: Vec<usize> = experts.iter().map(Vec::len).collect();
        // Copy mode reads through its own descriptors: the mappings can go. Map mode computes on
        // them.
        let (mapped, maps) = if map {
            (Some(experts), maps)
        } else {
            drop(experts);
            (None, Vec::new())
        };
        let queue = io::open_queue(
            if map { IoBackend::Threads } else { options.io },
            files.iter().map(|f| f.file.clone()).collect(),
            options.queue_depth,
        )
        .map_err(|e| StoreError::Open {
            path: files.first().map(|f| f.path.clone()).unwrap_or_default(),
            reason: format!("cannot start the {:?} read queue: {e}", options.io),
        })?;
        let slot_len = if map {
            0
        } else {
            layouts
                .iter()
                .flatten()
                .map(|l| l.slot_len)
                .max()
                .unwrap_or(0)
                .next_multiple_of(4096)
                .max(4096)
        };
        let extra = if caching {
            (cache_bytes / slot_len.max(1) as u64) as usize
        } else {
            0
        };
        // Never more slots than experts.
        let extra = extra.min(total.saturating_sub(minimum));
        tracing::info!(
            slots = minimum + extra,
            cache_bytes = extra as u64 * slot_len as u64,
            direct,
            "expert store"
        );
        let slots = (0..minimum + extra)
            .map(|_| Slot {
                buf: AlignedBuf::new(slot_len),
                holds: None,
                loading: 0,
                failure: None,
                pinned: false,
                prefetched: false,
                last_used: 0,
            })
            .collect();
        Ok(ExpertStore {
            n_experts: n_experts_per_layer.clone(),
            policy: Policy::Streamed(Box::new(Mutex::new(Streamer {
                files,
                layouts,
                mapped,
                maps,
                queue,
                slots,
                index: HashMap::new(),
                eviction: options.eviction,
                uses: n_experts_per_layer.iter().map(|&n| vec![0; n]).collect(),
                previous: Vec::new(),
                predicted: Vec::new(),
                clock: 0,
                reads_started: 0,
                fail_read: options.fail_read,
            }))),
            stats: Mutex::default(),
        })
    }

    /// Whether a streamed store keeps an in-process expert cache (more slots than one layer's
    /// experts and predictions need).
    pub fn caches_experts(&self, top_k: usize) -> bool {
        self.memory().slots > minimum_slots(top_k)
    }

    /// Whether experts stream from disk.
    pub fn is_streamed(&self) -> bool {
        matches!(self.policy, Policy::Streamed(_))
    }

    /// The read backend in use (`io_uring`, `threads`), when streaming.
    pub fn io_backend(&self) -> Option<&'static str> {
        match &self.policy {
            Policy::Resident(_) => None,
            Policy::Streamed(s) => Some(lock(s).queue.name()),
        }
    }

    /// `copy` or `map`, when streaming.
    pub fn read_mode(&self) -> Option<ReadMode> {
        match &self.policy {
            Policy::Resident(_) => None,
            Policy::Streamed(s) => Some(if lock(s).mapped.is_some() {
                ReadMode::Map
            } else {
                ReadMode::Copy
            }),
        }
    }

    /// Slot memory of a streamed store.
    pub fn memory(&self) -> StoreMemory {
        match &self.policy {
            Policy::Resident(_) => StoreMemory::default(),
            Policy::Streamed(s) => {
                let s = lock(s);
                StoreMemory {
                    slot_bytes: s.slots.iter().map(|x| x.buf.len as u64).sum(),
                    slots: s.slots.len(),
                }
            }
        }
    }

    /// Experts in `layer` (0 for a dense layer).
    pub fn experts_in(&self, layer: usize) -> usize {
        self.n_experts.get(layer).copied().unwrap_or(0)
    }

    /// The resident experts of a layer (None when streaming).
    pub fn resident_experts(&self, layer: usize) -> Option<&[Mlp]> {
        match &self.policy {
            Policy::Resident(e) => e.get(layer).map(Vec::as_slice),
            Policy::Streamed(_) => None,
        }
    }

    /// Bytes of one expert of `layer` (the tensors, as stored).
    pub fn expert_bytes(&self, layer: usize) -> usize {
        match &self.policy {
            Policy::Resident(e) => e[layer].first().map_or(0, Mlp::size_bytes),
            Policy::Streamed(s) => lock(s).layouts[layer].first().map_or(0, |l| l.bytes),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StoreStats {
        *lock(&self.stats)
    }

    /// The experts `layer` used for the last token of the previous pass (empty if none).
    pub fn previous_choice(&self, layer: usize) -> Vec<usize> {
        match &self.policy {
            Policy::Resident(_) => Vec::new(),
            Policy::Streamed(s) => lock(s).previous.get(layer).cloned().unwrap_or_default(),
        }
    }

    /// Errors if a weight file changed since load (called once per forward pass).
    pub fn check_files(&self) -> Result<(), StoreError> {
        if let Policy::Streamed(s) = &self.policy {
            for f in &lock(s).files {
                if let Some(reason) = f.changed() {
                    return Err(StoreError::Changed {
                        path: f.path.clone(),
                        reason,
                    });
                }
            }
        }
        Ok(())
    }

    /// Runs `f(i, weights of needed[i])` for every needed expert of `layer`, in parallel, and
    /// returns the results in the order of `needed` (ascending expert ids from the caller keep
    /// sums deterministic). When streaming, `prefetch` names experts of a later layer to start
    /// reading now, into slots this layer does not need. `last_token` is the last token's choice,
    /// remembered for the `previous` predictor.
    pub fn with_experts<R: Send>(
        &self,
        layer: usize,
        needed: &[usize],
        last_token: &[usize],
        prefetch: Option<(usize, &[usize])>,
        f: impl Fn(usize, &ExpertWeights) -> R + Sync,
    ) -> Result<Vec<R>, StoreError> {
        match &self.policy {
            Policy::Resident(experts) => {
                let t = Instant::now();
                let out = needed
                    .par_iter()
                    .enumerate()
                    .map(|(i, &e)| f(i, &experts[layer][e].weights()))
                    .collect();
                let mut st = lock(&self.stats);
                st.experts_needed += needed.len() as u64;
                st.bytes_needed += needed
                    .iter()
                    .map(|&e| experts[layer][e].size_bytes() as u64)
                    .sum::<u64>();
                st.compute_ns += t.elapsed().as_nanos() as u64;
                Ok(out)
            }
            Policy::Streamed(s) => {
                let mut s = lock(s);
                let mut stats = StoreStats::default();
                let r = s.run_layer(layer, needed, last_token, prefetch, &f, &mut stats);
                let mut st = lock(&self.stats);
                *st = add(&st, &stats);
                r
            }
        }
    }
}

/// Bytes this process has caused to be read from storage (`read_bytes` of /proc/self/io): what
/// the page cache did not serve. None where the kernel does not account it.
pub fn disk_read_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    let line = s.lines().find(|l| l.starts_with("read_bytes:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn add(a: &StoreStats, b: &StoreStats) -> StoreStats {
    StoreStats {
        experts_needed: a.experts_needed + b.experts_needed,
        bytes_needed: a.bytes_needed + b.bytes_needed,
        experts_read: a.experts_read + b.experts_read,
        bytes_read: a.bytes_read + b.bytes_read,
        reads: a.reads + b.reads,
        prefetch_issued: a.prefetch_issued + b.prefetch_issued,
        prefetch_hits: a.prefetch_hits + b.prefetch_hits,
        prefetch_opportunities: a.prefetch_opportunities + b.prefetch_opportunities,
        slot_hits: a.slot_hits + b.slot_hits,
        wait_ns: a.wait_ns + b.wait_ns,
        compute_ns: a.compute_ns + b.compute_ns,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every expert's byte ranges and the files they lie in.
struct ReadPlan {
    layouts: Vec<Vec<ExpertLayout>>,
    paths: Vec<PathBuf>,
    /// The mapping of each file (map mode computes on them).
    maps: Vec<Arc<MappedFile>>,
}

impl ReadPlan {
    fn new(experts: &[Vec<Mlp>], align: usize) -> ReadPlan {
        let mut paths: Vec<PathBuf> = Vec::new();
        let mut maps: Vec<Arc<MappedFile>> = Vec::new();
        let mut by_path: HashMap<PathBuf, usize> = HashMap::new();
        let mut file_index = |b: &Bytes| {
            let (f, _) = b.location().expect("expert weights are file-backed");
            let p = f.path().to_path_buf();
            *by_path.entry(p.clone()).or_insert_with(|| {
                paths.push(p);
                maps.push(f.clone());
                paths.len() - 1
            })
        };
        let layouts = experts
            .iter()
            .map(|l| {
                l.iter()
                    .map(|m| ExpertLayout::new(m, align, &mut file_index))
                    .collect()
            })
            .collect();
        ReadPlan {
            layouts,
            paths,
            maps,
        }
    }

    /// Opens the files for reading (with O_DIRECT when `direct`).
    fn open(&self, direct: bool) -> Result<Vec<ModelFile>, StoreError> {
        self.paths
            .iter()
            .map(|p| {
                ModelFile::open(p.clone(), direct).map_err(|e| StoreError::Open {
                    path: p.clone(),
                    reason: if direct {
                        format!("{e} (O_DIRECT: the file system may not support --direct-io)")
                    } else {
                        e.to_string()
                    },
                })
            })
            .collect()
    }
}

/// A zeroed, 4 KiB-aligned heap buffer (O_DIRECT needs aligned destinations).
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: an owned allocation, like Box<[u8]>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
            .expect("slot size fits a layout");
        // SAFETY: non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(1), Self::ALIGN)
            .expect("slot size fits a layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// One expert-sized buffer of the pool.
struct Slot {
    buf: AlignedBuf,
    /// `(layer, expert)` it holds or is loading.
    holds: Option<(usize, usize)>,
    /// Reads still in flight into it.
    loading: usize,
    /// The first failed read into it.
    failure: Option<StoreError>,
    /// In use by the layer being computed.
    pinned: bool,
    /// Loaded by a prediction and not used since.
    prefetched: bool,
    /// Clock of the last use, for LRU reuse.
    last_used: u64,
}

/// State of a streamed store (behind the store's mutex: one forward pass streams at a time).
struct Streamer {
    files: Vec<ModelFile>,
    layouts: Vec<Vec<ExpertLayout>>,
    /// Map mode: the experts as views of the file mappings (None in copy mode).
    mapped: Option<Vec<Vec<Mlp>>>,
    /// Map mode: the mapping of each file.
    maps: Vec<Arc<MappedFile>>,
    queue: Box<dyn ReadQueue>,
    slots: Vec<Slot>,
    index: HashMap<(usize, usize), usize>,
    eviction: Eviction,
    /// Decayed use counts per `(layer, expert)` (the frequency of [`Eviction::Lfu`]).
    uses: Vec<Vec<u32>>,
    previous: Vec<Vec<usize>>,
    /// Layers for which a prediction was made since they last ran.
    predicted: Vec<bool>,
    clock: u64,
    reads_started: u64,
    fail_read: Option<u64>,
}

impl Streamer {
    /// A slot to load into: an empty one, else the idle one the eviction policy gives up.
    /// Slots holding a prefetch not yet used are taken last, and not at all when `for_prefetch`.
    fn take_slot(&mut self, for_prefetch: bool) -> Option<usize> {
        let idle = |s: &Slot| !s.pinned && s.loading == 0;
        if let Some(i) = self.slots.iter().position(|s| s.holds.is_none() && idle(s)) {
            return Some(i);
        }
        let uses = &self.uses;
        let lfu = self.eviction == Eviction::Lfu;
        // Lower keeps less.
        let worth = |s: &Slot| {
            let freq = match (lfu, s.holds) {
                (true, Some((l, e))) => uses[l][e],
                _ => 0,
            };
            (freq, s.last_used)
        };
        let pick = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| idle(s) && !s.prefetched)
            .min_by_key(|(_, s)| worth(s))
            .map(|(i, _)| i);
        let pick = match (pick, for_prefetch) {
            (Some(i), _) => Some(i),
            (None, true) => None,
            (None, false) => self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| idle(s))
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i),
        };
        if let Some(i) = pick {
            if let Some(key) = self.slots[i].holds.take() {
                self.index.remove(&key);
            }
            self.slots[i].prefetched = false;
        }
        pick
    }

    /// Counts this pass's uses of `layer`'s experts, halving every count once per
    /// [`Eviction::HALF_LIFE`] passes.
    fn count_uses(&mut self, layer: usize, needed: &[usize]) {
        let sparse_layers = self.uses.iter().filter(|u| !u.is_empty()).count() as u64;
        if self
            .clock
            .is_multiple_of(Eviction::HALF_LIFE * sparse_layers.max(1))
        {
            for c in self.uses.iter_mut().flatten() {
                *c /= 2;
            }
        }
        for &e in needed {
            self.uses[layer][e] = self.uses[layer][e].saturating_add(1);
        }
    }

    /// Starts reading expert `(layer, e)` into slot `s`.
    fn start_load(&mut self, s: usize, layer: usize, e: usize, stats: &mut StoreStats) {
        let layout = &self.layouts[layer][e];
        let slot = &mut self.slots[s];
        slot.holds = Some((layer, e));
        slot.failure = None;
        slot.last_used = self.clock;
        self.index.insert((layer, e), s);
        stats.experts_read += 1;
        let base = slot.buf.ptr.as_ptr();
        let map = self.mapped.is_some();
        for w in &layout.windows {
            self.reads_started += 1;
            stats.reads += 1;
            stats.bytes_read += w.len as u64;
            if self.fail_read == Some(self.reads_started) {
                slot.failure.get_or_insert(StoreError::Read {
                    path: self.files[w.file].path.clone(),
                    offset: w.offset,
                    len: w.len,
                    reason: "injected fault (MOESTREAM_FAIL_READ)".into(),
                });
                continue;
            }
            slot.loading += 1;
            let (kind, dst) = if map {
                // SAFETY: the window lies inside the file's mapping (page-aligned offsets, ends
                // within the page holding the file's last byte).
                let at = unsafe { self.maps[w.file].bytes().as_ptr().add(w.offset as usize) };
                (OpKind::Populate, at.cast_mut())
            } else {
                // SAFETY: the window lies inside the slot (layout.slot_len <= buffer length).
                (OpKind::Read, unsafe { base.add(w.slot_offset) })
            };
            self.queue.push(ReadOp {
                kind,
                file: w.file,
                offset: w.offset,
                len: w.len,
                need: w.need,
                dst,
                tag: s as u64,
            });
        }
    }

    /// Records finished reads in their slots.
    fn complete(&mut self, done: &mut Vec<Completion>) {
        for c in done.drain(..) {
            let s = c.op.tag as usize;
            let slot = &mut self.slots[s];
            slot.loading -= 1;
            if let Err(f) = c.result {
                let file = &self.files[c.op.file];
                let mut reason = match f {
                    ReadFailure::Io(e) => e.to_string(),
                    ReadFailure::Short { got } => format!(
                        "the file ended after {got} of {} bytes (its length at load was {})",
                        c.op.need, file.len
                    ),
                };
                if let Some(change) = file.changed() {
                    reason = format!("{reason}; {change}");
                }
                slot.failure.get_or_insert(StoreError::Read {
                    path: file.path.clone(),
                    offset: c.op.offset,
                    len: c.op.len,
                    reason,
                });
            }
        }
    }

    /// Blocks until the reads in flight finish, for error paths.
    fn drain(&mut self) {
        let mut done = Vec::new();
        while self.queue.pending() > 0 {
            self.queue.wait(&mut done);
            self.complete(&mut done);
        }
    }

    fn run_layer<R: Send>(
        &mut self,
        layer: usize,
        needed: &[usize],
        last_token: &[usize],
        prefetch: Option<(usize, &[usize])>,
        f: &(impl Fn(usize, &ExpertWeights) -> R + Sync),
        stats: &mut StoreStats,
    ) -> Result<Vec<R>, StoreError> {
        self.clock += 1;
        tracing::trace!(layer, ?needed, "experts needed");
        self.count_uses(layer, needed);
        if self.previous.len() <= layer {
            self.previous.resize(layer + 1, Vec::new());
        }
        self.previous[layer] = last_token.to_vec();
        stats.experts_needed += needed.len() as u64;
        stats.bytes_needed += needed
            .iter()
            .map(|&e| self.layouts[layer][e].bytes as u64)
            .sum::<u64>();
        // Experts already held (or on their way) need no read.
        let mut slot_of: Vec<Option<usize>> = Vec::with_capacity(needed.len());
        for &e in needed {
            let s = self.index.get(&(layer, e)).copied();
            if let Some(s) = s {
                let slot = &mut self.slots[s];
                slot.pinned = true;
                if slot.prefetched {
                    stats.prefetch_hits += 1;
                    slot.prefetched = false;
                } else {
                    stats.slot_hits += 1;
                }
            }
            slot_of.push(s);
        }
        // Predictions for this layer that it did not use are now ordinary cached experts.
        for slot in &mut self.slots {
            if slot.prefetched && slot.holds.is_some_and(|h| h.0 == layer) {
                slot.prefetched = false;
            }
        }
        if self.predicted.get(layer).copied().unwrap_or(false) {
            stats.prefetch_opportunities += needed.len() as u64;
            self.predicted[layer] = false;
        }
        let mut misses: std::collections::VecDeque<usize> = (0..needed.len())
            .filter(|&i| slot_of[i].is_none())
            .collect();
        self.issue(layer, needed, &mut misses, &mut slot_of, stats);
        if let Some((next, predicted)) = prefetch {
            if self.predicted.len() <= next {
                self.predicted.resize(next + 1, false);
            }
            self.predicted[next] = true;
            for &e in predicted {
                if self.index.contains_key(&(next, e)) {
                    continue;
                }
                let Some(s) = self.take_slot(true) else {
                    break;
                };
                self.start_load(s, next, e, stats);
                self.slots[s].prefetched = true;
                stats.prefetch_issued += 1;
            }
        }
        let mut results: Vec<Option<R>> = (0..needed.len()).map(|_| None).collect();
        let mut remaining = needed.len();
        let mut done = Vec::new();
        let outcome = loop {
            // Experts whose reads have all arrived.
            let ready: Vec<usize> = (0..needed.len())
                .filter(|&i| {
                    results[i].is_none() && slot_of[i].is_some_and(|s| self.slots[s].loading == 0)
                })
                .collect();
            if let Some(s) = ready
                .iter()
                .map(|&i| slot_of[i].expect("ready experts have slots"))
                .find(|&s| self.slots[s].failure.is_some())
            {
                // The slot's bytes are incomplete: it must not be found as a hit again.
                let slot = &mut self.slots[s];
                let err = slot.failure.take().expect("found a failure");
                if let Some(key) = slot.holds.take() {
                    self.index.remove(&key);
                }
                break Err(err);
            }
            if !ready.is_empty() {
                let t = Instant::now();
                let slots = &self.slots;
                let layouts = &self.layouts[layer];
                let mapped = self.mapped.as_ref().map(|m| &m[layer]);
                let computed: Vec<R> = ready
                    .par_iter()
                    .map(|&i| {
                        let e = needed[i];
                        if let Some(m) = mapped {
                            return f(i, &m[e].weights());
                        }
                        let s = slot_of[i].expect("ready experts have slots");
                        let [gate, up, down] = layouts[e].matrices(slots[s].buf.as_slice());
                        f(i, &ExpertWeights { gate, up, down })
                    })
                    .collect();
                stats.compute_ns += t.elapsed().as_nanos() as u64;
                for (&i, r) in ready.iter().zip(computed) {
                    results[i] = Some(r);
                    let s = slot_of[i].expect("ready experts have slots");
                    self.slots[s].pinned = false;
                    self.slots[s].last_used = self.clock;
                }
                remaining -= ready.len();
                self.issue(layer, needed, &mut misses, &mut slot_of, stats);
                continue;
            }
            if remaining == 0 {
                break Ok(());
            }
            if self.queue.pending() == 0 {
                // Nothing in flight and nothing ready: only a pool too small for one expert
                // per pinned slot could get here; fail rather than hang.
                break Err(StoreError::Read {
                    path: self
                        .files
                        .first()
                        .map(|f| f.path.clone())
                        .unwrap_or_default(),
                    offset: 0,
                    len: 0,
                    reason: "internal error: the expert pool has no free slot".into(),
                });
            }
            let t = Instant::now();
            self.queue.wait(&mut done);
            stats.wait_ns += t.elapsed().as_nanos() as u64;
            self.complete(&mut done);
        };
        match outcome {
            Ok(()) => Ok(results
                .into_iter()
                .map(|r| r.expect("every expert computed"))
                .collect()),
            Err(e) => {
                // Leave the pool clean for the next pass: nothing in flight, nothing pinned, no
                // slot holding bytes that failed to arrive.
                self.drain();
                for slot in &mut self.slots {
                    slot.pinned = false;
                    if slot.failure.take().is_some() || slot.loading > 0 {
                        if let Some(key) = slot.holds.take() {
                            self.index.remove(&key);
                        }
                        slot.prefetched = false;
                    }
                }
                Err(e)
            }
        }
    }

    /// Starts reads for as many pending misses as there are slots for.
    fn issue(
        &mut self,
        layer: usize,
        needed: &[usize],
        misses: &mut std::collections::VecDeque<usize>,
        slot_of: &mut [Option<usize>],
        stats: &mut StoreStats,
    ) {
        while let Some(&i) = misses.front() {
            let Some(s) = self.take_slot(false) else {
                break;
            };
            misses.pop_front();
            self.start_load(s, layer, needed[i], stats);
            self.slots[s].pinned = true;
            slot_of[i] = Some(s);
        }
    }
}
