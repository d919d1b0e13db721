//! Operators racing each other and the cluster: `primary` typed on both nodes at once (two
//! cluster managers, or two people), and a switchover done by hand with `down` and `up`.

use crate::replication::core::io::Command;
use crate::replication::core::Link;
use crate::replication::states::Role;

use super::{Event, World, MS};

/// Where a switchover by hand stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HandStep {
    /// The application is stopped; `down` on the Primary once its requests are drained.
    Down,
    /// `down` demoted it and made its writes stable on the peer: disconnect and stop the
    /// process once it is quiet.
    Stop,
    /// `primary` on the peer (alone now: it asks the witness).
    Promote,
    /// `up` on the old Primary: it starts again and connects.
    Up,
}

impl World {
    /// Both operators type `primary` within a few milliseconds (after the Primary, if any, was
    /// demoted): now, or as the next connection starts (during its handshake, or the resync
    /// it decides on). Disconnected, always the latter; connected, the operator may disconnect
    /// and connect for it.
    pub(super) fn race_promote(&mut self) {
        for node in 0..2 {
            if self.nodes[node].core.as_ref().is_some_and(|c| c.role() == Role::Primary) {
                self.command(node, Command::Secondary);
            }
        }
        if !self.conn_up || self.rng.bool() {
            self.note(|| "operators: both type primary at the next connect".to_string());
            self.race_at_connect = true;
            if self.conn_up {
                let node = self.rng.usize(0..2);
                self.command(node, Command::Disconnect);
                self.command(node, Command::Connect);
            }
        } else {
            self.note(|| "operators: both type primary".to_string());
            self.schedule_race(2 * MS);
        }
    }

    /// Schedules `primary` on both nodes within `spread`.
    pub(super) fn schedule_race(&mut self, spread: u64) {
        for node in 0..2 {
            let delay = self.rng.u64(0..spread);
            self.schedule(delay, Event::Operator { node, command: Command::Primary });
        }
    }

    /// The operator hands the Primary role of a connected pair in sync over by hand: `down` on
    /// the Primary, `primary` on its peer, `up` on the old Primary. It must end in a resync
    /// from the new Primary, never in a split brain (see `check_split_brain`).
    pub(super) fn start_hand_switchover(&mut self) {
        let from = (0..2).find(|&n| {
            self.nodes[n].core.as_ref().is_some_and(|c| c.role() == Role::Primary && c.is_established())
        });
        let Some(from) = from.filter(|_| self.conn_up && !self.client.paused) else { return };
        self.note(|| format!("operator: switchover by hand from node{from} (down, primary, up)"));
        self.client.paused = true;
        let incarnation = self.nodes[from].incarnation;
        self.schedule(MS, Event::Hand { from, incarnation, step: HandStep::Down, tries: 0 });
    }

    pub(super) fn hand_switchover(&mut self, from: usize, incarnation: u64, step: HandStep, tries: u32) {
        let to = 1 - from;
        let again = |w: &mut World, delay: u64, step: HandStep, tries: u32| {
            w.schedule(delay, Event::Hand { from, incarnation, step, tries })
        };
        // A crash or the healed world's end overtook the procedure: the operator gives up.
        let overtaken = match step {
            HandStep::Down | HandStep::Stop => {
                self.nodes[from].incarnation != incarnation || !self.alive(from)
            }
            HandStep::Promote | HandStep::Up => self.alive(from),
        };
        if step == HandStep::Promote && tries > 100 && !self.ending {
            // The peer could not be promoted (the witness is held, or cut off): `up` anyway.
            self.client.paused = false;
            return again(self, MS, HandStep::Up, 0);
        }
        if self.ending || overtaken || tries > 100 {
            self.note(|| "operator: switchover by hand abandoned".to_string());
            self.client.paused = false;
            return;
        }
        match step {
            HandStep::Down => {
                if !self.client.pending.is_empty() {
                    return again(self, 2 * MS, step, tries + 1);
                }
                self.command(from, Command::Down);
                if self.nodes[from].core.as_ref().map(|c| c.role()) != Some(Role::Secondary) {
                    return again(self, 2 * MS, step, tries + 1);
                }
                again(self, MS, HandStep::Stop, 0)
            }
            HandStep::Stop => {
                let quiet = self.nodes[from].core.as_ref().is_some_and(|c| c.is_quiet())
                    && self.nodes[from].in_flight.is_empty();
                let linked = self.nodes[from].core.as_ref().is_some_and(|c| c.link() != Link::Down);
                if linked && !quiet {
                    return again(self, 5 * MS, step, tries + 1);
                }
                if linked {
                    self.command(from, Command::Disconnect);
                    return again(self, MS, step, tries + 1);
                }
                self.stop(from);
                again(self, MS, HandStep::Promote, 0)
            }
            HandStep::Promote => {
                if self.nodes[to].core.as_ref().is_some_and(|c| c.role() == Role::Primary) {
                    self.client.paused = false;
                    let delay = self.rng.u64(10 * MS..500 * MS);
                    return again(self, delay, HandStep::Up, 0);
                }
                self.command(to, Command::Primary);
                again(self, 5 * MS, step, tries + 1)
            }
            HandStep::Up => {
                self.note(|| format!("operator on node{from}: up"));
                self.nodes[from].restart_pending = true;
                self.restart(from);
                self.command(from, Command::Connect);
            }
        }
    }
}
