//! Scenarios the simulator found, each written out step by step against two cores: every one
//! failed before its fix (the seed that found it is named).

use std::collections::{BTreeMap, VecDeque};

use super::io::{ClientRequest, Command, Effect, IoId, PeerMessage, Persisted, Reply};
use super::{CoreConfig, Grant, Link, NodeCore};
use crate::metadata::activity_log::extents_of;
use crate::metadata::generations::Generations;
use crate::replication::core::bugs::{Bug, Bugs};
use crate::replication::states::{DiskState, Role};

const BLOCK: u64 = 4096;
const SIZE: u64 = 16 << 20;
const SYNCED: Generations = Generations { current: 0x1000_0000_0000_0004, bitmap: 0, history: [0, 0] };

type Data = Vec<u64>;

/// Two cores, their disks (one token per block, no cache: these scenarios are about order),
/// the messages between them and what each asked for.
struct Pair {
    cores: [NodeCore<Data>; 2],
    disks: [BTreeMap<u64, u64>; 2],
    /// Disk requests not yet completed, per node.
    io: [Vec<(IoId, Effect<Data>)>; 2],
    /// Messages in flight towards each node.
    inbox: [VecDeque<PeerMessage<Data>>; 2],
    replies: Vec<(usize, u64, Reply<Data>)>,
    asked_witness: [bool; 2],
    dropped: [bool; 2],
    images: [Option<Persisted>; 2],
    invalidated: [bool; 2],
    verified: [Option<u64>; 2],
    /// Blocks each node sent as resync data.
    resync_blocks_sent: [u64; 2],
    /// The drivers' clock, for ticks.
    clock: std::time::Duration,
}

fn config(node: u32) -> CoreConfig {
    CoreConfig {
        node_id: node,
        size: SIZE,
        bitmap_block: BLOCK as u32,
        al_extents: 3,
        protocol: rdbd_protocol::repl::Protocol::C,
        seed: node.into(),
        policies: Default::default(),
        rr_conflict: Default::default(),
        csums: false,
        bugs: Bugs::NONE,
    }
}

impl Pair {
    fn new(gens: [Generations; 2]) -> Self {
        Self {
            cores: [0, 1].map(|n| NodeCore::new(config(n as u32), gens[n], DiskState::UpToDate)),
            disks: Default::default(),
            io: Default::default(),
            inbox: Default::default(),
            replies: Vec::new(),
            asked_witness: [false; 2],
            dropped: [false; 2],
            images: [None, None],
            invalidated: [false; 2],
            verified: [None; 2],
            resync_blocks_sent: [0; 2],
            clock: std::time::Duration::ZERO,
        }
    }

    /// An in-sync pair whose nodes run with `configure` applied to their usual configuration.
    fn configured(configure: impl Fn(CoreConfig) -> CoreConfig) -> Self {
        let mut p = Pair::new([SYNCED; 2]);
        for (n, core) in p.cores.iter_mut().enumerate() {
            *core = NodeCore::new(configure(config(n as u32)), SYNCED, DiskState::UpToDate);
        }
        p
    }

    /// `secondary` on node `n` whose writes the peer does not make stable in time: refused (the
    /// peer is asked to flush), then, once the daemon's settle time has passed, carried out
    /// all the same — the one way a Primary steps down with writes unstable on its peer.
    fn demote_unsettled(&mut self, n: usize) {
        self.command(n, Command::Secondary);
        // The flush it asked for is not awaited: the scenario goes on as if the peer had not
        // got to it yet (its link dies, or its disk holds the writes, before it would).
        self.inbox[1 - n].retain(|m| !matches!(m, PeerMessage::Flush { .. }));
        if self.cores[n].role() == Role::Primary {
            self.clock += std::time::Duration::from_secs(6);
            self.cores[n].handle_tick(self.clock);
            self.drain(n);
            self.command(n, Command::Secondary);
        }
        assert_eq!(self.cores[n].role(), Role::Secondary);
    }

    /// Node 0 steps down (its writes unstable on node 1, see [`Pair::demote_unsettled`]) and
    /// node 1 is promoted with its consent, while every disk request of node 1 that `hold`
    /// picks stays in flight.
    fn switch_over_holding(&mut self, hold: impl Fn(&Effect<Data>) -> bool) {
        self.demote_unsettled(0);
        self.deliver(1);
        self.command(1, Command::Primary);
        for _ in 0..5 {
            self.deliver(0);
            self.deliver(1);
            self.complete_io(0, |_| true);
            self.complete_io(1, |e| !hold(e));
        }
        assert_eq!(self.cores[1].role(), Role::Primary);
    }

    fn drain(&mut self, n: usize) {
        while let Some(effect) = self.cores[n].poll_effect() {
            match effect {
                Effect::Send(m) => {
                    if let PeerMessage::ResyncData { len, .. } = m {
                        self.resync_blocks_sent[n] += len / BLOCK;
                    }
                    self.inbox[1 - n].push_back(m)
                }
                Effect::Reply { client, reply } => self.replies.push((n, client, reply)),
                Effect::AskWitness => self.asked_witness[n] = true,
                Effect::DropLink { .. } => self.dropped[n] = true,
                e @ (Effect::Write { io, .. }
                | Effect::Discard { io, .. }
                | Effect::Read { io, .. }
                | Effect::Flush { io }
                | Effect::Persist { io, .. }) => self.io[n].push((io, e)),
                Effect::Invalidated => self.invalidated[n] = true,
                Effect::VerifyDone { out_of_sync } => self.verified[n] = Some(out_of_sync),
                Effect::ReleaseWitness
                | Effect::Decided(_)
                | Effect::ResyncStarted { .. }
                | Effect::RoleChanged(_)
                | Effect::SplitBrainResolved { .. } => {}
            }
        }
    }

    /// Completes every disk request of node `n` that `pick` accepts.
    fn complete_io(&mut self, n: usize, pick: impl Fn(&Effect<Data>) -> bool) -> bool {
        let (now, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.io[n]).into_iter().partition(|(_, e)| pick(e));
        self.io[n] = later;
        let any = !now.is_empty();
        for (io, effect) in now {
            let data = match effect {
                Effect::Write { offset, data, .. } => {
                    for (i, token) in data.into_iter().enumerate() {
                        self.disks[n].insert(offset / BLOCK + i as u64, token);
                    }
                    None
                }
                Effect::Discard { offset, len, .. } => {
                    for block in offset / BLOCK..(offset + len) / BLOCK {
                        self.disks[n].insert(block, 0);
                    }
                    None
                }
                Effect::Read { offset, len, .. } => Some(
                    (offset / BLOCK..(offset + len) / BLOCK)
                        .map(|b| *self.disks[n].get(&b).unwrap_or(&0))
                        .collect(),
                ),
                Effect::Persist { image, .. } => {
                    self.images[n] = Some(image);
                    None
                }
                _ => None,
            };
            self.cores[n].handle_disk(io, true, data);
            self.drain(n);
        }
        any
    }

