//! What the receiving side answers for each request its peer sent, and when: the other half of
//! [`super::ledger::ack_for`]. The daemon's applier and the core's both answer by these rules,
//! so the simulation proves the daemon's answers.

use rdbd_protocol::repl::AckMode;

use super::ledger::Answer;

/// What the peer asked to hear about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// A write, TRIM or zeroing: answered as `ack` says, a failure always.
    Write { seq: u64, ack: AckMode },
    /// A FLUSH: answered once every write received before it is durable here.
    Flush { seq: u64 },
}

impl Asked {
    pub fn seq(self) -> u64 {
        match self {
            Asked::Write { seq, .. } | Asked::Flush { seq } => seq,
        }
    }

    /// The answer due on receipt (protocol B: RecvAck).
    pub fn on_receipt(self) -> Option<Answer> {
        match self {
            Asked::Write { ack: AckMode::Recv, .. } => Some(Answer::Written),
            _ => None,
        }
    }

    /// The answer due once the disk is done with the request (`ok`: it succeeded, a FUA write
    /// or a flush durably): WriteAck only where asked, FlushAck, and NegAck for any failure —
    /// the Primary must hear of a write this disk lacks, whatever the protocol.
    pub fn on_done(self, ok: bool) -> Option<Answer> {
        match (self, ok) {
            (_, false) => Some(Answer::Failed),
            (Asked::Write { ack: AckMode::Write, .. }, true) => Some(Answer::Written),
            (Asked::Write { .. }, true) => None,
            (Asked::Flush { .. }, true) => Some(Answer::Flushed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_hears_what_it_asked_and_every_failure() {
        let write = |ack| Asked::Write { seq: 1, ack };
        assert_eq!(write(AckMode::None).on_receipt(), None);
        assert_eq!(write(AckMode::None).on_done(true), None);
        assert_eq!(write(AckMode::None).on_done(false), Some(Answer::Failed));
        assert_eq!(write(AckMode::Recv).on_receipt(), Some(Answer::Written));
        assert_eq!(write(AckMode::Recv).on_done(true), None);
        assert_eq!(write(AckMode::Recv).on_done(false), Some(Answer::Failed));
        assert_eq!(write(AckMode::Write).on_receipt(), None);
        assert_eq!(write(AckMode::Write).on_done(true), Some(Answer::Written));
        let flush = Asked::Flush { seq: 2 };
        assert_eq!(flush.on_receipt(), None);
        assert_eq!(flush.on_done(true), Some(Answer::Flushed));
        assert_eq!(flush.on_done(false), Some(Answer::Failed));
        assert_eq!(flush.seq(), 2);
    }
}
