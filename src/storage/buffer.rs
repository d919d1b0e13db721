//! Page-aligned I/O buffers and a per-connection pool that recycles them, so that the steady
//! state of the data path allocates nothing. Alignment makes every buffer usable for O_DIRECT.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer: enough for O_DIRECT on any common logical block size.
pub const BUF_ALIGN: usize = 4096;

/// A heap buffer aligned to [`BUF_ALIGN`], with a fixed capacity and a length.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for IoBuf {}
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Allocates a zero-filled buffer of at least `capacity` bytes (rounded up to the alignment).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1).next_multiple_of(BUF_ALIGN);
        let layout = Layout::from_size_align(capacity, BUF_ALIGN).expect("buffer layout");
        // SAFETY: layout has a non-zero size. Zeroing keeps uninitialised memory unobservable.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len: 0, capacity }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length; the bytes up to it are whatever the buffer held (never uninitialised).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "IoBuf length {len} over capacity {}", self.capacity);
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The whole capacity, for filling before `set_len`.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `capacity` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: len <= capacity, all initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, BUF_ALIGN).expect("buffer layout");
        // SAFETY: allocated in with_capacity with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).field("capacity", &self.capacity).finish()
    }
}

/// Size classes are powers of two from 4 KiB to 32 MiB.
const MIN_CLASS_SHIFT: u32 = 12;
const CLASSES: usize = 14;

/// Recycles buffers by power-of-two size class. Not shared between threads: each connection
/// owns one, so taking and returning a buffer costs no lock.
pub struct BufPool {
    free: [Vec<IoBuf>; CLASSES],
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

impl BufPool {
    pub fn new() -> Self {
        Self { free: std::array::from_fn(|_| Vec::new()) }
    }

    fn class_of(size: usize) -> usize {
        let shift = size.max(1).next_power_of_two().trailing_zeros().max(MIN_CLASS_SHIFT);
        (shift - MIN_CLASS_SHIFT) as usize
    }

    /// How many idle buffers of a class are kept: many small ones, and of large ones up to
    /// 64 MiB worth (a resync keeps tens of MiB in flight in 4 MiB pieces; freeing and
    /// allocating them again costs a page fault per page).
    fn retain_limit(class: usize) -> usize {
        match class {
            0..=4 => 256, // up to 64 KiB
            5..=8 => 64,  // up to 1 MiB
            _ => ((64 << 20) >> (class as u32 + MIN_CLASS_SHIFT)).max(4),
        }
    }

    /// A buffer with `len` bytes of length (contents unspecified).
    pub fn take(&mut self, len: usize) -> IoBuf {
        let class = Self::class_of(len);
        let mut buf = match self.free.get_mut(class).and_then(Vec::pop) {
            Some(buf) => buf,
            None => IoBuf::with_capacity(1 << (class as u32 + MIN_CLASS_SHIFT).min(usize::BITS - 1)),
        };
        buf.set_len(len);
        buf
    }

    /// Returns a buffer for reuse; buffers of odd capacity or over the limit are freed.
    pub fn give(&mut self, buf: IoBuf) {
        if !buf.capacity().is_power_of_two() {
            return;
        }
        let class = Self::class_of(buf.capacity());
        if let Some(list) = self.free.get_mut(class) {
            if list.len() < Self::retain_limit(class) {
                list.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        let mut pool = BufPool::new();
        for len in [1, 512, 4096, 4097, 65536, 1 << 20, 3 << 20] {
            let buf = pool.take(len);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.capacity() >= len);
            pool.give(buf);
        }
    }

    #[test]
    fn pool_reuses_buffers() {
        let mut pool = BufPool::new();
        let buf = pool.take(4096);
        let addr = buf.as_ptr();
        pool.give(buf);
        let again = pool.take(3000);
        assert_eq!(again.as_ptr(), addr);
        assert_eq!(again.len(), 3000);
    }

    #[test]
    fn largest_class_holds_32_mib() {
        let mut pool = BufPool::new();
        let buf = pool.take(32 << 20);
        assert_eq!(buf.capacity(), 32 << 20);
        pool.give(buf);
    }
}