    /// Fails (EIO) every disk request of node `n` that `pick` accepts.
    fn fail_io(&mut self, n: usize, pick: impl Fn(&Effect<Data>) -> bool) {
        let (now, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.io[n]).into_iter().partition(|(_, e)| pick(e));
        self.io[n] = later;
        for (io, _) in now {
            self.cores[n].handle_disk(io, false, None);
            self.drain(n);
        }
    }

    fn deliver(&mut self, n: usize) -> bool {
        let any = !self.inbox[n].is_empty();
        while let Some(m) = self.inbox[n].pop_front() {
            self.cores[n].handle_message(m);
            self.drain(n);
        }
        any
    }

    /// Runs both nodes until nothing moves.
    fn settle(&mut self) {
        while self.complete_io(0, |_| true)
            | self.complete_io(1, |_| true)
            | self.deliver(0)
            | self.deliver(1)
        {}
    }

    fn connect(&mut self) {
        for n in 0..2 {
            self.cores[n].handle_link_up();
            self.drain(n);
        }
    }

    fn disconnect(&mut self) {
        self.inbox = Default::default();
        for n in 0..2 {
            self.cores[n].handle_link_down();
            self.drain(n);
        }
    }

    fn command(&mut self, n: usize, command: Command) {
        self.cores[n].handle_command(command);
        self.drain(n);
    }

    fn witness(&mut self, n: usize, granted: bool) {
        self.cores[n].handle_witness(granted);
        self.drain(n);
    }

    fn client(&mut self, n: usize, id: u64, request: ClientRequest<Data>) {
        self.cores[n].handle_client(id, request);
        self.drain(n);
    }

    fn reply(&self, id: u64) -> Option<&Reply<Data>> {
        self.replies.iter().find(|(_, c, _)| *c == id).map(|(_, _, r)| r)
    }

    /// A connected pair, node 0 Primary by the peer's consent.
    fn connected_with_primary() -> Self {
        Self::connected_with_primary_over(rdbd_protocol::repl::Protocol::C)
    }

    /// A connected pair replicating with `protocol`, node 0 Primary by the peer's consent.
    fn connected_with_primary_over(protocol: rdbd_protocol::repl::Protocol) -> Self {
        Self::connected_with_primary_configured(|cfg| CoreConfig { protocol, ..cfg })
    }

    /// A connected pair configured as [`Pair::configured`], node 0 Primary by the peer's consent.
    fn connected_with_primary_configured(configure: impl Fn(CoreConfig) -> CoreConfig) -> Self {
        let mut p = Pair::configured(configure);
        p.connect();
        p.settle();
        p.command(0, Command::Primary);
        p.settle();
        assert_eq!(p.cores[0].role(), Role::Primary);
        p
    }
}

fn write(block: u64, token: u64) -> ClientRequest<Data> {
    ClientRequest::Write { offset: block * BLOCK, len: BLOCK, data: vec![token], fua: false }
}

/// Seed 63: a promotion asked of the witness while disconnected, answered after the link came
/// up, changed the generations after the Hello had carried the old ones: the two sides then
/// decided differently.
#[test]
fn a_grant_during_the_handshake_changes_no_generation() {
    let mut p = Pair::new([SYNCED; 2]);
    p.command(0, Command::Primary);
    assert!(p.asked_witness[0]);
    p.connect();
    p.witness(0, true);
    assert_eq!(p.cores[0].gens(), SYNCED);
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established()));
    assert_eq!(p.cores[0].role(), Role::Secondary, "the promotion asked of the witness is void");
}

/// Seed 57: a refusal that arrived once the nodes were connected again outdated the disk (and
/// demoted a Primary that was replicating).
#[test]
fn a_refusal_that_arrives_while_connected_is_stale() {
    let mut p = Pair::connected_with_primary();
    p.disconnect();
    assert!(p.asked_witness[0], "a Primary cut off asks the witness");
    p.connect();
    p.settle();
    p.witness(0, false);
    assert_eq!((p.cores[0].role(), p.cores[0].disk()), (Role::Primary, DiskState::UpToDate));
    assert_eq!(p.cores[0].grant(), Grant::None);
}

/// Seed 81: two Primaries connected and one became the other's sync target while both
/// answered writes.
#[test]
fn two_primaries_never_complete_a_handshake() {
    let mut p = Pair::new([SYNCED; 2]);
    for n in 0..2 {
        p.command(n, Command::Primary);
        p.witness(n, true);
        assert_eq!(p.cores[n].role(), Role::Primary);
    }
    p.connect();
    p.settle();
    assert!(p.dropped[0] && p.dropped[1]);
    assert!(p.cores.iter().all(|c| c.link() == Link::Handshake && !c.wants_connection()));
}

/// Seed 491: the witness granted a promotion asked before a handshake made the disk the
/// target of a resync (Inconsistent); the node became an Inconsistent Primary.
#[test]
fn a_grant_for_a_disk_that_turned_inconsistent_is_void() {
    let newer = SYNCED.new_current(7, false);
    let mut p = Pair::new([SYNCED, newer]);
    p.command(0, Command::Primary);
    p.connect();
    p.deliver(1);
    p.deliver(0);
    p.complete_io(1, |e| matches!(e, Effect::Persist { .. }));
    // SyncStart only (the empty resync's end follows it).
    let sync_start = p.inbox[0].pop_front().expect("SyncStart");
    p.cores[0].handle_message(sync_start);
    p.drain(0);
    assert_eq!(p.cores[0].disk(), DiskState::Inconsistent, "node 0 is the sync target");
    p.disconnect();
    p.witness(0, true);
    assert_eq!(p.cores[0].role(), Role::Secondary);
}

/// Seed 553: a Primary cut off from its peer served reads before the witness decided; the peer
/// may already be writing.
#[test]
fn a_primary_cut_off_holds_reads_until_the_witness_answers() {
    let mut p = Pair::connected_with_primary();
    p.disconnect();
    p.client(0, 1, ClientRequest::Read { offset: 0, len: BLOCK });
    p.settle();
    assert_eq!(p.reply(1), None);
    p.witness(0, true);
    p.settle();
    assert_eq!(p.reply(1), Some(&Reply::Data(vec![0])));
}

