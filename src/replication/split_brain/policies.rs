//! The split-brain and rr-conflict policies of a resource (DRBD's `after-sb-*` and
//! `rr-conflict` options), owned by the recovery that applies them; the resource file's
//! `[net]` table fills them.

use rdbd_protocol::repl::{AfterSb1, AfterSb2};

/// `after-sb-0pri`: split brain detected while neither node is Primary (DRBD's values).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AfterSb0Pri {
    /// Refuse to connect; the operator resolves it.
    #[default]
    Disconnect,
    /// The node that became Primary after the split loses: its bitmap generation lacks the
    /// Primary bit (it was Secondary when it started its generation), the other's has it.
    DiscardYoungerPrimary,
    /// The node that was Primary at the split (its bitmap generation has the Primary bit) loses.
    DiscardOlderPrimary,
    /// A side with no changes loses; if both changed, disconnect.
    DiscardZeroChanges,
    /// The side with fewer changed blocks loses.
    DiscardLeastChanges,
    /// The named node loses.
    DiscardNode(String),
}

/// `rr-conflict`: the sync decision would make a Primary the sync target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RrConflict {
    /// Refuse to connect (StandAlone).
    #[default]
    Disconnect,
    /// Run the pri-lost handler on the Primary, then refuse.
    CallPriLost,
    /// Keep trying to connect (the Primary may be demoted meanwhile).
    RetryConnect,
}

rdbd_protocol::option_spellings!(RrConflict {
    Disconnect => "disconnect",
    CallPriLost => "call-pri-lost",
    RetryConnect => "retry-connect",
});

impl AfterSb0Pri {
    /// Written before the node name in `discard-node-NAME`.
    pub const DISCARD_NODE_PREFIX: &'static str = "discard-node-";
    /// The accepted spellings, for messages.
    pub const NAMES: &'static [&'static str] = &[
        "disconnect",
        "discard-younger-primary",
        "discard-older-primary",
        "discard-zero-changes",
        "discard-least-changes",
        "discard-node-NAME",
    ];
}

impl std::fmt::Display for AfterSb0Pri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            AfterSb0Pri::Disconnect => "disconnect",
            AfterSb0Pri::DiscardYoungerPrimary => "discard-younger-primary",
            AfterSb0Pri::DiscardOlderPrimary => "discard-older-primary",
            AfterSb0Pri::DiscardZeroChanges => "discard-zero-changes",
            AfterSb0Pri::DiscardLeastChanges => "discard-least-changes",
            AfterSb0Pri::DiscardNode(node) => return write!(f, "{}{node}", Self::DISCARD_NODE_PREFIX),
        };
        f.write_str(name)
    }
}

/// The three after-sb policies of a resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub after_sb_0pri: AfterSb0Pri,
    pub after_sb_1pri: AfterSb1,
    pub after_sb_2pri: AfterSb2,
}
