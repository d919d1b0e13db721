//! What the clients were told, and what must therefore be on the disk that serves: every write
//! is a unique token per block, so a block's value names the write it came from. A write
//! covered by an acknowledged FLUSH (acknowledged before the flush was sent) or an
//! acknowledged FUA write is *durable*: whichever node serves afterwards holds it or a later
//! write to that block. A read returns the last write acknowledged before it was sent, or a
//! later one.

/// Index into a block's history (0: the initial zeroes).
pub type Index = u32;

pub struct Oracle {
    /// Per block: the tokens written to it, in the order the writes were sent.
    history: Vec<Vec<u64>>,
    /// Per block: the latest write that must survive anything.
    durable: Vec<Index>,
    /// Per block: the latest acknowledged write.
    acked: Vec<Index>,
    /// Acknowledged writes in the order they were acknowledged: what a flush covers.
    ack_log: Vec<(u64, Index)>,
    /// How much of `ack_log` is already durable.
    flushed_upto: usize,
    /// Where the current Primary's own acknowledgements start in `ack_log` (after a
    /// switchover, earlier ones are the old Primary's, kept by its activity log).
    own_from: usize,
    /// Blocks that rotted on some disk: the disk lost their data, not the core, so no value is
    /// demanded of them (only that verify finds and a resync removes the difference).
    tainted: Vec<bool>,
}

impl Oracle {
    pub fn new(blocks: u64) -> Self {
        let blocks = blocks as usize;
        Self {
            history: vec![vec![0]; blocks],
            durable: vec![0; blocks],
            acked: vec![0; blocks],
            ack_log: Vec::new(),
            flushed_upto: 0,
            own_from: 0,
            tainted: vec![false; blocks],
        }
    }

    pub fn is_tainted(&self, block: u64) -> bool {
        self.tainted[block as usize]
    }

    /// `block` rotted on a disk.
    pub fn taint(&mut self, block: u64) {
        self.tainted[block as usize] = true;
    }

    /// A write of `token` to `blocks` is sent.
    pub fn write_sent(&mut self, blocks: std::ops::Range<u64>, token: u64) {
        for b in blocks {
            self.history[b as usize].push(token);
        }
    }

    fn index_of(&self, block: u64, token: u64) -> Option<Index> {
        self.history[block as usize].iter().rposition(|&t| t == token).map(|i| i as Index)
    }

    /// The write of `token` was acknowledged.
    pub fn write_acked(&mut self, blocks: std::ops::Range<u64>, token: u64, fua: bool) {
        for b in blocks {
            let i = self.index_of(b, token).expect("acknowledged writes were sent");
            self.acked[b as usize] = self.acked[b as usize].max(i);
            self.ack_log.push((b, i));
            if fua {
                self.durable[b as usize] = self.durable[b as usize].max(i);
            }
        }
    }

    /// A flush is sent: its mark, for [`Oracle::flush_acked`].
    pub fn flush_sent(&self) -> usize {
        self.ack_log.len()
    }

    /// The writes a flush sent at `mark` makes durable (those not made durable before), by
    /// block: `check(block, write index)` says whether a disk holds it (or a later write).
    pub fn check_flushed(&self, mark: usize, check: impl Fn(u64, Index) -> bool) -> Result<(), String> {
        for &(b, i) in &self.ack_log[self.flushed_upto.max(self.own_from).min(mark)..mark] {
            if self.tainted[b as usize] {
                continue;
            }
            if !check(b, i) {
                let token = self.history[b as usize][i as usize];
                return Err(format!("block {b}: write #{i} ({token:#x})"));
            }
        }
        Ok(())
    }

    /// Whether `value` in `block` is write `want`'s or a later one's (by index: zeroes of
    /// TRIMs share a token).
    pub fn at_least(&self, block: u64, value: u64, want: Index) -> bool {
        self.index_of(block, value).is_some_and(|have| have >= want)
    }

    /// The flush sent at `mark` was acknowledged: every write acknowledged before is durable.
    pub fn flush_acked(&mut self, mark: usize) {
        for &(b, i) in &self.ack_log[self.flushed_upto.min(mark)..mark] {
            self.durable[b as usize] = self.durable[b as usize].max(i);
        }
        self.flushed_upto = self.flushed_upto.max(mark);
    }

    /// A new client session starts (the client attached to another Primary): its flushes do not
    /// cover writes an earlier session had acknowledged and not flushed — those died with the
    /// node that acknowledged them, as on a local disk that loses power.
    pub fn new_session(&mut self) {
        self.handover();
        self.flushed_upto = self.ack_log.len();
        // Reads of the new session may see only what is durable, not what the old one was told.
        self.acked.clone_from(&self.durable);
    }