/// Seed 3261: the source sent SyncStart before its rotated generations were durable; a power
/// loss in between left the target in a generation the source never recorded (unrelated).
#[test]
fn sync_start_waits_for_the_rotated_generations() {
    let newer = SYNCED.new_current(7, false);
    let mut p = Pair::new([newer, SYNCED]);
    p.connect();
    p.deliver(0);
    assert!(
        !p.inbox[1].iter().any(|m| matches!(m, PeerMessage::SyncStart { .. })),
        "no SyncStart before the metadata write completes"
    );
    p.complete_io(0, |e| matches!(e, Effect::Persist { .. }));
    assert!(p.inbox[1].iter().any(|m| matches!(m, PeerMessage::SyncStart { .. })));
}

/// Seed 0 (and most): the source announced the end of a resync with its generations after
/// the closing step, from which the target derived a different history.
#[test]
fn a_finished_resync_leaves_equivalent_generations() {
    let newer = SYNCED.new_current(7, false);
    let mut p = Pair::new([newer, SYNCED]);
    p.connect();
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established() && c.disk() == DiskState::UpToDate));
    assert!(
        p.cores[0].gens().equivalent(&p.cores[1].gens()),
        "{:?} / {:?}",
        p.cores[0].gens(),
        p.cores[1].gens()
    );
}

/// The daemon's bug (a planted bug in the simulator now): a replicated write released its
/// extent when the peer had it stably, though the local write was still in flight; the extent
/// could then leave the log and a power loss lose the write here only.
#[test]
fn a_write_keeps_its_extent_until_both_disks_have_it() {
    // With the old way planted, the same steps let the extent retire early: the check sees it.
    for (bugs, retirable_early) in
        [(Bugs::NONE, false), (Bugs::only(Bug::ReleaseExtentBeforeLocalWrite), true)]
    {
        let mut p = Pair::connected_with_primary();
        for core in &mut p.cores {
            core.cfg.bugs = bugs;
        }
        p.client(0, 1, write(5, 0xAB));
        p.client(0, 2, ClientRequest::Flush);
        // The peer writes, flushes and answers; the local write is still in flight.
        while p.deliver(1)
            | p.complete_io(1, |_| true)
            | p.deliver(0)
            | p.complete_io(0, |e| !matches!(e, Effect::Write { .. }))
        {}
        let extent = *extents_of(5 * BLOCK, BLOCK).start();
        let retirable = p.cores[0].al.unused_since(u64::MAX).contains(&extent);
        assert_eq!(
            retirable, retirable_early,
            "{bugs:?}: may the extent retire with the local write in flight?"
        );
        p.settle();
        assert!(p.cores[0].al.unused_since(u64::MAX).contains(&extent));
    }
}

/// Seed 40834: a Primary demoted with writes its peer had not made stable; the peer lost
/// power, the marks stayed on the demoted node, and with equal generations and no Primary
/// they were never resynced.
#[test]
fn a_demoted_node_whose_writes_the_peer_lost_starts_a_new_generation() {
    let mut p = Pair::connected_with_primary();
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    p.demote_unsettled(0);
    assert_eq!(p.cores[0].role(), Role::Secondary);
    p.disconnect();
    assert!(p.cores[0].out_of_sync_blocks() > 0, "the unflushed write is marked");
    assert_ne!(p.cores[0].gens().current, SYNCED.current);
    p.connect();
    p.settle();
    assert_eq!(p.disks[1].get(&5), Some(&0xAB), "the resync gave the peer the write");
}

/// Seed 81814: a write held for the witness was answered as soon as the nodes reconnected,
/// before the resync had given the peer its block; the peer then lost power and was promoted.
#[test]
fn a_held_write_is_answered_only_once_the_peer_has_it() {
    let mut p = Pair::connected_with_primary();
    p.disconnect();
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    assert_eq!(p.reply(1), None, "held for the witness");
    p.connect();
    // Handshake and SyncStart, but no resync data yet.
    p.deliver(1);
    p.deliver(0);
    p.complete_io(0, |e| matches!(e, Effect::Persist { .. }));
    assert_eq!(p.reply(1), None, "the peer does not have the block yet");
    p.settle();
    assert_eq!(p.reply(1), Some(&Reply::Done));
    assert_eq!(p.disks[1].get(&5), Some(&0xAB));
}

/// Seed 11385 and 12565: a restart emptied the activity log (folded into the bitmap) without a
/// local flush, and a node demoted with logged extents lost the crashed-primary mark.
#[test]
fn a_restart_keeps_the_logged_extents_and_the_crash_as_primary() {
    let mut p = Pair::connected_with_primary();
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    p.command(0, Command::Secondary);
    p.settle();
    let image = p.images[0].clone().expect("metadata written");
    assert!(!image.activity_log.is_empty() && image.primary, "demoted with logged extents: {image:?}");
    let mut restarted: NodeCore<Data> = NodeCore::restart(config(0), &image);
    assert_eq!(restarted.logged, image.activity_log, "the extents stay logged until a local flush");
    assert!(restarted.crashed_primary);
    assert!(restarted.out_of_sync_blocks() > 0);
    while restarted.poll_effect().is_some() {}
}

/// Seed 5590: a resync read issued before a reconnect completed during the next resync and
/// was counted there (the count wrapped and the resync never ended).
#[test]
fn a_late_read_of_an_ended_resync_is_not_counted() {
    let newer = SYNCED.new_current(7, false);
    let mut p = Pair::new([newer, SYNCED]);
    p.command(0, Command::Primary);
    p.witness(0, true);
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    p.connect();
    p.deliver(1);
    p.deliver(0);
    // The source's rotated generations are durable: SyncStart; the target's Inconsistent mark
    // is durable: it asks for the marked blocks, and the source reads them.
    p.complete_io(0, |e| matches!(e, Effect::Persist { .. }));
    p.deliver(1);
    p.complete_io(1, |e| matches!(e, Effect::Persist { .. }));
    p.deliver(0);
    let stale: Vec<_> =
        p.io[0].iter().filter(|(_, e)| matches!(e, Effect::Read { .. })).map(|(io, _)| *io).collect();
    assert!(!stale.is_empty(), "the resync is reading");
    p.disconnect();
    p.connect();
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established()), "{}", p.cores[0].describe_work());
}

