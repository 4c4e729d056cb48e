//! Positional reads at a deep queue.
//!
//! A layer's expert reads (every projection of every chosen expert, plus the next layer's
//! prefetches) go out together, so the disk sees many requests at once: one blocking read at a
//! time leaves an NVMe or a virtio disk mostly idle. Two backends behind one small interface:
//!
//! - [`UringQueue`]: io_uring. The thread that runs the model submits and reaps; the kernel does
//!   the reads (page-cache hits complete inline, misses go to its own workers). No threads of ours.
//! - [`ThreadPoolQueue`]: `depth` threads each doing `pread`, for kernels where io_uring is
//!   missing or disabled (`/proc/sys/kernel/io_uring_disabled`, seccomp in containers).
//!
//! [`open_queue`] picks io_uring when a ring can be created and falls back to the pool otherwise.
//!
//! Besides reads into our buffers, the pool runs *populate* operations: `MADV_WILLNEED` then
//! `MADV_POPULATE_READ` over a range of a file mapping, which reads whatever is missing into the
//! page cache and maps it, so the kernels can use page-cache pages in place (no copy). That is the
//! `map` streaming mode; io_uring has no populate operation, so it always uses the pool.
//! Short reads are continued where they stopped; a read that hits the end of the file before the
//! bytes it needs, or fails, completes with an error that names the file and offset.
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Copy file bytes into the buffer at `dst`.
    Read,
    /// Make the mapped range at `dst` (page-aligned) resident and mapped.
    Populate,
}

/// One read: `len` bytes of `file` at `offset` into `dst`. At least `need` bytes must arrive (an
/// O_DIRECT window rounded up past the end of the file legitimately comes back short).
#[derive(Clone, Copy, Debug)]
pub struct ReadOp {
    /// Read or populate.
    pub kind: OpKind,
    /// Index of the file in the queue's file table.
    pub file: usize,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes to read.
    pub len: usize,
    /// Bytes that must arrive for the read to count as complete.
    pub need: usize,
    /// Destination; valid for `len` bytes until the read completes (the caller's buffers outlive
    /// the queue's use of them: reads are always drained before buffers are reused or dropped).
    pub dst: *mut u8,
    /// The caller's tag, returned with the completion.
    pub tag: u64,
}

// SAFETY: `dst` points into buffers the store owns and does not touch while the read is in flight.
unsafe impl Send for ReadOp {}

/// Why a read failed.
#[derive(Debug)]
pub enum ReadFailure {
    /// The system call failed.
    Io(std::io::Error),
    /// The file ended after `got` of the `need` bytes.
    Short {
        /// Bytes that arrived.
        got: usize,
    },
}

/// A finished read.
#[derive(Debug)]
pub struct Completion {
    /// The read as submitted.
    pub op: ReadOp,
    /// Whether all needed bytes arrived.
    pub result: Result<(), ReadFailure>,
}

/// A queue of positional reads.
pub trait ReadQueue: Send {
    /// `io_uring` or `threads`.
    fn name(&self) -> &'static str;
    /// Queues a read; it is submitted at once when fewer than the queue depth are in flight.
    fn push(&mut self, op: ReadOp);
    /// Blocks until at least one read has completed and appends every completed read to `out`.
    /// Returns at once when nothing is pending.
    fn wait(&mut self, out: &mut Vec<Completion>);
    /// Reads queued or in flight.
    fn pending(&self) -> usize;
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// io_uring when the kernel allows it, the thread pool otherwise.
    #[default]
    Auto,
    /// io_uring (an error when unavailable).
    Uring,
    /// The pread thread pool.
    Threads,
}

impl std::str::FromStr for IoBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoBackend::Auto),
            "io_uring" | "uring" => Ok(IoBackend::Uring),
            "threads" | "pread" => Ok(IoBackend::Threads),
            _ => Err(format!(
                "unknown I/O backend {s:?} (expected auto, io_uring or threads)"
            )),
        }
    }
}

