//! What the server offers: named exports over block devices, and the flags and block sizes
//! advertised for each.

use std::sync::Arc;

use rdbd_protocol::nbd::export_flags as ef;

use crate::storage::BlockDevice;

/// Largest READ/WRITE payload accepted (the kernel's maximum request is 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred I/O size advertised to clients.
pub const PREFERRED_BLOCK: u32 = 4096;

/// One export: a device under a name.
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

impl Export {
    pub fn size(&self) -> u64 {
        self.device.info().size
    }

    pub fn read_only(&self) -> bool {
        self.device.info().read_only
    }

    /// Transmission flags for a client that did (or did not) negotiate structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let info = self.device.info();
        let mut flags = ef::HAS_FLAGS | ef::SEND_FLUSH | ef::SEND_FUA | ef::SEND_CACHE;
        // Every connection's writes land in the same backing store and FLUSH syncs all of it.
        flags |= ef::CAN_MULTI_CONN;
        if info.read_only {
            flags |= ef::READ_ONLY;
        } else {
            flags |= ef::SEND_TRIM | ef::SEND_WRITE_ZEROES | ef::SEND_FAST_ZERO;
        }
        if info.rotational {
            flags |= ef::ROTATIONAL;
        }
        if structured {
            flags |= ef::SEND_DF;
        }
        flags
    }

    /// (minimum, preferred, maximum) for NBD_INFO_BLOCK_SIZE.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let min = self.device.info().min_block.max(1);
        (min, PREFERRED_BLOCK.max(min), MAX_PAYLOAD)
    }
}

/// The exports a server offers; the first one is also the default export (name "").
pub struct Exports {
    list: Vec<Arc<Export>>,
}

impl Exports {
    pub fn new(list: Vec<Arc<Export>>) -> Self {
        assert!(!list.is_empty(), "a server needs at least one export");
        Self { list }
    }

    pub fn single(export: Export) -> Self {
        Self::new(vec![Arc::new(export)])
    }

    /// Looks an export up by name; "" selects the default export.
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.list.first();
        }
        self.list.iter().find(|e| e.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }
}