/// Seed 206865: `--discard-my-data` typed while a node was Secondary still applied after it was
/// promoted and acknowledged writes; at the next handshake (a split brain: the other node had
/// written alone before) it discarded them.
#[test]
fn a_promotion_cancels_an_earlier_discard_my_data() {
    let mut p = Pair::new([SYNCED; 2]);
    // Node 0 writes alone first, then steps down (its writes were never acknowledged as
    // replicated; they make the split brain).
    p.command(0, Command::Primary);
    p.witness(0, true);
    p.client(0, 1, write(9, 0xCD));
    p.settle();
    p.command(0, Command::Secondary);
    // Node 1's operator prepares a discard, then promotes it after all, and it writes.
    p.command(1, Command::DiscardMyData);
    p.command(1, Command::Primary);
    p.witness(1, true);
    assert_eq!(p.cores[1].role(), Role::Primary);
    p.client(1, 2, write(5, 0xAB));
    p.settle();
    assert_eq!(p.reply(2), Some(&Reply::Done));
    p.command(1, Command::Secondary);
    p.connect();
    p.settle();
    assert_eq!(p.disks[1].get(&5), Some(&0xAB), "node 1's acknowledged write survived the handshake");
}

/// Seed 1636581: a node promoted while its applier still carried out a write of its former
/// Primary let a client write to the same blocks run alongside it; the older write finished
/// last and won.
#[test]
fn a_promoted_node_waits_for_the_writes_it_still_applies_for_its_peer() {
    let mut p = Pair::new([SYNCED; 2]);
    p.connect();
    p.settle();
    p.command(1, Command::Primary);
    p.settle();
    p.client(1, 1, write(5, 0x11));
    p.complete_io(1, |e| matches!(e, Effect::Persist { .. } | Effect::Flush { .. }));
    p.deliver(0);
    assert_eq!(p.io[0].len(), 1, "node 0 applies node 1's write, slowly");
    p.disconnect();
    p.command(0, Command::Primary);
    p.witness(0, true);
    assert_eq!(p.cores[0].role(), Role::Primary);
    p.client(0, 2, write(5, 0x22));
    while p.complete_io(0, |e| matches!(e, Effect::Persist { .. } | Effect::Flush { .. })) {}
    assert!(
        !p.io[0].iter().any(|(_, e)| matches!(e, Effect::Write { data, .. } if data == &vec![0x22])),
        "the client write waits for the applier's"
    );
    p.complete_io(0, |e| matches!(e, Effect::Write { data, .. } if data == &vec![0x11]));
    p.settle();
    assert_eq!(p.reply(2), Some(&Reply::Done));
    assert_eq!(p.disks[0].get(&5), Some(&0x22));
}

/// Seed 1242453: a write waiting for its activity-log transaction started after the witness had
/// refused this node and it had stepped down; it landed on a disk that was about to be
/// resynced from the peer, outside what the resync covered.
#[test]
fn a_write_waiting_for_the_activity_log_fails_once_the_node_stepped_down() {
    let mut p = Pair::connected_with_primary();
    p.disconnect();
    p.client(0, 1, write(5, 0xAB));
    assert!(p.io[0].iter().any(|(_, e)| matches!(e, Effect::Persist { .. })), "the extent is being logged");
    p.witness(0, false);
    assert_eq!(p.cores[0].role(), Role::Secondary);
    p.settle();
    assert_eq!(p.reply(1), Some(&Reply::Failed));
    assert_eq!(p.disks[0].get(&5), None, "nothing was written");
}

/// A TRIM is ordered and mirrored like a write: the peer's block reads as zeroes too.
#[test]
fn a_trim_is_mirrored_like_a_write() {
    let mut p = Pair::connected_with_primary();
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    p.client(0, 2, ClientRequest::Trim { offset: 5 * BLOCK, len: BLOCK });
    p.settle();
    assert_eq!(p.reply(2), Some(&Reply::Done));
    assert_eq!((p.disks[0].get(&5), p.disks[1].get(&5)), (Some(&0), Some(&0)));
}

/// `invalidate` is refused on a Primary; on the Secondary its disk turns Inconsistent and a
/// full sync from the peer rewrites every block, also those nobody marked.
#[test]
fn invalidate_takes_a_full_sync_from_the_peer() {
    let mut p = Pair::connected_with_primary();
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    p.command(0, Command::Invalidate);
    p.settle();
    assert!(!p.invalidated[0] && p.cores[0].disk() == DiskState::UpToDate, "refused on the Primary");
    // The reason to invalidate: data this node holds but cannot trust.
    p.disks[1].insert(9, 0xBAD);
    p.command(1, Command::Invalidate);
    p.deliver(0);
    p.deliver(1);
    assert_eq!(p.cores[1].disk(), DiskState::Inconsistent);
    assert!(p.cores[1].out_of_sync_blocks() == SIZE / BLOCK, "every block is marked");
    p.settle();
    assert!(p.invalidated[1]);
    assert!(p.cores.iter().all(|c| c.is_established() && c.disk() == DiskState::UpToDate));
    assert_eq!((p.disks[1].get(&5), p.disks[1].get(&9)), (Some(&0xAB), Some(&0)));
}

/// Online verify finds a block that differs and marks it; a reconnect resyncs it from the
/// Primary, and a second verify finds nothing.
#[test]
fn verify_marks_what_differs_and_a_reconnect_repairs_it() {
    let mut p = Pair::connected_with_primary();
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    p.disks[1].insert(9, 0xBAD);
    p.command(1, Command::Verify);
    p.settle();
    assert_eq!(p.verified[1], Some(64), "one verify request's blocks differ");
    assert!(p.cores[1].out_of_sync_blocks() > 0, "and are marked");
    p.disconnect();
    p.connect();
    p.settle();
    assert_eq!(p.disks[1].get(&9), Some(&0));
    p.command(0, Command::Verify);
    p.settle();
    assert_eq!(p.verified[0], Some(0));
}

/// Seed 52926: both nodes ran a verify at once; each held the ranges it had asked about as
/// claims of its write path, so each one's read for the other's request waited for the other's
/// reply, which waited behind it in the applier.
#[test]
fn two_verifies_at_once_both_finish() {
    let mut p = Pair::connected_with_primary();
    p.command(0, Command::Verify);
    p.command(1, Command::Verify);
    p.settle();
    assert_eq!(p.verified, [Some(0), Some(0)]);
    assert!(p.cores.iter().all(|c| c.is_quiet()));
}