/// Opens the queue `backend` asks for over `files`, `depth` reads in flight at most.
pub fn open_queue(
    backend: IoBackend,
    files: Vec<Arc<File>>,
    depth: usize,
) -> std::io::Result<Box<dyn ReadQueue>> {
    let depth = depth.max(1);
    match backend {
        IoBackend::Threads => Ok(Box::new(ThreadPoolQueue::new(files, depth))),
        IoBackend::Uring => Ok(Box::new(UringQueue::new(files, depth)?)),
        IoBackend::Auto => match UringQueue::new(files.clone(), depth) {
            Ok(q) => Ok(Box::new(q)),
            Err(e) => {
                tracing::info!("io_uring unavailable ({e}); reading with a thread pool");
                Ok(Box::new(ThreadPoolQueue::new(files, depth)))
            }
        },
    }
}

/// A read in flight with how much of it has arrived.
struct InFlight {
    op: ReadOp,
    done: usize,
}

/// io_uring backend.
pub struct UringQueue {
    ring: io_uring::IoUring,
    files: Vec<Arc<File>>,
    depth: usize,
    backlog: VecDeque<ReadOp>,
    /// Slab of reads in flight; the user_data of an entry is its index here.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
}

// SAFETY: the ring is only used through `&mut self`; the raw pointers it holds are to our buffers.
unsafe impl Send for UringQueue {}

impl UringQueue {
    /// A ring with room for `depth` reads.
    pub fn new(files: Vec<Arc<File>>, depth: usize) -> std::io::Result<UringQueue> {
        let entries = depth.next_power_of_two().clamp(8, 4096) as u32;
        let ring = io_uring::IoUring::new(entries)?;
        Ok(UringQueue {
            ring,
            files,
            depth,
            backlog: VecDeque::new(),
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    fn submit_one(&mut self, flight: InFlight) {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let op = &flight.op;
        let fd = io_uring::types::Fd(self.files[op.file].as_raw_fd());
        // SAFETY: `dst + done .. dst + len` is inside the caller's buffer (ReadOp's contract).
        let ptr = unsafe { op.dst.add(flight.done) };
        let len = (op.len - flight.done) as u32;
        let entry = io_uring::opcode::Read::new(fd, ptr, len)
            .offset(op.offset + flight.done as u64)
            .build()
            .user_data(idx as u64);
        self.slots[idx] = Some(flight);
        self.in_flight += 1;
        // SAFETY: the buffer stays valid until the completion is reaped (ReadOp's contract). The
        // submission queue has `entries >= depth` slots and at most `depth` are in flight.
        unsafe {
            if self.ring.submission().push(&entry).is_err() {
                // Full submission queue: flush it and retry (cannot fail twice at depth <= entries).
                let _ = self.ring.submit();
                let _ = self.ring.submission().push(&entry);
            }
        }
    }

    fn fill(&mut self) {
        while self.in_flight < self.depth {
            let Some(op) = self.backlog.pop_front() else {
                break;
            };
            self.submit_one(InFlight { op, done: 0 });
        }
    }
}

impl ReadQueue for UringQueue {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn push(&mut self, op: ReadOp) {
        debug_assert_eq!(op.kind, OpKind::Read, "io_uring cannot populate mappings");
        self.backlog.push_back(op);
        self.fill();
        let _ = self.ring.submit();
    }

    fn wait(&mut self, out: &mut Vec<Completion>) {
        if self.in_flight == 0 {
            return;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The ring itself failed: fail every read in flight rather than hang.
                    for s in self.slots.iter_mut() {
                        if let Some(f) = s.take() {
                            out.push(Completion {
                                op: f.op,
                                result: Err(ReadFailure::Io(std::io::Error::new(
                                    e.kind(),
                                    e.to_string(),
                                ))),
                            });
                        }
                    }
                    self.in_flight = 0;
                    return;
                }
            }
        }
        let finished: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (idx, res) in finished {
            let idx = idx as usize;
            let Some(mut flight) = self.slots.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            self.free.push(idx);
            self.in_flight -= 1;
            if res == -libc::EINTR || res == -libc::EAGAIN {
                self.submit_one(flight);
            } else if res < 0 {
                out.push(Completion {
                    op: flight.op,
                    result: Err(ReadFailure::Io(std::io::Error::from_raw_os_error(-res))),
                });
            } else if res == 0 || flight.done + res as usize >= flight.op.len {
                flight.done += res as usize;
                let result = if flight.done >= flight.op.need {
                    Ok(())
                } else {
                    Err(ReadFailure::Short { got: flight.done })
                };
                out.push(Completion {
                    op: flight.op,
                    result,
                });
            } else {
                // A short read: continue from where it stopped.
                flight.done += res as usize;
                self.submit_one(flight);
            }
        }
        self.fill();
        let _ = self.ring.submit();
    }

    fn pending(&self) -> usize {
        self.in_flight + self.backlog.len()
    }
}

/// Shared work list of the thread pool.
struct Work {
    queue: Mutex<(VecDeque<ReadOp>, bool)>,
    ready: Condvar,
}

/// `depth` threads doing blocking `pread`s.
pub struct ThreadPoolQueue {
    work: Arc<Work>,
    done_rx: Receiver<Completion>,
    pending: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ThreadPoolQueue {
    /// Starts `depth` reader threads.
    pub fn new(files: Vec<Arc<File>>, depth: usize) -> ThreadPoolQueue {
        let work = Arc::new(Work {
            queue: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        });
        let (done_tx, done_rx) = channel();
        let threads = (0..depth)
            .map(|i| {
                let (work, files, tx): (_, _, Sender<Completion>) =
                    (work.clone(), files.clone(), done_tx.clone());
                std::thread::Builder::new()
                    .name(format!("moestream-read-{i}"))
                    .spawn(move || reader_thread(&work, &files, &tx))
                    .expect("cannot start a reader thread")
            })
            .collect();
        ThreadPoolQueue {
            work,
            done_rx,
            pending: 0,
            threads,
        }
    }
}

fn reader_thread(work: &Work, files: &[Arc<File>], tx: &Sender<Completion>) {
    loop {
        let op = {
            let mut q = work.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(op) = q.0.pop_front() {
                    break op;
                }
                if q.1 {
                    return;
                }
                q = work.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        // SAFETY: `dst` is valid for `len` bytes until this completion is sent (ReadOp's contract).
        let buf = unsafe { std::slice::from_raw_parts_mut(op.dst, op.len) };
        let file = &files[op.file];
        let mut done = 0;
        let result = if op.kind == OpKind::Populate {
            populate(op.dst, op.len)
        } else {
            loop {
                if done >= op.len {
                    break Ok(());
                }
                match file.read_at(&mut buf[done..], op.offset + done as u64) {
                    Ok(0) if done >= op.need => break Ok(()),
                    Ok(0) => break Err(ReadFailure::Short { got: done }),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(ReadFailure::Io(e)),
                }
            }
        };
        if tx.send(Completion { op, result }).is_err() {
            return;
        }
    }
}

/// Reads the mapped range `[addr, addr + len)` into the page cache (asynchronously first, for
/// the whole range at once) and maps it. Fails with EFAULT where the file no longer covers it.
fn populate(addr: *mut u8, len: usize) -> Result<(), ReadFailure> {
    // SAFETY: advisory calls on a range of a live mapping the store owns; they do not write.
    unsafe {
        libc::madvise(addr.cast(), len, libc::MADV_WILLNEED);
        loop {
            if libc::madvise(addr.cast(), len, libc::MADV_POPULATE_READ) == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(ReadFailure::Io(e));
            }
        }
    }
}

impl ReadQueue for ThreadPoolQueue {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn push(&mut self, op: ReadOp) {
        let mut q = self.work.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.0.push_back(op);
        self.pending += 1;
        self.work.ready.notify_one();
    }

