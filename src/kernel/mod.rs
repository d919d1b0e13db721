//! Attaching the kernel's NBD client (`/dev/nbdN`) to our own server over socketpairs.
//!
//! - [`nbd`]: generic netlink (family "nbd"): CONNECT, RECONFIGURE, DISCONNECT, STATUS.
//! - [`ioctl`]: the NBD_SET_SOCK/NBD_DO_IT fallback for kernels without the netlink family.
//! - [`hygiene`]: process settings that keep the server out of reclaim deadlocks.
//! - [`holders`]: who has the device mounted or open, for refusals that say why.
//! - [`kernel_connections`] and [`DeviceConfig::for_export`]: socketpairs and the device's
//!   geometry and flags for an export.
//!
//! The kernel's end of each socketpair speaks transmission only; serve ours with
//! [`crate::nbd::Server::spawn_session`] and [`crate::nbd::Negotiated::without_handshake`].

mod error;
pub mod holders;
pub mod hygiene;
pub mod ioctl;
pub mod nbd;
mod netlink;
mod socketpair;

pub use error::{AttachError, DeviceName, Op};
pub use holders::{describe_holders, Holder, SystemRoots};
pub use hygiene::HygieneError;
pub use nbd::{DeviceConfig, DeviceStatus, NbdNetlink};
pub use socketpair::{kernel_connections, KernelConnection};
