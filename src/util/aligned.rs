//! A global allocator that starts every block of 4 KiB or more on a 64-byte boundary (a
//! cache line, one AVX-512 vector).
//!
//! glibc's `malloc` aligns to 16 bytes, so an activation tensor's data starts at one of
//! four offsets within a cache line, decided by the heap's state. Every 64-byte vector
//! load of a misaligned tensor then spans two lines, and the kernels that stream an
//! input from L2 without a packed copy — the sparse 1×1 tiles above all — slow down by a
//! third: a 90 % sparse 144 → 24 conv on one 32×32 image, per image of a batch of 64,
//! 0.28 ms with its input and output aligned against 0.40 at a 16-byte offset (dense on
//! packed panels: no change). Which offset a run got varied from one process to the
//! next. onnxruntime aligns its tensors to 64 bytes for the same reason.
//!
//! The `lopper` binary, its examples and its benchmarks install it; a program using the
//! library does so with
//! `#[global_allocator] static A: lopper::util::aligned::CacheAligned = lopper::util::aligned::CacheAligned;`.
//! Small blocks keep `malloc`'s alignment (no space lost on them).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Set by `LOPPER_ALIGN=0` (A/B runs): blocks keep `malloc`'s alignment.
static OFF: AtomicBool = AtomicBool::new(false);

/// Reads `LOPPER_ALIGN`: call first thing in `main`, before any block of 4 KiB or more
/// is allocated (a block must be released with the alignment it was allocated with;
/// glibc's `free` takes either, but the contract is kept).
pub fn read_env() {
    OFF.store(
        std::env::var("LOPPER_ALIGN").is_ok_and(|v| v == "0"),
        Relaxed,
    );
}

/// Blocks of at least this many bytes are cache-line aligned.
const MIN_SIZE: usize = 4096;
/// The alignment given to them.
const ALIGN: usize = 64;

/// The allocator ([`System`] underneath).
pub struct CacheAligned;

/// The layout actually requested from the system for `l`: a function of `l` alone, so
/// that `dealloc` and `realloc` pass the layout the block was allocated with.
fn adjust(l: Layout) -> Layout {
    if l.size() >= MIN_SIZE && l.align() < ALIGN && !OFF.load(Relaxed) {
        // SAFETY: ALIGN is a power of two and the size was valid for a smaller alignment
        // (it cannot overflow isize when rounded up to 64: `Layout` bounds sizes by
        // isize::MAX − (align − 1) and the rounding happens in the system allocator).
        unsafe { Layout::from_size_align_unchecked(l.size(), ALIGN) }
    } else {
        l
    }
}

/// Whether `l` is a block this allocator aligns itself (on unix: `malloc` of 64 bytes
/// more, the start rounded up, `malloc`'s pointer kept in the 8 bytes before it).
///
/// Not `posix_memalign`: glibc serves it from a chunk 80 bytes larger than the block and
/// gives the block's exact size back when it is freed, so the next request of the same
/// size never fits the hole it left; the heap grew with every pass (peak RSS of
/// EfficientNet-B0 at b1 73 → 137 MB, of a MobileNetV2 training step 1.05 → 1.99 GB).
fn large(l: Layout) -> bool {
    l.size() >= MIN_SIZE && l.align() <= 16 && !OFF.load(Relaxed)
}

// SAFETY (unix): a large block is `malloc`'s (or `realloc`'s) block of `size + 64` bytes
// with the returned pointer at its first 64-byte boundary past 8 bytes in, the `malloc`
// pointer stored just before it ([`from_raw`], [`raw`]); every other block is
// `System`'s (`malloc`, or `posix_memalign` for alignments above 16, released by `free`).
// `large(l)` is a function of the layout alone, so a block is always released the way it
// was allocated. Elsewhere every call forwards to `System` with the adjusted layout.
unsafe impl GlobalAlloc for CacheAligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        #[cfg(unix)]
        if large(l) {
            // SAFETY: malloc of a non-zero size; `from_raw` bounds.
            return unsafe { from_raw(libc::malloc(l.size() + ALIGN) as *mut u8) };
        }
        // SAFETY: the caller's contract (non-zero size) holds for the adjusted layout.
        unsafe { System.alloc(adjust(l)) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        #[cfg(unix)]
        if large(l) {
            // SAFETY: as `alloc`; calloc's block is zero throughout.
            return unsafe { from_raw(libc::calloc(1, l.size() + ALIGN) as *mut u8) };
        }
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(adjust(l)) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        #[cfg(unix)]
        if large(l) {
            // SAFETY: `p` came from `from_raw`.
            return unsafe { libc::free(raw(p).cast()) };
        }
        // SAFETY: `p` was allocated by this allocator with `l`, so by `System` with
        // `adjust(l)`.
        unsafe { System.dealloc(p, adjust(l)) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `l.align()`, is a valid
        // size.
        let nl = unsafe { Layout::from_size_align_unchecked(new_size, l.align()) };
        #[cfg(unix)]
        if large(l) && large(nl) {
            // In place where glibc can grow the block; the data moved to the new block's
            // boundary if its offset from the start changed.
            // SAFETY: `p` came from `from_raw`; the block holds `off + size` bytes before
            // and `new_size + 64` after, so the move stays inside it.
            unsafe {
                let r = raw(p);
                let off = p.offset_from(r) as usize;
                let q = libc::realloc(r.cast(), new_size + ALIGN) as *mut u8;
                if q.is_null() {
                    return q;
                }
                // The data first (the new header's 8 bytes may lie inside it), then the
                // header.
                let a = boundary(q);
                if a.offset_from(q) as usize != off {
                    std::ptr::copy(q.add(off), a, l.size().min(new_size));
                }
                return from_raw(q);
            }
        }
        #[cfg(unix)]
        if large(l) || large(nl) {
            // Across the threshold: a fresh block, the contents copied.
            // SAFETY: both blocks hold the smaller size; `p` is released the way it came.
            unsafe {
                let q = if large(nl) {
                    self.alloc(nl)
                } else {
                    System.alloc(adjust(nl))
                };
                if !q.is_null() {
                    std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                    self.dealloc(p, l);
                }
                return q;
            }
        }
        let old = adjust(l);
        let new = adjust(nl);
        if old.align() == new.align() {
            // SAFETY: `p` came from `System` with `old`; System keeps the alignment.
            return unsafe { System.realloc(p, old, new_size) };
        }
        // SAFETY: `new` has a non-zero size (the caller's contract); the copy covers the
        // smaller of the two blocks; `p` is released with the layout it came with.
        unsafe {
            let q = System.alloc(new);
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                System.dealloc(p, old);
            }
            q
        }
    }
}

