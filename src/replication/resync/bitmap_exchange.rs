//! Exchanging dirty bitmaps at connect time: each node sends its bitmap as run lengths, and
//! the receiver ORs the peer's dirty blocks into its own, so the resync covers blocks changed
//! on either side.

use std::time::Duration;

use rdbd_protocol::repl::{BitmapCursor, BitmapRuns, Message, MAX_BITMAP_RUNS};
use rdbd_protocol::DecodeError;

use crate::metadata::bitmap::DirtyBitmap;
use crate::replication::link::framed::{FrameError, FrameReader, FrameWriter};

#[derive(Debug, thiserror::Error)]
pub enum BitmapExchangeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed bitmap from the peer: {0}")]
    Malformed(#[from] DecodeError),
    #[error("peer sent message kind {0:#x} during the bitmap exchange")]
    Unexpected(u16),
    /// The peer refused the connection instead (it could not carry out the sync decision, e.g.
    /// a losing Primary that cannot give up its role).
    #[error("the peer refused: {0}")]
    Refused(String),
}

/// Run-length messages (first block, runs) covering the whole bitmap: alternating clean and
/// dirty runs, clean first, each message at most [`MAX_BITMAP_RUNS`] runs, no run over u32.
pub fn encode(bitmap: &DirtyBitmap) -> Vec<(u64, Vec<u32>)> {
    let mut e = Encoder { messages: Vec::new(), runs: Vec::new(), first: 0, next: 0 };
    let mut pos = 0;
    for (start, len) in bitmap.runs_from(0) {
        e.add(start - pos, false);
        e.add(len, true);
        pos = start + len;
    }
    e.add(bitmap.blocks() - pos, false);
    e.finish();
    e.messages
}

struct Encoder {
    messages: Vec<(u64, Vec<u32>)>,
    runs: Vec<u32>,
    first: u64,
    next: u64,
}