/// DRBD's on-io-error=detach: the Secondary's disk fails a replicated write. It goes Diskless,
/// leaves the connection and is never promoted; the Primary marks the write; once the disk is
/// attached again (the node starts from the metadata on it) the resync gives it the block.
#[test]
fn a_failed_disk_detaches_and_gets_what_it_missed_after_attach() {
    let mut p = Pair::connected_with_primary();
    p.client(0, 1, write(5, 0xAB));
    while p.complete_io(0, |e| matches!(e, Effect::Persist { .. })) {}
    p.deliver(1);
    p.fail_io(1, |e| matches!(e, Effect::Write { .. }));
    assert!(p.cores[1].is_diskless() && p.dropped[1], "detached and left the connection");
    p.disconnect();
    p.witness(0, true);
    p.settle();
    assert_eq!(p.reply(1), Some(&Reply::Done), "the Primary writes alone with the witness");
    assert!(p.cores[0].out_of_sync_blocks() > 0, "and marks what the peer lacks");
    p.command(1, Command::Primary);
    assert_eq!(p.cores[1].role(), Role::Secondary, "a Diskless node is never promoted");
    assert!(!p.cores[1].wants_connection());
    let blocks = SIZE / BLOCK;
    let image = p.images[1].clone().unwrap_or(Persisted {
        gens: SYNCED,
        disk: DiskState::UpToDate,
        primary: false,
        bitmap: crate::metadata::bitmap::DirtyBitmap::new(blocks),
        activity_log: Vec::new(),
    });
    p.cores[1] = NodeCore::restart(config(1), &image);
    p.drain(1);
    p.connect();
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established() && c.disk() == DiskState::UpToDate));
    assert_eq!(p.disks[1].get(&5), Some(&0xAB));
}

/// A Primary whose disk fails a read answers it with an error, not with data, and every later
/// request too: it has no disk to serve from.
#[test]
fn a_primary_whose_disk_failed_answers_with_errors() {
    let mut p = Pair::connected_with_primary();
    p.client(0, 1, ClientRequest::Read { offset: 0, len: BLOCK });
    p.fail_io(0, |e| matches!(e, Effect::Read { .. }));
    p.settle();
    assert_eq!(p.reply(1), Some(&Reply::Failed));
    assert!(p.cores[0].is_diskless() && !p.cores[0].answers_writes());
    p.client(0, 2, write(5, 0xAB));
    p.settle();
    assert_eq!(p.reply(2), Some(&Reply::Failed));
    assert_eq!(p.disks[0].get(&5), None);
}

/// Seed 192651: a Primary handed its role over (switchover) with writes its peer had not made
/// stable yet; when the link dropped later it took a new generation as if its data were newer
/// than the new Primary's, and the pair never connected again (a Primary is never target).
#[test]
fn a_node_that_handed_over_its_role_takes_no_new_generation_for_its_old_writes() {
    let mut p = Pair::connected_with_primary();
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    assert_eq!(p.reply(1), Some(&Reply::Done), "acknowledged, not yet stable on the peer");
    p.demote_unsettled(0);
    p.settle();
    p.command(1, Command::Primary);
    p.settle();
    assert_eq!(p.cores[1].role(), Role::Primary);
    p.client(1, 2, write(6, 0xCD));
    p.settle();
    p.disconnect();
    p.witness(1, true);
    p.settle();
    assert_eq!(p.cores[0].gens(), SYNCED, "node 0's data is not the newer one");
    p.connect();
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established()), "{}", p.cores[0].describe_work());
    assert_eq!((p.disks[0].get(&6), p.disks[1].get(&5)), (Some(&0xCD), Some(&0xAB)));
}

/// Seed 378732: a refusal of the witness, stale since the nodes were connected again, ended a
/// promotion this node had meanwhile asked of its peer; the peer's consent then found no
/// promotion, and the peer took this node for Primary from then on (and refused to promote).
#[test]
fn a_stale_witness_answer_leaves_a_promotion_asked_of_the_peer_alone() {
    let mut p = Pair::new([SYNCED; 2]);
    p.command(1, Command::Primary);
    assert!(p.asked_witness[1], "disconnected: the witness is asked");
    p.connect();
    p.settle();
    p.command(1, Command::Primary);
    assert!(p.inbox[0].iter().any(|m| matches!(m, PeerMessage::PromoteRequest)));
    p.witness(1, false);
    p.settle();
    assert_eq!(p.cores[1].role(), Role::Primary);
    assert_eq!(p.cores[0].link(), Link::Up { peer_role: Role::Primary, peer_disk: DiskState::UpToDate });
}

/// `primary` on both connected nodes at once (issue 15: both became Primary, 20 tries of 20, in
/// the daemon): each asks the other, and the dialer (node 0) wins the tie on both nodes alike.
#[test]
fn both_nodes_asking_to_be_promoted_at_once_make_one_primary() {
    let mut p = Pair::new([SYNCED; 2]);
    p.connect();
    p.settle();
    p.command(0, Command::Primary);
    p.command(1, Command::Primary);
    assert!(p.inbox.iter().all(|inbox| inbox.iter().any(|m| matches!(m, PeerMessage::PromoteRequest))));
    p.settle();
    assert_eq!([p.cores[0].role(), p.cores[1].role()], [Role::Primary, Role::Secondary]);
    assert_eq!(p.cores[1].link(), Link::Up { peer_role: Role::Primary, peer_disk: DiskState::UpToDate });
    // The loser asks again: refused, the winner is Primary.
    p.command(1, Command::Primary);
    p.settle();
    assert_eq!(p.cores[1].role(), Role::Secondary);
}

/// Seed 2140 (once the sync target pulled, as the daemon's does): a write admitted before the
/// link came up waited for its activity-log transaction and was dispatched, unreplicated,
/// after this node's Hello had gone out; its block was marked here, the target never learned
/// of it and never asked for it, and the resync never ended. The Hello now waits, as the
/// daemon drains writes before the bitmap exchange.
#[test]
fn the_hello_waits_for_a_write_admitted_before_the_link_came_up() {
    let mut p = Pair::new([SYNCED; 2]);
    p.command(0, Command::Primary);
    p.witness(0, true);
    p.settle();
    // Block 9 is in an extent not yet logged: the write waits for the log's metadata write.
    p.client(0, 1, write(9, 0xCD));
    assert!(p.io[0].iter().any(|(_, e)| matches!(e, Effect::Persist { .. })));
    p.connect();
    let hello_sent = |p: &Pair| p.inbox[1].iter().any(|m| matches!(m, PeerMessage::Hello(_)));
    assert!(!hello_sent(&p), "no Hello while a write admitted before waits to be dispatched");
    p.complete_io(0, |e| matches!(e, Effect::Persist { .. }));
    let Some(PeerMessage::Hello(hello)) = p.inbox[1].iter().find(|m| matches!(m, PeerMessage::Hello(_)))
    else {
        panic!("the Hello goes once the write is dispatched")
    };
    assert!(hello.dirty.iter().any(|&(s, e)| s <= 9 && 9 < e), "it carries the write's block: {hello:?}");
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established() && c.out_of_sync_blocks() == 0));
    assert_eq!(p.disks[1].get(&9), Some(&0xCD), "resynced");
}

