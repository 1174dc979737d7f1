//! Spare per-transaction memory: a client's read buffer and reply queue go back to a small pool
//! of the worker thread's when its transaction ends, and the next transaction on that thread
//! (any client's) takes them from there. A busy client so allocates neither per transaction,
//! while an idle one holds neither — which keeps a burst of logins that each run one statement
//! and go quiet from leaving a buffer-sized hole per client in the heap.

use super::backend::Expect;
use bytes::BytesMut;
use std::cell::RefCell;
use std::collections::VecDeque;

/// Spares kept per thread, of each kind: enough for the transactions a worker has in flight at
/// once in practice; more are freed.
const KEEP: usize = 64;
/// A read buffer with more room than this is freed, not kept (one that grew for a large
/// message is not even offered: `Session::shed_idle`).
const MAX_READ: usize = 4 * 1024;
/// Room for a whole extended-protocol batch's replies (it would grow 0 → 4 → 8).
pub const QUEUE: usize = 8;

thread_local! {
    static READS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static QUEUES: RefCell<Vec<VecDeque<Expect>>> = const { RefCell::new(Vec::new()) };
}

/// A read buffer for a client that has bytes to read: a spare one, or a new, empty one.
pub fn read_buffer() -> BytesMut {
    READS.with(|r| r.borrow_mut().pop()).unwrap_or_default()
}

/// `buf` (empty) is not needed until the client's next transaction.
pub fn give_read_buffer(buf: BytesMut) {
    debug_assert!(buf.is_empty());
    if buf.capacity() == 0 || buf.capacity() > MAX_READ {
        return;
    }
    READS.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() < KEEP {
            r.push(buf);
        }
    });
}

/// An empty reply queue with room for a batch.
pub fn queue() -> VecDeque<Expect> {
    QUEUES
        .with(|q| q.borrow_mut().pop())
        .unwrap_or_else(|| VecDeque::with_capacity(QUEUE))
}

/// `queue` (empty) is not needed until the client's next transaction.
pub fn give_queue(queue: VecDeque<Expect>) {
    debug_assert!(queue.is_empty());
    if queue.capacity() == 0 || queue.capacity() > 4 * QUEUE {
        return;
    }
    QUEUES.with(|q| {
        let mut q = q.borrow_mut();
        if q.len() < KEEP {
            q.push(queue);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_come_back_and_stay_bounded() {
        let mut b = read_buffer();
        b.reserve(1024);
        let cap = b.capacity();
        give_read_buffer(b);
        assert_eq!(read_buffer().capacity(), cap);
        assert_eq!(read_buffer().capacity(), 0, "one was given, one taken");
        for _ in 0..2 * KEEP {
            give_read_buffer(BytesMut::with_capacity(16));
        }
        assert_eq!(READS.with(|r| r.borrow().len()), KEEP);
        give_read_buffer(BytesMut::with_capacity(MAX_READ + 1));
        assert_eq!(READS.with(|r| r.borrow().len()), KEEP);
        let q = queue();
        assert!(q.capacity() >= QUEUE);
        give_queue(q);
        assert_eq!(QUEUES.with(|q| q.borrow().len()), 1);
    }
}