    fn wait(&mut self, out: &mut Vec<Completion>) {
        if self.pending == 0 {
            return;
        }
        if let Ok(c) = self.done_rx.recv() {
            out.push(c);
            self.pending -= 1;
        }
        while let Ok(c) = self.done_rx.try_recv() {
            out.push(c);
            self.pending -= 1;
        }
    }

    fn pending(&self) -> usize {
        self.pending
    }
}

impl Drop for ThreadPoolQueue {
    fn drop(&mut self) {
        {
            let mut q = self.work.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.1 = true;
        }
        self.work.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // Reads still in flight write into buffers the caller may free next: wait for them.
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            self.backlog.clear();
            self.wait(&mut sink);
            sink.clear();
        }
    }
}

/// A weight file opened for positional reads, with what it looked like when the model was loaded
/// (to detect a file replaced or truncated under a running model).
#[derive(Debug)]
pub struct ModelFile {
    /// Its path.
    pub path: PathBuf,
    /// Opened for buffered (page-cache) reads, or with O_DIRECT for `--direct-io`.
    pub file: Arc<File>,
    /// Length when the model was loaded.
    pub len: u64,
    /// Modification time when the model was loaded.
    pub modified: Option<std::time::SystemTime>,
}

impl ModelFile {
    /// Opens `path`, with O_DIRECT when `direct`.
    pub fn open(path: PathBuf, direct: bool) -> std::io::Result<ModelFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&path)?;
        let meta = file.metadata()?;
        if !direct {
            // Expert reads are random: the kernel's sequential read-ahead would only pull in
            // bytes of experts nobody asked for.
            // SAFETY: plain advisory system call on an open descriptor.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
            }
        }
        Ok(ModelFile {
            path,
            file: Arc::new(file),
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    /// Describes how the file differs from when it was loaded, if it does.
    pub fn changed(&self) -> Option<String> {
        match self.file.metadata() {
            Ok(m) if m.len() != self.len => Some(format!(
                "its size changed from {} to {} bytes while the model was in use",
                self.len,
                m.len()
            )),
            Ok(m) if m.modified().ok() != self.modified => {
                Some("it was modified while the model was in use".into())
            }
            Ok(_) => None,
            Err(e) => Some(format!("it cannot be examined any more: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample_file(len: usize) -> (tempfile::TempDir, Vec<u8>, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        let f = Arc::new(File::open(&path).unwrap());
        (dir, data, f)
    }

    fn read_many(q: &mut dyn ReadQueue, data: &[u8]) {
        // 200 reads of assorted sizes and offsets, more than the queue depth.
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut ops = Vec::new();
        for i in 0..200u64 {
            let off = (i * 7919) % (data.len() as u64 - 5000);
            let len = 1 + ((i * 104729) % 4999) as usize;
            bufs.push(vec![0u8; len]);
            ops.push((off, len));
        }
        for (i, (buf, &(off, len))) in bufs.iter_mut().zip(&ops).enumerate() {
            q.push(ReadOp {
                kind: OpKind::Read,
                file: 0,
                offset: off,
                len,
                need: len,
                dst: buf.as_mut_ptr(),
                tag: i as u64,
            });
        }
        let mut seen = vec![false; ops.len()];
        let mut out = Vec::new();
        while q.pending() > 0 {
            q.wait(&mut out);
            for c in out.drain(..) {
                assert!(c.result.is_ok(), "{:?}", c.result);
                seen[c.op.tag as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        for (buf, &(off, len)) in bufs.iter().zip(&ops) {
            assert_eq!(&buf[..], &data[off as usize..off as usize + len]);
        }
    }

    fn read_past_end(q: &mut dyn ReadQueue, data_len: usize) {
        let mut buf = vec![0u8; 100];
        q.push(ReadOp {
            kind: OpKind::Read,
            file: 0,
            offset: data_len as u64 - 40,
            len: 100,
            need: 100,
            dst: buf.as_mut_ptr(),
            tag: 1,
        });
        let mut out = Vec::new();
        while q.pending() > 0 {
            q.wait(&mut out);
        }
        assert!(matches!(out[0].result, Err(ReadFailure::Short { got: 40 })));
        // A window rounded past the end is fine when the needed bytes arrived.
        q.push(ReadOp {
            kind: OpKind::Read,
            file: 0,
            offset: data_len as u64 - 40,
            len: 100,
            need: 40,
            dst: buf.as_mut_ptr(),
            tag: 2,
        });
        out.clear();
        while q.pending() > 0 {
            q.wait(&mut out);
        }
        assert!(out[0].result.is_ok());
    }

    #[test]
    fn thread_pool_reads_what_the_file_holds() {
        let (_d, data, f) = sample_file(1 << 20);
        let mut q = ThreadPoolQueue::new(vec![f], 24);
        read_many(&mut q, &data);
        read_past_end(&mut q, data.len());
    }

    #[test]
    fn io_uring_reads_what_the_file_holds() {
        let (_d, data, f) = sample_file(1 << 20);
        match UringQueue::new(vec![f], 24) {
            Ok(mut q) => {
                read_many(&mut q, &data);
                read_past_end(&mut q, data.len());
            }
            // CI must exercise io_uring: only skip where the kernel refuses rings outright.
            Err(e) if std::env::var_os("MOESTREAM_REQUIRE_IO_URING").is_none() => {
                eprintln!("skipped: io_uring unavailable here ({e})");
            }
            Err(e) => panic!("io_uring required but unavailable: {e}"),
        }
    }
}