/// Seed 879769: the target of an `invalidate` never got the SyncStart (a one-way cut), then
/// took a new generation for writes of its own the peer had not made stable; the sync source,
/// promoted alone, took none, since its bitmap identifier was set. The demoted node counted as
/// newer than the Primary's new writes, and every reconnect was refused (a Primary never
/// becomes target), with no split brain for the operator to resolve.
#[test]
fn a_source_of_an_unfinished_resync_promoted_alone_starts_a_new_generation() {
    // With a resync behind them (a history to share).
    let synced = Generations { history: [0x2000_0000_0000_0008, 0], ..SYNCED };
    let mut p = Pair::new([synced; 2]);
    p.connect();
    p.settle();
    p.command(0, Command::Primary);
    p.settle();
    p.client(0, 1, write(5, 0xAB));
    p.settle();
    assert_eq!(p.reply(1), Some(&Reply::Done), "acknowledged, not yet stable on the peer");
    p.demote_unsettled(0);
    p.settle();
    p.command(0, Command::Invalidate);
    // Node 1 grants and becomes sync source; nothing it sends reaches node 0.
    p.deliver(1);
    while p.complete_io(1, |_| true) {}
    assert_ne!(p.cores[1].gens().bitmap, 0, "node 1 holds the sync identifier");
    p.disconnect();
    assert_ne!(p.cores[0].gens().current, synced.current, "node 0's writes are newer");
    p.command(1, Command::Primary);
    p.witness(1, true);
    assert_eq!(p.cores[1].role(), Role::Primary);
    assert_ne!(p.cores[1].gens().current, synced.current, "writing alone: a generation of its own");
    p.client(1, 2, write(6, 0xCD));
    p.settle();
    assert_eq!(p.reply(2), Some(&Reply::Done));
    p.connect();
    p.settle();
    assert!(!p.cores[0].wants_connection(), "both wrote: a split brain");
    // The operator's recovery: the node that did not serve last discards its data.
    p.command(0, Command::DiscardMyData);
    p.command(0, Command::Connect);
    p.command(1, Command::Connect);
    p.disconnect();
    p.connect();
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established()), "{}", p.cores[0].describe_work());
    assert_eq!(p.disks[0].get(&6), Some(&0xCD));
}

/// A switchover by hand: `down` on the Primary (its writes become stable on the peer first),
/// `primary` on the peer, which is alone now, then `up`: the old Primary is the target of a
/// resync from the new one. With `down` starting a new generation (planted), a split brain.
#[test]
fn a_switchover_by_hand_ends_in_a_resync_not_a_split_brain() {
    for (bugs, split_brain) in [(Bugs::NONE, false), (Bugs::only(Bug::DownStartsNewGeneration), true)] {
        let mut p = Pair::connected_with_primary();
        for core in &mut p.cores {
            core.cfg.bugs = bugs;
        }
        p.client(0, 1, write(5, 0xAB));
        p.settle();
        assert_eq!(p.reply(1), Some(&Reply::Done), "acknowledged, not yet stable on the peer");
        p.command(0, Command::Down);
        assert_eq!(p.cores[0].role(), Role::Secondary);
        p.settle();
        assert!(p.cores[0].is_quiet(), "the peer made every write stable: {}", p.cores[0].describe_work());
        p.disconnect();
        p.command(1, Command::Primary);
        p.witness(1, true);
        assert_eq!(p.cores[1].role(), Role::Primary);
        p.client(1, 2, write(6, 0xCD));
        p.settle();
        // `up`: the process starts again from its metadata.
        let image = p.images[0].clone().expect("metadata written");
        p.cores[0] = NodeCore::restart(config(0), &image);
        p.cores[0].cfg.bugs = bugs;
        p.drain(0);
        p.connect();
        p.settle();
        assert_eq!(!p.cores[0].wants_connection(), split_brain, "{bugs:?}");
        if !split_brain {
            assert!(p.cores.iter().all(|c| c.is_established()));
            assert_eq!(p.disks[0].get(&6), Some(&0xCD));
        }
    }
}

/// Seed 7999 (protocol B): a Secondary whose applier was still writing a block of its former
/// Primary became the source of that node's `invalidate` and read the block before the write
/// landed; the target took the older data as the source's. A source's read now waits for the
/// peer's writes received before it.
#[test]
fn a_sync_source_reads_a_range_only_after_the_peers_writes_to_it_landed() {
    let mut p = Pair::connected_with_primary_over(rdbd_protocol::repl::Protocol::A);
    // Protocol A: done once written here and handed to the link; node 1's write stays in flight.
    p.client(0, 1, write(5, 0xAB));
    while p.complete_io(0, |_| true) | p.deliver(0) {}
    p.deliver(1);
    assert!(p.io[1].iter().any(|(_, e)| matches!(e, Effect::Write { .. })));
    assert_eq!(p.reply(1), Some(&Reply::Done));
    p.demote_unsettled(0);
    p.command(0, Command::Invalidate);
    // Everything but node 1's data write goes on: node 1 agrees, becomes source, node 0 asks.
    let is_data_write = |e: &Effect<Data>| matches!(e, Effect::Write { offset, .. } if *offset == 5 * BLOCK);
    for _ in 0..20 {
        p.deliver(1);
        p.deliver(0);
        p.complete_io(0, |_| true);
        p.complete_io(1, |e| !is_data_write(e));
    }
    assert!(p.cores[0].is_out_of_sync(5), "block 5 is not resynced while node 1 still writes it");
    let reads_block_5 = |p: &Pair| {
        p.io[1].iter().any(|(_, e)| matches!(e, Effect::Read { offset, len, .. } if *offset <= 5 * BLOCK && 5 * BLOCK < offset + len))
    };
    assert!(!reads_block_5(&p), "no resync read of block 5 while the peer's write to it is in flight");
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established() && c.out_of_sync_blocks() == 0));
    assert_eq!(p.disks[0].get(&5), Some(&0xAB), "the target has the write");
}

