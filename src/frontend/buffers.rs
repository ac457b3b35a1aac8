//! A small per-thread stock of I/O buffers for active clients.
//!
//! Idle clients hold no buffer (so 10,000 of them stay cheap), which would otherwise mean a
//! malloc and free of several KiB per transaction; reusing buffers from a bounded stock keeps
//! both the idle footprint and the per-transaction allocator traffic low.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of a fresh buffer.
pub const BUFFER_SIZE: usize = 8192;
/// Buffers kept per thread; more are freed.
const STOCK: usize = 128;
/// Buffers that grew past this (a large COPY row, a huge result) are freed, not kept.
const MAX_KEPT: usize = 64 * 1024;

thread_local! {
    static STOCK_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with at least `BUFFER_SIZE` bytes of capacity.
pub fn take() -> BytesMut {
    STOCK_BUFFERS
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_SIZE))
}

/// Returns a buffer to the stock (or frees it), leaving an unallocated one in its place.
pub fn give(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        // Nothing to give: stocking a fresh allocation would only cost one.
        return;
    }
    let mut b = std::mem::take(buf);
    b.clear();
    if b.capacity() < BUFFER_SIZE {
        // A buffer that was read from has advanced past its start; an empty one it owns alone
        // gets that space back without allocating.
        b.reserve(BUFFER_SIZE);
    }
    if b.capacity() < BUFFER_SIZE || b.capacity() > MAX_KEPT {
        return;
    }
    STOCK_BUFFERS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < STOCK {
            s.push(b);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_empty() {
        let mut b = take();
        b.extend_from_slice(b"abc");
        give(&mut b);
        assert_eq!(b.capacity(), 0, "the caller keeps nothing");
        let again = take();
        assert!(again.is_empty());
        assert!(again.capacity() >= BUFFER_SIZE);
    }

    #[test]
    fn giving_an_unallocated_buffer_stocks_nothing() {
        let mut b = BytesMut::new();
        give(&mut b);
        assert_eq!(STOCK_BUFFERS.with(|s| s.borrow().len()), 0);
    }

    #[test]
    fn a_buffer_read_from_goes_back_to_the_stock_whole() {
        use bytes::Buf;
        let mut b = take();
        let ptr = b.as_ptr();
        b.extend_from_slice(&[1; 100]);
        b.advance(60);
        give(&mut b);
        let again = take();
        assert_eq!(again.as_ptr(), ptr, "the same allocation, reused");
        assert!(again.capacity() >= BUFFER_SIZE);
    }
}