/// The 64-byte boundary in `malloc`'s block `r` (of `size + 64` bytes) where the block
/// handed out starts, with `r` stored in the 8 bytes before it; null for null.
///
/// # Safety
/// `r` is null or a `malloc` block of at least 64 bytes more than will be used.
#[cfg(unix)]
unsafe fn from_raw(r: *mut u8) -> *mut u8 {
    if r.is_null() {
        return r;
    }
    let a = boundary(r);
    // SAFETY: `a − 8 ≥ r + 8`, inside the block; unaligned write of a pointer.
    unsafe { (a.sub(8) as *mut *mut u8).write_unaligned(r) };
    a
}

/// The first 64-byte boundary at least 8 bytes into block `r` (malloc aligns to 16, so
/// it lies 16–64 bytes in).
#[cfg(unix)]
fn boundary(r: *mut u8) -> *mut u8 {
    r.wrapping_add(ALIGN - (r as usize & (ALIGN - 1)))
}

/// The `malloc` block behind a pointer from [`from_raw`].
///
/// # Safety
/// `p` came from [`from_raw`] and its block is live.
#[cfg(unix)]
unsafe fn raw(p: *mut u8) -> *mut u8 {
    // SAFETY: the caller's contract: the 8 bytes before `p` hold the block's pointer.
    unsafe { (p.sub(8) as *const *mut u8).read_unaligned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large blocks come back 64-byte aligned through allocation, growth across the
    /// threshold and shrinking below it, with their contents kept; small ones keep the
    /// requested alignment.
    #[test]
    fn large_blocks_are_cache_aligned() {
        let a = CacheAligned;
        unsafe {
            let l = Layout::from_size_align(1000, 4).unwrap();
            let p = a.alloc(l);
            assert!(!p.is_null() && (p as usize).is_multiple_of(4));
            for i in 0..1000 {
                *p.add(i) = (i % 251) as u8;
            }
            let q = a.realloc(p, l, 10_000);
            assert!((q as usize).is_multiple_of(64));
            assert!((0..1000).all(|i| *q.add(i) == (i % 251) as u8));
            let l2 = Layout::from_size_align(10_000, 4).unwrap();
            let r = a.realloc(q, l2, 20_000);
            assert!((r as usize).is_multiple_of(64));
            assert!((0..1000).all(|i| *r.add(i) == (i % 251) as u8));
            let l3 = Layout::from_size_align(20_000, 4).unwrap();
            let s = a.realloc(r, l3, 100);
            assert!((0..100).all(|i| *s.add(i) == (i % 251) as u8));
            a.dealloc(s, Layout::from_size_align(100, 4).unwrap());
            let z = a.alloc_zeroed(Layout::from_size_align(8192, 4).unwrap());
            assert!((z as usize).is_multiple_of(64) && (0..8192).all(|i| *z.add(i) == 0));
            a.dealloc(z, Layout::from_size_align(8192, 4).unwrap());
        }
    }

    /// A block grown and shrunk through many sizes, other blocks allocated between so
    /// that glibc moves it (and its offset from `malloc`'s start changes), keeps its
    /// contents and its alignment.
    #[test]
    fn realloc_keeps_contents_when_blocks_move() {
        let a = CacheAligned;
        unsafe {
            let mut size = 4096;
            let mut l = Layout::from_size_align(size, 4).unwrap();
            let mut p = a.alloc(l);
            let fill = |p: *mut u8, from: usize, to: usize| {
                for i in from..to {
                    *p.add(i) = (i * 7 % 253) as u8;
                }
            };
            fill(p, 0, size);
            let mut others = Vec::new();
            for step in 0..200 {
                let new = if step % 5 == 4 {
                    size / 2 + 4096
                } else {
                    size + 4096 + 48 * step
                };
                p = a.realloc(p, l, new);
                assert!((p as usize).is_multiple_of(64), "step {step}");
                let kept = size.min(new);
                assert!(
                    (0..kept).all(|i| *p.add(i) == (i * 7 % 253) as u8),
                    "step {step}"
                );
                fill(p, kept, new);
                size = new;
                l = Layout::from_size_align(size, 4).unwrap();
                let ol = Layout::from_size_align(4096 + 16 * step, 4).unwrap();
                others.push((a.alloc(ol), ol));
                if step % 3 == 0 {
                    let (q, ol) = others.remove(0);
                    a.dealloc(q, ol);
                }
            }
            a.dealloc(p, l);
            for (q, ol) in others {
                a.dealloc(q, ol);
            }
        }
    }
}