    /// The session goes on at another Primary (a switchover): what it acknowledges from now is
    /// its own.
    pub fn handover(&mut self) {
        self.own_from = self.ack_log.len();
    }

    /// A split-brain policy discarded the other node's changes: what must survive and what a
    /// read may return are at most what the winner holds, durably (`durable`) and in its
    /// cache (`current`). A block whose value no client wrote keeps its demands (serving it
    /// would still be a violation).
    ///
    /// A value several writes of a block share (zeroes: the block as created and every TRIM)
    /// counts as the oldest of them: which one the winner holds is not known, and the loser's
    /// TRIM is what the policy may have thrown away (seed 1635614: the winner held the block as
    /// created, the loser's discarded TRIM was taken for it, and the winner's older write still
    /// in flight then landed as if it had lost a durable TRIM).
    pub fn keep_only(&mut self, durable: impl Fn(u64) -> u64, current: impl Fn(u64) -> u64) {
        for b in 0..self.history.len() as u64 {
            let i = b as usize;
            if let Some(have) = self.first_index_of(b, durable(b)) {
                self.durable[i] = self.durable[i].min(have);
            }
            if let Some(have) = self.first_index_of(b, current(b)) {
                self.acked[i] = self.acked[i].min(have);
            }
        }
    }

    fn first_index_of(&self, block: u64, token: u64) -> Option<Index> {
        self.history[block as usize].iter().position(|&t| t == token).map(|i| i as Index)
    }

    /// The latest acknowledged write of each block of `blocks`, for [`Oracle::check_read`].
    pub fn read_sent(&self, blocks: std::ops::Range<u64>) -> Vec<Index> {
        blocks.map(|b| self.acked[b as usize]).collect()
    }

    /// A read of `blocks` sent when their acknowledged writes were `floors` returned `values`.
    pub fn check_read(
        &self,
        blocks: std::ops::Range<u64>,
        floors: &[Index],
        values: &[u64],
    ) -> Result<(), String> {
        for ((b, &floor), &value) in blocks.zip(floors).zip(values) {
            if self.tainted[b as usize] {
                continue;
            }
            match self.index_of(b, value) {
                None => return Err(format!("a read of block {b} returned {value:#x}, which no client wrote there")),
                Some(i) if i < floor => {
                    return Err(format!(
                        "a read of block {b} returned write #{i} ({value:#x}), older than write #{floor} acknowledged before the read"
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Checks a node's data (`read` gives each block's value) against every durable write.
    pub fn check_durable(&self, read: impl Fn(u64) -> u64) -> Result<(), String> {
        self.check_at_least(&self.durable, "was made durable (an acknowledged FLUSH or FUA covered it)", read)
    }

    /// Checks a node's data against every write the current session was told is done.
    pub fn check_acknowledged(&self, read: impl Fn(u64) -> u64) -> Result<(), String> {
        self.check_at_least(&self.acked, "was acknowledged", read)
    }

    fn check_at_least(&self, floor: &[Index], what: &str, read: impl Fn(u64) -> u64) -> Result<(), String> {
        for b in 0..self.history.len() as u64 {
            if self.tainted[b as usize] {
                continue;
            }
            let value = read(b);
            match self.index_of(b, value) {
                None => return Err(format!("block {b} holds {value:#x}, which no client wrote there")),
                Some(i) if i < floor[b as usize] => {
                    let want = floor[b as usize];
                    return Err(format!(
                        "block {b} holds write #{i} ({value:#x}) but write #{want} ({:#x}) {what}",
                        self.history[b as usize][want as usize]
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flushed_write_must_survive_an_unflushed_one_need_not() {
        let mut o = Oracle::new(2);
        o.write_sent(0..1, 10);
        o.write_acked(0..1, 10, false);
        let mark = o.flush_sent();
        o.write_sent(1..2, 11);
        o.write_acked(1..2, 11, false);
        o.flush_acked(mark);
        assert!(o.check_durable(|b| [10, 0][b as usize]).is_ok(), "block 1 was never flushed");
        assert!(o.check_durable(|b| [0, 11][b as usize]).is_err(), "block 0 lost a flushed write");
        assert!(o.check_durable(|b| [10, 99][b as usize]).is_err(), "a value nobody wrote");
    }

    #[test]
    fn reads_see_every_write_acknowledged_before_them() {
        let mut o = Oracle::new(1);
        o.write_sent(0..1, 5);
        o.write_acked(0..1, 5, true);
        let floors = o.read_sent(0..1);
        assert!(o.check_read(0..1, &floors, &[5]).is_ok());
        assert!(o.check_read(0..1, &floors, &[0]).is_err());
        assert!(o.check_durable(|_| 0).is_err(), "an acknowledged FUA write is durable");
    }
}
