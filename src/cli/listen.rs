//! Binding the listeners named on the command line, with errors a user can act on.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rdbd::nbd::Listener;

/// A bound listener and the URI clients use to reach it.
pub struct Bound {
    pub listener: Listener,
    pub uri: String,
    /// A unix socket path to remove on exit.
    pub socket_path: Option<PathBuf>,
}

pub fn bind_tcp(addr: &str) -> anyhow::Result<Bound> {
    let resolved = addr
        .to_socket_addrs()
        .with_context(|| format!("invalid listen address {addr:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("listen address {addr:?} resolves to nothing"))?;
    let std_listener = std::net::TcpListener::bind(resolved).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            anyhow::anyhow!("cannot listen on {resolved}: address already in use")
        }
        _ => anyhow::anyhow!("cannot listen on {resolved}: {e}"),
    })?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let host = match local {
        std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
        std::net::SocketAddr::V4(a) => a.ip().to_string(),
    };
    let uri = format!("nbd://{host}:{}/", local.port());
    Ok(Bound { listener: Listener::Tcp(listener), uri, socket_path: None })
}

pub fn bind_unix(path: &Path) -> anyhow::Result<Bound> {
    let bind = || std::os::unix::net::UnixListener::bind(path);
    let std_listener = match bind() {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // A socket file nobody listens on is left over from a crash: replace it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("cannot listen on {}: address already in use", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            bind().with_context(|| format!("cannot listen on {}", path.display()))?
        }
        Err(e) => bail!("cannot listen on {}: {e}", path.display()),
    };
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(std_listener)?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let uri = format!("nbd+unix:///?socket={}", absolute.display());
    Ok(Bound { listener: Listener::Unix(listener), uri, socket_path: Some(path.to_owned()) })
}