/// Seed 97588: a Secondary applied its Primary's write (not yet flushed), was killed, and came
/// back as the sync source of that block (the former Primary had marked it when the link died);
/// it sent its page-cache copy and both sides cleared the mark. A power loss then took the
/// block from its disk, and nothing marked it any more. A restarted node now flushes its disk
/// before it offers its data in a Hello or is promoted.
#[test]
fn a_restarted_node_flushes_its_disk_before_it_offers_its_data() {
    let mut p = Pair::new([SYNCED; 2]);
    let image = Persisted {
        gens: SYNCED,
        disk: DiskState::UpToDate,
        primary: false,
        bitmap: crate::metadata::bitmap::DirtyBitmap::new(SIZE / BLOCK),
        activity_log: Vec::new(),
    };
    p.cores[0] = NodeCore::restart(config(0), &image);
    p.drain(0);
    assert!(p.io[0].iter().any(|(_, e)| matches!(e, Effect::Flush { .. })), "a flush first");
    p.connect();
    p.command(0, Command::Primary);
    assert!(!p.inbox[1].iter().any(|m| matches!(m, PeerMessage::Hello(_))), "no Hello before the flush");
    assert!(!p.inbox[1].iter().any(|m| matches!(m, PeerMessage::PromoteRequest)), "no promotion either");
    p.complete_io(0, |e| matches!(e, Effect::Flush { .. }));
    assert!(p.inbox[1].iter().any(|m| matches!(m, PeerMessage::Hello(_))));
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established()));
}

/// Seed 304173 (protocol B): right after a switchover the new Primary read a block whose write
/// from the former Primary it had received (and acknowledged on receipt) but not yet started
/// (it waited behind an earlier one); the read returned the older data. A client request now
/// waits for the peer's writes received and not yet done, not only the running ones.
#[test]
fn a_new_primary_reads_a_block_only_after_the_peers_queued_write_to_it() {
    let mut p = Pair::connected_with_primary_over(rdbd_protocol::repl::Protocol::B);
    // Two writes to block 5: on node 1 the second waits behind the first, which stays in flight.
    for (id, token) in [(1, 0xA1), (2, 0xA2)] {
        p.client(0, id, write(5, token));
        while p.complete_io(0, |_| true) | p.deliver(0) | p.deliver(1) {}
    }
    assert_eq!((p.reply(1), p.reply(2)), (Some(&Reply::Done), Some(&Reply::Done)), "protocol B: on receipt");
    let is_write_5 = |e: &Effect<Data>| matches!(e, Effect::Write { offset, .. } if *offset == 5 * BLOCK);
    assert_eq!(p.io[1].iter().filter(|(_, e)| is_write_5(e)).count(), 1, "the second waits");
    p.switch_over_holding(is_write_5);
    p.client(1, 3, ClientRequest::Read { offset: 5 * BLOCK, len: BLOCK });
    assert!(
        !p.io[1].iter().any(|(_, e)| matches!(e, Effect::Read { offset, .. } if *offset == 5 * BLOCK)),
        "the read waits for both writes"
    );
    p.settle();
    assert_eq!(p.reply(3), Some(&Reply::Data(vec![0xA2])));
}

/// Seeds 437431, 489729, 745125 (protocols A and B): a node just promoted answered a client
/// FLUSH while a write of its former Primary (already answered to the client) was still in
/// flight on its disk; a power loss took that write, and the node, a crashed Primary, became
/// sync source. A client FLUSH now waits for the peer's writes received before it.
#[test]
fn a_new_primary_flushes_only_once_the_former_primarys_writes_landed() {
    let mut p = Pair::connected_with_primary_over(rdbd_protocol::repl::Protocol::A);
    p.client(0, 1, write(5, 0xA1));
    while p.complete_io(0, |_| true) | p.deliver(0) | p.deliver(1) {}
    assert_eq!(p.reply(1), Some(&Reply::Done), "protocol A: handed to the link");
    let is_write_5 = |e: &Effect<Data>| matches!(e, Effect::Write { offset, .. } if *offset == 5 * BLOCK);
    p.switch_over_holding(is_write_5);
    p.client(1, 2, ClientRequest::Flush);
    assert!(!p.io[1].iter().any(|(_, e)| matches!(e, Effect::Flush { .. })), "the flush waits for the write");
    p.complete_io(1, is_write_5);
    assert!(p.io[1].iter().any(|(_, e)| matches!(e, Effect::Flush { .. })), "then it starts");
    p.settle();
    assert_eq!(p.reply(2), Some(&Reply::Done));
}

/// A split brain between two Secondaries resolved by `after-sb-0pri discard-least-changes`:
/// the node that wrote fewer blocks alone becomes sync target and ends with the other's data;
/// with the loser keeping its data (planted) the replicas stay different.
#[test]
fn a_split_brain_resolved_by_policy_resyncs_the_loser_from_the_winner() {
    use crate::replication::split_brain::{AfterSb0Pri, Policies};
    for bugs in [Bugs::NONE, Bugs::only(Bug::SplitBrainLoserKeepsData)] {
        let policies = Policies { after_sb_0pri: AfterSb0Pri::DiscardLeastChanges, ..Default::default() };
        let mut p = Pair::configured(|cfg| CoreConfig { policies: policies.clone(), bugs, ..cfg });
        // Each writes alone in turn: node 0 three blocks, node 1 one.
        for (n, blocks) in [(0, vec![1, 2, 3]), (1, vec![2])] {
            p.command(n, Command::Primary);
            p.witness(n, true);
            for (i, &b) in blocks.iter().enumerate() {
                p.client(n, 10 * n as u64 + i as u64, write(b, 0xA0 + 0x10 * n as u64 + b));
            }
            p.settle();
            p.command(n, Command::Secondary);
            p.settle();
        }
        p.connect();
        p.settle();
        let identical = (1..=3).all(|b| p.disks[0].get(&b) == p.disks[1].get(&b));
        if bugs == Bugs::NONE {
            assert!(p.cores.iter().all(|c| c.is_established() && c.wants_connection()));
            assert!(
                identical,
                "node 1 (fewer changes) took node 0's data: {:?} {:?}",
                p.disks[0], p.disks[1]
            );
            assert_eq!(p.disks[1].get(&2), Some(&0xA2), "node 1's own write to block 2 is discarded");
            assert_eq!(p.cores[1].out_of_sync_blocks(), 0);
        } else {
            assert!(!identical, "planted: the loser kept its data");
        }
    }
}

