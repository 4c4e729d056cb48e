//! The VRAM expert cache: fixed slots of device memory, each holding one expert (gate, up and
//! down, every part at its [`MatrixLayout`] offset), filled on demand from the engine's
//! [`ExpertStore`] — so the bytes come from the page cache, the memory map or the streaming I/O
//! pipeline exactly as on the CPU path — through a pinned staging buffer.
//!
//! When every expert fits, all are copied in at load and the cache never misses. Otherwise the
//! least recently used slot that the current layer does not need is replaced (LRU; the CPU
//! path's finding that an application cache competes with the page cache does not apply here:
//! VRAM is not host memory).
use crate::device::{DeviceBuffer, Gpu, GpuError, PinnedBuffer};
use crate::matrix::MatrixLayout;
pub use moestream_engine::store::Eviction;
use moestream_engine::store::{ExpertStore, ExpertWeights, StoreError};
use std::collections::HashMap;

/// Where gate, up and down lie in a slot.
#[derive(Clone, Copy, Debug)]
pub struct ExpertLayout {
    /// `[F, H]`.
    pub gate: MatrixLayout,
    /// `[F, H]`.
    pub up: MatrixLayout,
    /// `[H, F]`.
    pub down: MatrixLayout,
    /// Bytes of a slot.
    pub bytes: usize,
}

impl ExpertLayout {
    /// The slot layout of `w`, and the byte parts of gate, up and down.
    fn of<'a>(w: &ExpertWeights<'a>) -> Result<(ExpertLayout, ExpertParts<'a>), GpuError> {
        let (gate, pg) = MatrixLayout::of(&w.gate, 0)?;
        let (up, pu) = MatrixLayout::of(&w.up, gate.bytes)?;
        let (down, pd) = MatrixLayout::of(&w.down, up.bytes)?;
        let bytes = down.bytes;
        Ok((
            ExpertLayout {
                gate,
                up,
                down,
                bytes,
            },
            vec![pg, pu, pd],
        ))
    }

    /// Copies `w`'s bytes into the staging buffer at byte `at`, at this layout's offsets.
    ///
    /// # Safety
    /// No other thread writes `at..at + self.bytes` and no copy from it is in flight.
    unsafe fn stage(
        &self,
        w: &ExpertWeights,
        staging: &PinnedBuffer,
        at: usize,
    ) -> Result<(), GpuError> {
        let (l, parts) = ExpertLayout::of(w)?;
        if l.bytes != self.bytes {
            return Err(GpuError("experts of one layer differ in layout".into()));
        }
        for (m, p) in [self.gate, self.up, self.down].iter().zip(&parts) {
            m.place(p, |o, b| staging.fill(at + o, b));
        }
        Ok(())
    }
}

/// The byte parts of gate, up and down, in [`MatrixLayout::of`]'s order.
type ExpertParts<'a> = Vec<Vec<&'a [u8]>>;

/// Lookups between two halvings of the LFU use counts.
pub const AGING_PERIOD: u64 = 4096;

/// Counters of the cache, cumulative.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheStats {
    /// Expert uses looked up.
    pub lookups: u64,
    /// Of those, found in VRAM.
    pub hits: u64,
    /// Bytes copied host → device for experts (PCIe traffic).
    pub bytes_copied: u64,
}

/// The slots and what is in them.
pub struct ExpertCache {
    /// Per layer: the slot layout (None for dense layers).
    pub layouts: Vec<Option<ExpertLayout>>,
    slot_bytes: usize,
    slots: usize,
    pool: DeviceBuffer,
    resident: HashMap<(usize, usize), usize>,
    owner: Vec<Option<(usize, usize)>>,
    last_use: Vec<u64>,
    /// Uses per slot (LFU), halved every AGING_PERIOD lookups.
    uses: Vec<u32>,
    eviction: Eviction,
    clock: u64,
    staging: PinnedBuffer,
    staging_slots: usize,
    /// Copies from the staging buffer may still be in flight.
    pending: bool,
    /// Bytes copied in at load (every expert, when all fit).
    pub preloaded_bytes: u64,
    /// Counters.
    pub stats: CacheStats,
}

impl ExpertCache {
    /// Slot layouts of every sparse layer of `store` (reads one expert per layer).
    pub fn layouts(
        store: &ExpertStore,
        layers: usize,
    ) -> Result<Vec<Option<ExpertLayout>>, GpuError> {
        (0..layers)
            .map(|l| {
                if store.experts_in(l) == 0 {
                    return Ok(None);
                }
                let r = store
                    .with_experts(l, &[0], &[], None, |_, w| {
                        ExpertLayout::of(w).map(|(layout, _)| layout)
                    })
                    .map_err(|e| GpuError(e.to_string()))?;
                r.into_iter()
                    .next()
                    .ok_or_else(|| GpuError("no expert layout".into()))?
                    .map(Some)
            })
            .collect()
    }

    /// A cache of `slots` slots for experts laid out as `layouts`, staging up to
    /// `staging_slots` experts per copy batch.
    pub fn new(
        layouts: Vec<Option<ExpertLayout>>,
        slots: usize,
        staging_slots: usize,
        eviction: Eviction,
    ) -> Result<ExpertCache, GpuError> {
        let slot_bytes = layouts.iter().flatten().map(|l| l.bytes).max().unwrap_or(0);
        let pool = DeviceBuffer::new(slot_bytes * slots)?;
        let staging_slots = staging_slots.clamp(1, slots.max(1));
        Ok(ExpertCache {
            layouts,
            slot_bytes,
            slots,
            pool,
            resident: HashMap::new(),
            owner: vec![None; slots],
            last_use: vec![0; slots],
            uses: vec![0; slots],
            eviction,
            clock: 0,
            staging: PinnedBuffer::new(slot_bytes * staging_slots)?,
            staging_slots,
            pending: false,
            preloaded_bytes: 0,
            stats: CacheStats::default(),
        })
    }

