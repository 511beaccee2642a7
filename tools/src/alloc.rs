//! A global allocator that counts the bytes currently allocated, so benchmarks can report the
//! memory an index really takes rather than an estimate.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting live bytes.
#[derive(Debug)]
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Bytes currently allocated by the process through the global allocator.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

#[allow(unsafe_code)]
// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// caller's obligations carry over; the counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (see above).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is (see above).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is (see above).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

/// Largest block glibc's `malloc` still carves from its heaps instead of mapping on its own.
/// (`bench/fs.sh` runs `fs/examples/versions.rs` with these two values as `GLIBC_TUNABLES`.)
const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;
/// Free memory at the top of a heap that glibc keeps instead of giving back to the kernel.
const TRIM_THRESHOLD_BYTES: i32 = 256 << 20;

/// Tells glibc's `malloc` to keep freed memory for reuse. By default a block of 128 KiB or more
/// (the size of a frame of file data, of a chunk, of a write-back buffer) is mapped fresh and
/// unmapped when freed, or freed memory past 2 MiB at a heap's top is given back; either way the
/// next such block takes a page fault and a zeroed page for every 4 KiB it touches. On the write
/// path that was ~15 % of a node's CPU (one fresh receive buffer per frame). Freed blocks now
/// return to the heaps and are reused; a process keeps at most `TRIM_THRESHOLD_BYTES` free at
/// each heap's top.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` only sets allocator parameters; it is called before any other thread
    // starts, with parameters and values glibc documents (it refuses invalid ones, returning 0).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
    }
}