/// Checksum-based resync: of the ranges the Primary marked while cut off, only those that
/// differ on the Secondary travel; the block it rewrote with the same data is closed as in sync.
/// (The core compares a request's range as a whole, the daemon each bitmap block of it.)
#[test]
fn a_checksum_resync_sends_only_the_ranges_that_differ() {
    let mut p = Pair::connected_with_primary_configured(|cfg| CoreConfig { csums: true, ..cfg });
    p.client(0, 1, write(3, 0x33));
    p.settle();
    assert_eq!(p.disks[1].get(&3), Some(&0x33));
    p.disconnect();
    p.witness(0, true);
    // Block 3 again with the same data, blocks 5 and 7 new: three marked, two differ.
    for (id, block, token) in [(2, 3, 0x33), (3, 5, 0x55), (4, 7, 0x77)] {
        p.client(0, id, write(block, token));
    }
    p.settle();
    assert_eq!(p.cores[0].out_of_sync_blocks(), 3);
    p.connect();
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established() && c.out_of_sync_blocks() == 0));
    assert_eq!(p.cores[1].disk(), DiskState::UpToDate);
    assert_eq!(p.resync_blocks_sent[0], 2, "only blocks 5 and 7 travelled");
    for block in [3, 5, 7] {
        assert_eq!(p.disks[0].get(&block), p.disks[1].get(&block), "block {block}");
    }
}

/// rr-conflict retry-connect: a handshake that would make the Primary the sync target is
/// refused for now, the next attempt waits (the daemon's connect-interval), and once the
/// Primary is demoted the pair connects and resyncs it.
#[test]
fn rr_conflict_retry_connect_tries_again_later_and_syncs_once_the_primary_stepped_down() {
    use crate::replication::split_brain::RrConflict;
    let mut p = Pair::configured(|cfg| CoreConfig { rr_conflict: RrConflict::RetryConnect, ..cfg });
    p.command(0, Command::Primary);
    p.witness(0, true);
    assert_eq!(p.cores[0].role(), Role::Primary);
    // Node 1 holds data newer than node 0's current generation (it synced from it, then wrote).
    let newer =
        Generations { current: 0x3000_0000_0000_0004, bitmap: p.cores[0].gens().current, history: [0, 0] };
    let cfg = CoreConfig { rr_conflict: RrConflict::RetryConnect, ..config(1) };
    p.cores[1] = NodeCore::new(cfg, newer, DiskState::UpToDate);
    p.connect();
    p.settle();
    assert!(p.dropped[0] && p.dropped[1], "refused: the Primary would become target");
    p.disconnect();
    assert!(!p.cores[0].wants_connection(), "not again at once");
    for n in 0..2 {
        p.cores[n].handle_tick(std::time::Duration::from_secs(2));
        p.drain(n);
    }
    assert!(p.cores.iter().all(|c| c.wants_connection()), "retrying after the interval");
    p.command(0, Command::Secondary);
    p.settle();
    p.connect();
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established()), "{}", p.cores[0].describe_work());
    assert_eq!(p.cores[0].gens().current, newer.current, "node 0 took node 1's data");
}

/// Seed 60293 (protocol A): the former Primary's last write waited on the new Primary's disk
/// behind a FLUSH barrier, itself behind a slow write; the link died, the new Primary dropped
/// the waiting write, and its client's FLUSH then counted it durable. The peer's writes received
/// before a link loss still reach the disk; the FLUSH covers them.
#[test]
fn a_new_primary_still_applies_its_former_primarys_queued_writes_after_the_link_died() {
    let mut p = Pair::connected_with_primary_over(rdbd_protocol::repl::Protocol::A);
    // Write 5 lands slowly on node 1; node 0's own flush of the peer (at a tick) and write 6
    // queue behind it there.
    p.client(0, 1, write(5, 0xA5));
    while p.complete_io(0, |_| true) | p.deliver(0) | p.deliver(1) {}
    p.cores[0].handle_tick(std::time::Duration::from_millis(100));
    p.drain(0);
    p.client(0, 3, write(6, 0xA6));
    while p.complete_io(0, |_| true) | p.deliver(1) {}
    assert_eq!(p.reply(3), Some(&Reply::Done), "protocol A: handed to the link");
    let is_write_5 = |e: &Effect<Data>| matches!(e, Effect::Write { offset, .. } if *offset == 5 * BLOCK);
    p.switch_over_holding(is_write_5);
    assert_eq!(p.cores[1].role(), Role::Primary);
    assert!(!p.disks[1].contains_key(&6), "write 6 waits behind the barrier");
    p.disconnect();
    p.witness(1, true);
    p.client(1, 4, ClientRequest::Flush);
    p.complete_io(1, is_write_5);
    p.settle();
    assert_eq!(p.reply(4), Some(&Reply::Done));
    assert_eq!(p.disks[1].get(&6), Some(&0xA6), "the queued write landed before the FLUSH was answered");
}

/// Seed 110274 (protocol A, checksum-based resync): the former connection's write to a block
/// was still in flight on the sync target's disk when the target read that block for its
/// checksum request; the source had overwritten the block since (a TRIM the target never
/// received) with what the target's disk held before, so the two compared equal, the bit
/// cleared, and the old write landed. A checksum read now waits for the peer's writes still to
/// land.
#[test]
fn a_checksum_read_waits_for_the_peers_writes_still_in_flight() {
    let protocol = rdbd_protocol::repl::Protocol::A;
    let mut p = Pair::connected_with_primary_configured(|cfg| CoreConfig { csums: true, protocol, ..cfg });
    let is_write_5 = |e: &Effect<Data>| matches!(e, Effect::Write { offset, .. } if *offset == 5 * BLOCK);
    p.client(0, 1, write(5, 0xA5));
    while p.complete_io(0, |_| true) | p.deliver(1) | p.complete_io(1, |e| !is_write_5(e)) {}
    assert!(p.io[1].iter().any(|(_, e)| is_write_5(e)), "node 1's disk holds the write");
    // The TRIM is done on node 0; the link dies before node 1 receives it.
    p.client(0, 2, ClientRequest::Trim { offset: 5 * BLOCK, len: BLOCK });
    while p.complete_io(0, |_| true) {}
    assert_eq!(p.reply(2), Some(&Reply::Done));
    p.disconnect();
    p.connect();
    while p.complete_io(0, |_| true) | p.deliver(0) | p.deliver(1) | p.complete_io(1, |e| !is_write_5(e)) {}
    p.complete_io(1, is_write_5);
    p.settle();
    assert!(p.cores.iter().all(|c| c.is_established() && c.out_of_sync_blocks() == 0));
    assert_eq!(p.disks[1].get(&5).copied().unwrap_or(0), 0, "node 1 took the TRIM from the resync");
}
