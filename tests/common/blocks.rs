//! Small NBD clients (python libnbd) that write recognisable 4 KiB blocks to a node and check
//! the backing files afterwards.

use std::time::Duration;

use super::cluster::{assert_ok, Cluster, Node};
use super::{output_within, python_nbd};

pub const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

/// Writes `count` distinct 4 KiB blocks spread over `slots` blocks from `base` (the i-th at
/// `base + (i * 7919 % slots) * 4096`, each filled with [`pattern_block`]), then flushes.
const WRITE_BLOCKS: &str = r#"
import nbd, struct, sys
uri, base, slots, count, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
h = nbd.NBD()
h.connect_uri(uri)
for i in range(count):
    off = base + (i * 7919 % slots) * 4096
    h.pwrite(struct.pack("<QQ", i | (tag << 32), off) * 256, off)
h.flush()
h.shutdown()
"#;

/// Opens a connection and holds it until `release` exists (at most 60 s).
pub const HOLD_CONNECTION: &str = r#"
import nbd, os, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
deadline = time.time() + 60
while not os.path.exists(sys.argv[2]) and time.time() < deadline:
    time.sleep(0.02)
h.shutdown()
"#;

/// One FLUSH on a new connection: whatever was written before is durable on both nodes.
const FLUSH: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.flush()
h.shutdown()
"#;

pub fn block_offset(base: u64, slots: u64, i: u64) -> u64 {
    base + (i * 7919 % slots) * 4096
}

/// The i-th block at `offset`; `tag` tells apart two writers of the same blocks.
pub fn pattern_block(i: u64, offset: u64, tag: u64) -> Vec<u8> {
    let mut unit = (i | tag << 32).to_le_bytes().to_vec();
    unit.extend_from_slice(&offset.to_le_bytes());
    unit.repeat(256)
}

pub fn write_blocks(cluster: &Cluster, node: Node, base: u64, slots: u64, count: u64) {
    write_tagged_blocks(cluster, node, base, slots, count, 0);
}

/// [`write_blocks`] with the blocks' data marked by `tag`.
pub fn write_tagged_blocks(cluster: &Cluster, node: Node, base: u64, slots: u64, count: u64, tag: u64) {
    // An odd stride over a power-of-two number of slots visits each slot once: distinct blocks.
    assert!(slots.is_power_of_two() && count <= slots);
    let uri = cluster.nbd_uri(node);
    let args = [uri.as_str(), &base.to_string(), &slots.to_string(), &count.to_string(), &tag.to_string()];
    let out = output_within(&mut python_nbd(WRITE_BLOCKS, &args), TOOL_TIMEOUT);
    assert_ok(&out, "python write_blocks", cluster);
}

/// Asserts that `node`'s backing file holds the blocks [`write_blocks`] wrote.
pub fn assert_blocks(cluster: &Cluster, node: Node, base: u64, slots: u64, count: u64) {
    assert_tagged_blocks(cluster, node, base, slots, count, 0);
}

/// Asserts that `node`'s backing file holds the blocks [`write_tagged_blocks`] wrote.
pub fn assert_tagged_blocks(cluster: &Cluster, node: Node, base: u64, slots: u64, count: u64, tag: u64) {
    for i in 0..count {
        let offset = block_offset(base, slots, i);
        let on_disk = cluster.read_disk(node, offset, 4096);
        assert!(
            on_disk == pattern_block(i, offset, tag),
            "{}: block {i} at {offset:#x} does not hold what was written (tag {tag})",
            node.name()
        );
    }
}

pub fn flush(cluster: &Cluster, node: Node) {
    let out = output_within(&mut python_nbd(FLUSH, &[&cluster.nbd_uri(node)]), TOOL_TIMEOUT);
    assert_ok(&out, "python flush", cluster);
}

pub fn wait_no_clients(cluster: &Cluster, node: Node) {
    cluster.wait_for(node, "without NBD clients", Duration::from_secs(30), |s| {
        s.field("nbd_clients").as_u64() == 0
    });
}

/// Number of all-zero 4 KiB blocks in `node`'s backing file over `range`.
pub fn zero_blocks(cluster: &Cluster, node: Node, range: std::ops::Range<u64>) -> usize {
    let data = cluster.read_disk(node, range.start, (range.end - range.start) as usize);
    data.chunks(4096).filter(|b| b.iter().all(|&x| x == 0)).count()
}
