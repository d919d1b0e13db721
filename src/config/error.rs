//! Configuration errors. Each one renders as a single line that names the file and, when the
//! problem is inside the file, the line and the dotted key, so it can be fixed without guessing.

use std::path::PathBuf;

/// Why a resource configuration could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The resource name cannot name a file in the configuration directory.
    #[error("invalid resource name {name:?}: {reason}")]
    ResourceName { name: String, reason: String },

    /// The file could not be read (missing, unreadable, a directory...).
    #[error("cannot read {}: {}", path.display(), os_message(error))]
    Read { path: PathBuf, error: std::io::Error },

    /// The text is not well-formed TOML (or not UTF-8). `key` is given when it can be told.
    #[error("{}:{line}: {}{message}", file.display(), key_prefix(key))]
    Syntax { file: PathBuf, line: usize, key: Option<String>, message: String },

    /// Well-formed TOML that does not fit the schema: unknown key, wrong type, missing key.
    #[error("{}:{line}: {key}: {message}", file.display())]
    Schema { file: PathBuf, line: usize, key: String, message: String },

    /// Fits the schema, but a value is out of range or contradicts another one.
    #[error("{}:{line}: {key}: {message}", file.display())]
    Invalid { file: PathBuf, line: usize, key: String, message: String },

    /// No `[[node]]` of the resource is this machine.
    #[error("{}: {}", file.display(), unknown_node(resource, name, *by_hostname, nodes))]
    UnknownNode {
        file: PathBuf,
        resource: String,
        /// The name asked for (`--node`, `RDBD_NODE`) or this machine's hostname.
        name: String,
        by_hostname: bool,
        /// The node names the file does define.
        nodes: Vec<String>,
    },
}

impl ConfigError {
    /// The 1-based line in the file the error points at, when it points inside the file.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Syntax { line, .. } | Self::Schema { line, .. } | Self::Invalid { line, .. } => Some(*line),
            _ => None,
        }
    }

    /// The dotted key the error is about (`net.ping-timeout`, `node[1].address`), if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Syntax { key, .. } => key.as_deref(),
            Self::Schema { key, .. } | Self::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// "No such file or directory", without the "(os error 2)" that the io::Error adds.
fn os_message(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_string(),
        _ => text,
    }
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default()
}

fn unknown_node(resource: &str, name: &str, by_hostname: bool, nodes: &[String]) -> String {
    let list = nodes.join(", ");
    if by_hostname {
        format!(
            "this machine's hostname {name:?} is not a node of resource {resource} (nodes: {list}); \
             name the node with --node NAME or RDBD_NODE"
        )
    } else {
        format!("resource {resource} has no node named {name:?} (nodes: {list})")
    }
}
