//! Three hosts in network namespaces that the test creates (and deletes): nodes alpha and beta
//! joined by a replication link, and a witness host reached by each node over a link of its
//! own, so that each of the three links can be cut alone:
//!
//! ```text
//!   alpha 10.77.1.1 ── ab ── 10.77.1.2 beta
//!   alpha 10.77.4.1 ── hb ── 10.77.4.2 beta   (a second path, for heartbeats)
//!   10.77.2.1 │                 │ 10.77.3.2
//!            aw                 bw
//!   10.77.2.3 └── witness ──────┘ 10.77.3.3   (the witness listens on 10.77.9.9, routed)
//! ```
//!
//! Needs root and `ip`; [`Net::create`] returns `None` (a skip) otherwise.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const ALPHA_IP: &str = "10.77.1.1";
pub const BETA_IP: &str = "10.77.1.2";
pub const WITNESS_IP: &str = "10.77.9.9";
/// The second path's addresses (`heartbeat-address`).
pub const ALPHA_HEARTBEAT: &str = "10.77.4.1:7790";
pub const BETA_HEARTBEAT: &str = "10.77.4.2:7790";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    AlphaBeta,
    /// The second path between alpha and beta.
    Heartbeat,
    AlphaWitness,
    BetaWitness,
}

pub struct Net {
    pub alpha: String,
    pub beta: String,
    pub witness: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// The three namespaces and their links, or `None` where this cannot run (not root).
    pub fn create() -> Option<Net> {
        if !super::is_root() {
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!("rdbd{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let net = Net { alpha: format!("{tag}-a"), beta: format!("{tag}-b"), witness: format!("{tag}-w") };
        if let Err(e) = net.build() {
            if std::env::var("RDBD_REQUIRE_TOOLS").as_deref() == Ok("1") {
                panic!("cannot build the test's network namespaces: {e}");
            }
            eprintln!("SKIP: cannot build network namespaces: {e}");
            return None;
        }
        Some(net)
    }

    fn build(&self) -> Result<(), String> {
        for ns in [&self.alpha, &self.beta, &self.witness] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let pairs = [
            (&self.alpha, "ab", "10.77.1.1/24", &self.beta, "10.77.1.2/24"),
            (&self.alpha, "hb", "10.77.4.1/24", &self.beta, "10.77.4.2/24"),
            (&self.alpha, "aw", "10.77.2.1/24", &self.witness, "10.77.2.3/24"),
            (&self.beta, "bw", "10.77.3.2/24", &self.witness, "10.77.3.3/24"),
        ];
        for (left, name, left_ip, right, right_ip) in pairs {
            let (l, r) = (format!("{name}0"), format!("{name}1"));
            ip(&["link", "add", &l, "netns", left, "type", "veth", "peer", "name", &r, "netns", right])?;
            ip(&["-n", left, "addr", "add", left_ip, "dev", &l])?;
            ip(&["-n", right, "addr", "add", right_ip, "dev", &r])?;
            ip(&["-n", left, "link", "set", &l, "up"])?;
            ip(&["-n", right, "link", "set", &r, "up"])?;
        }
        ip(&["-n", &self.witness, "addr", "add", &format!("{WITNESS_IP}/32"), "dev", "lo"])?;
        ip(&["-n", &self.alpha, "route", "add", WITNESS_IP, "via", "10.77.2.3"])?;
        ip(&["-n", &self.beta, "route", "add", WITNESS_IP, "via", "10.77.3.3"])?;
        Ok(())
    }

    /// The namespace and interface of one end of `link`.
    fn end(&self, link: Link) -> (&str, &str) {
        match link {
            Link::AlphaBeta => (&self.alpha, "ab0"),
            Link::Heartbeat => (&self.alpha, "hb0"),
            Link::AlphaWitness => (&self.alpha, "aw0"),
            Link::BetaWitness => (&self.beta, "bw0"),
        }
    }

    /// Cuts `link` as a pulled cable would: packets stop, no connection is reset.
    pub fn cut(&self, link: Link) {
        let (ns, dev) = self.end(link);
        ip(&["-n", ns, "link", "set", dev, "down"]).unwrap();
    }

    pub fn mend(&self, link: Link) {
        let (ns, dev) = self.end(link);
        ip(&["-n", ns, "link", "set", dev, "up"]).unwrap();
        // The veth's far end was up all along; the route to the witness went with the device.
        if matches!(link, Link::AlphaWitness | Link::BetaWitness) {
            let via = if link == Link::AlphaWitness { "10.77.2.3" } else { "10.77.3.3" };
            let _ = ip(&["-n", ns, "route", "replace", WITNESS_IP, "via", via]);
        }
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program);
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.alpha, &self.beta, &self.witness] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