impl Encoder {
    fn add(&mut self, mut len: u64, dirty: bool) {
        while len > 0 {
            // Room for a possible empty clean run plus this one.
            if self.runs.len() + 2 > MAX_BITMAP_RUNS {
                self.finish();
            }
            let expects_dirty = self.runs.len() % 2 == 1;
            if expects_dirty != dirty {
                // Only a message's first run may be empty: a dirty run opening a message.
                self.runs.push(0);
            }
            let take = len.min(u32::MAX as u64);
            self.runs.push(take as u32);
            self.next += take;
            len -= take;
            if len > 0 {
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        if !self.runs.is_empty() {
            self.messages.push((self.first, std::mem::take(&mut self.runs)));
            self.first = self.next;
        }
    }
}

/// Applies one received message to `bitmap` (dirty runs are ORed in); returns the blocks that
/// became dirty.
pub fn apply(
    cursor: &mut BitmapCursor,
    runs: &BitmapRuns<'_>,
    bitmap: &mut DirtyBitmap,
) -> Result<u64, DecodeError> {
    let mut added = 0;
    for run in cursor.accept(runs)? {
        let run = run?;
        if run.dirty {
            added += bitmap.set(run.start_block..run.start_block + run.blocks as u64);
        }
    }
    Ok(added)
}

/// Sends `bitmap` on the data channel.
pub async fn send(data: &mut FrameWriter, bitmap: &DirtyBitmap) -> Result<(), BitmapExchangeError> {
    for (first, runs) in encode(bitmap) {
        let runs = BitmapRuns::new(first, &runs)?;
        data.send(&Message::BitmapRuns(runs)).await?;
    }
    data.send(&Message::BitmapDone { total_blocks: bitmap.blocks() }).await?;
    Ok(())
}

/// Receives the peer's bitmap and ORs it into `bitmap`; returns the blocks that became dirty.
pub async fn receive(
    data: &mut FrameReader,
    bitmap: &mut DirtyBitmap,
    step: Duration,
) -> Result<u64, BitmapExchangeError> {
    let mut cursor = BitmapCursor::new(bitmap.blocks());
    let mut added = 0;
    loop {
        match data.recv_within(step).await? {
            Message::BitmapRuns(runs) => added += apply(&mut cursor, &runs, bitmap)?,
            Message::BitmapDone { total_blocks } => {
                cursor.finish(total_blocks)?;
                return Ok(added);
            }
            Message::Refuse { message, .. } => return Err(BitmapExchangeError::Refused(message.to_string())),
            other => return Err(BitmapExchangeError::Unexpected(other.kind())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::link::framed::Framed;
    use proptest::prelude::*;

    fn round_trip(bitmap: &DirtyBitmap) -> DirtyBitmap {
        let mut out = DirtyBitmap::new(bitmap.blocks());
        let mut cursor = BitmapCursor::new(bitmap.blocks());
        for (first, runs) in encode(bitmap) {
            let msg = BitmapRuns::new(first, &runs).expect("encoder output is valid");
            apply(&mut cursor, &msg, &mut out).unwrap();
        }
        cursor.finish(bitmap.blocks()).unwrap();
        out
    }

    #[test]
    fn all_clean_is_one_run_and_dirty_start_opens_with_an_empty_run() {
        let mut bm = DirtyBitmap::new(1000);
        assert_eq!(encode(&bm), vec![(0, vec![1000])]);
        bm.set(0..10);
        bm.set(500..1000);
        assert_eq!(encode(&bm), vec![(0, vec![0, 10, 490, 500])]);
    }

    #[test]
    fn many_runs_split_into_several_messages() {
        let mut bm = DirtyBitmap::new(200_000);
        for b in (0..200_000).step_by(4) {
            bm.set(b..b + 1);
        }
        let messages = encode(&bm);
        assert!(messages.len() > 1);
        assert!(messages.iter().all(|(_, runs)| runs.len() <= MAX_BITMAP_RUNS));
        let back = round_trip(&bm);
        assert_eq!(back.runs_from(0).collect::<Vec<_>>(), bm.runs_from(0).collect::<Vec<_>>());
    }

    #[test]
    fn a_peer_cannot_skip_or_repeat_blocks() {
        let mut bm = DirtyBitmap::new(100);
        let mut cursor = BitmapCursor::new(100);
        let runs = [10u32, 5];
        let msg = BitmapRuns::new(20, &runs).unwrap();
        assert!(apply(&mut cursor, &msg, &mut bm).is_err(), "must start at block 0");
        let too_long = [50u32, 60];
        let msg = BitmapRuns::new(0, &too_long).unwrap();
        assert!(apply(&mut cursor, &msg, &mut bm).is_err(), "past the end");
        assert_eq!(bm.dirty_blocks(), 0, "nothing applied from rejected messages");
        assert!(cursor.finish(100).is_err(), "unsent blocks");
    }

    proptest! {
        #[test]
        fn any_bitmap_round_trips(blocks in 1u64..5000, sets in proptest::collection::vec((0u64..5000, 0u64..300), 0..30)) {
            let mut bm = DirtyBitmap::new(blocks);
            for (s, l) in sets { bm.set(s..s + l); }
            let back = round_trip(&bm);
            prop_assert_eq!(back.dirty_blocks(), bm.dirty_blocks());
            prop_assert_eq!(back.runs_from(0).collect::<Vec<_>>(), bm.runs_from(0).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn bitmaps_cross_the_wire_and_merge() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut a, mut b) =
            (Framed::new(a.unwrap()).unwrap().split().1, Framed::new(b.unwrap().0).unwrap().split().0);
        let mut theirs = DirtyBitmap::new(70_000);
        theirs.set(100..200);
        theirs.set(60_000..70_000);
        let mut ours = DirtyBitmap::new(70_000);
        ours.set(150..300);
        let (sent, added) =
            tokio::join!(send(&mut a, &theirs), receive(&mut b, &mut ours, Duration::from_secs(5)));
        sent.unwrap();
        assert_eq!(added.unwrap(), 50 + 10_000);
        assert_eq!(ours.runs_from(0).collect::<Vec<_>>(), vec![(100, 200), (60_000, 10_000)]);
    }
}