    /// Bytes of one slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The eviction policy.
    pub fn eviction(&self) -> Eviction {
        self.eviction
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// How many experts one call of [`ExpertCache::ensure`] can take.
    pub fn capacity(&self) -> usize {
        self.slots
    }

    /// Copies every expert of every layer in (when they all fit).
    pub fn preload(&mut self, gpu: &Gpu, store: &ExpertStore) -> Result<(), StoreError> {
        for l in 0..self.layouts.len() {
            let n = store.experts_in(l);
            let all: Vec<usize> = (0..n).collect();
            for chunk in all.chunks(self.staging_slots) {
                self.ensure(gpu, store, l, chunk)?;
            }
        }
        self.preloaded_bytes = self.stats.bytes_copied;
        self.stats = CacheStats::default();
        Ok(())
    }

    /// Whether every expert of every layer is in VRAM.
    pub fn all_resident(&self) -> bool {
        self.resident.len() == self.slots && self.owner.iter().all(|o| o.is_some())
    }

    /// The slot addresses of experts `0..count` of `layer`, if all are resident.
    pub fn layer_addresses(&self, layer: usize, count: usize) -> Option<Vec<u64>> {
        (0..count)
            .map(|e| {
                self.resident
                    .get(&(layer, e))
                    .map(|&s| self.pool.ptr + (s * self.slot_bytes) as u64)
            })
            .collect()
    }

    /// Counts `uses` expert uses served from VRAM without a lookup (routing on the GPU).
    pub fn count_resident_uses(&mut self, uses: u64) {
        self.stats.lookups += uses;
        self.stats.hits += uses;
    }

    /// Makes experts `experts` of `layer` resident (at most [`ExpertCache::capacity`] of them)
    /// and returns their slots' device addresses, in order. Copies are queued on the stream
    /// before whatever is launched next.
    pub fn ensure(
        &mut self,
        gpu: &Gpu,
        store: &ExpertStore,
        layer: usize,
        experts: &[usize],
    ) -> Result<Vec<u64>, StoreError> {
        let device = |e: GpuError| StoreError::Device(e.0);
        let layout = self.layouts.get(layer).copied().flatten().ok_or_else(|| {
            StoreError::Device(format!("layer {layer} has no experts on the GPU"))
        })?;
        if experts.len() > self.slots {
            return Err(StoreError::Device(format!(
                "{} experts asked at once from a cache of {} slots",
                experts.len(),
                self.slots
            )));
        }
        self.clock += 1;
        let now = self.clock;
        let mut slots = vec![usize::MAX; experts.len()];
        let mut missing = Vec::new();
        for (i, &e) in experts.iter().enumerate() {
            self.stats.lookups += 1;
            if self.stats.lookups.is_multiple_of(AGING_PERIOD) {
                self.uses.iter_mut().for_each(|u| *u /= 2);
            }
            match self.resident.get(&(layer, e)) {
                Some(&s) => {
                    self.stats.hits += 1;
                    self.last_use[s] = now;
                    self.uses[s] = self.uses[s].saturating_add(1);
                    slots[i] = s;
                }
                None => missing.push(i),
            }
        }
        for batch in missing.chunks(self.staging_slots) {
            if self.pending {
                // The staging buffer is about to be rewritten: the copies from it must be done.
                gpu.synchronize().map_err(device)?;
                self.pending = false;
            }
            let ids: Vec<usize> = batch.iter().map(|&i| experts[i]).collect();
            let staging = &self.staging;
            let slot_bytes = self.slot_bytes;
            let filled = store.with_experts(layer, &ids, &[], None, |j, w| {
                // SAFETY: batch member j writes only its own staging range, and no copy from
                // the staging buffer is in flight (`pending` was cleared above).
                unsafe { layout.stage(w, staging, j * slot_bytes) }
            })?;
            for r in filled {
                r.map_err(device)?;
            }
            for (j, &i) in batch.iter().enumerate() {
                let s = self.victim(now);
                if let Some(old) = self.owner[s].take() {
                    self.resident.remove(&old);
                }
                gpu.write_pinned(
                    self.pool.ptr + (s * self.slot_bytes) as u64,
                    &self.staging,
                    j * self.slot_bytes,
                    layout.bytes,
                )
                .map_err(device)?;
                self.stats.bytes_copied += layout.bytes as u64;
                self.owner[s] = Some((layer, experts[i]));
                self.resident.insert((layer, experts[i]), s);
                self.last_use[s] = now;
                self.uses[s] = 1;
                slots[i] = s;
            }
            self.pending = true;
        }
        Ok(slots
            .iter()
            .map(|&s| self.pool.ptr + (s * self.slot_bytes) as u64)
            .collect())
    }

    /// A free slot, else by the eviction policy among the slots not used in this call.
    fn victim(&self, now: u64) -> usize {
        if let Some(s) = self.owner.iter().position(|o| o.is_none()) {
            return s;
        }
        let candidates = (0..self.slots).filter(|&s| self.last_use[s] < now);
        match self.eviction {
            Eviction::Lru => candidates.min_by_key(|&s| self.last_use[s]),
            // Ties go to the least recently used.
            Eviction::Lfu => candidates.min_by_key(|&s| (self.uses[s], self.last_use[s])),
        }
        .unwrap_or(0)
    }
}
