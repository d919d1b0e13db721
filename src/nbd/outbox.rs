//! Replies waiting to be sent, written to the socket with one vectored send per batch.

use std::collections::VecDeque;
use std::io::IoSlice;

use crate::storage::{BufPool, IoBuf};

/// Longest fixed reply head: a structured OFFSET_DATA chunk header plus its offset (28 bytes),
/// or an ERROR chunk without message (26 bytes).
const HEAD_CAP: usize = 32;
/// Most iovecs handed to one sendmsg.
const MAX_IOV: usize = 64;

/// What follows a reply's head on the wire.
pub enum Body {
    None,
    /// READ data, returned to the pool once sent.
    Data(IoBuf),
    /// Anything variable-length and rare (block status, error messages).
    Bytes(Vec<u8>),
}

pub struct Reply {
    head: [u8; HEAD_CAP],
    head_len: u8,
    body: Body,
}

impl Reply {
    /// A reply whose head `encode` writes into a fixed buffer (which must fit in 32 bytes).
    pub fn new(encode: impl FnOnce(&mut &mut [u8]), body: Body) -> Self {
        let mut head = [0u8; HEAD_CAP];
        let mut cursor: &mut [u8] = &mut head;
        encode(&mut cursor);
        let head_len = (HEAD_CAP - cursor.len()) as u8;
        Self { head, head_len, body }
    }

    fn head(&self) -> &[u8] {
        &self.head[..self.head_len as usize]
    }

    fn body(&self) -> &[u8] {
        match &self.body {
            Body::None => &[],
            Body::Data(buf) => buf,
            Body::Bytes(bytes) => bytes,
        }
    }

    fn len(&self) -> usize {
        self.head_len as usize + self.body().len()
    }
}

#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<Reply>,
    /// Bytes of the front reply already sent.
    sent: usize,
}

impl Outbox {
    pub fn push(&mut self, reply: Reply) {
        self.queue.push_back(reply);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Fills `iov` with the unsent bytes, front first; returns how many slices were used.
    pub fn gather<'a>(&'a self, iov: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
        let mut n = 0;
        let mut skip = self.sent;
        for reply in &self.queue {
            for part in [reply.head(), reply.body()] {
                if n == MAX_IOV {
                    return n;
                }
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                iov[n] = IoSlice::new(&part[skip..]);
                skip = 0;
                n += 1;
            }
        }
        n
    }

    /// Records that `n` bytes went out; finished replies' buffers go back to `pool`. Returns the
    /// number of replies completed.
    pub fn advance(&mut self, mut n: usize, pool: &mut BufPool) -> usize {
        let mut finished = 0;
        while let Some(front) = self.queue.front() {
            let remaining = front.len() - self.sent;
            if n < remaining {
                self.sent += n;
                break;
            }
            n -= remaining;
            self.sent = 0;
            finished += 1;
            if let Some(Reply { body: Body::Data(buf), .. }) = self.queue.pop_front() {
                pool.give(buf);
            }
        }
        finished
    }

    pub fn empty_iov<'a>() -> [IoSlice<'a>; MAX_IOV] {
        std::array::from_fn(|_| IoSlice::new(&[]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn reply(head: &[u8], body: &[u8]) -> Reply {
        Reply::new(|b| b.put_slice(head), Body::Bytes(body.to_vec()))
    }

    fn unsent(out: &Outbox) -> Vec<u8> {
        let mut iov = Outbox::empty_iov();
        let n = out.gather(&mut iov);
        iov[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn partial_sends_resume_mid_reply() {
        let mut pool = BufPool::new();
        let mut out = Outbox::default();
        out.push(reply(b"abc", b"defg"));
        out.push(reply(b"hi", b""));
        assert_eq!(unsent(&out), b"abcdefghi");
        assert_eq!(out.advance(4, &mut pool), 0);
        assert_eq!(unsent(&out), b"efghi");
        assert_eq!(out.advance(3, &mut pool), 1);
        assert_eq!(unsent(&out), b"hi");
        assert_eq!(out.advance(2, &mut pool), 1);
        assert!(out.is_empty());
    }
}
