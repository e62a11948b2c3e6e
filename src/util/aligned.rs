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

// SAFETY: every call forwards to `System` with the adjusted layout, the same for a
// block's allocation and its release; `realloc` across the size threshold moves the
// block between the two alignments by allocating, copying and freeing.
unsafe impl GlobalAlloc for CacheAligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract (non-zero size) holds for the adjusted layout.
        unsafe { System.alloc(adjust(l)) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(adjust(l)) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by this allocator with `l`, so by `System` with
        // `adjust(l)`.
        unsafe { System.dealloc(p, adjust(l)) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let old = adjust(l);
        // SAFETY: the caller guarantees `new_size`, rounded up to `l.align()`, is a valid
        // size.
        let new = adjust(unsafe { Layout::from_size_align_unchecked(new_size, l.align()) });
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
}
