//! Fixed-newstyle option haggling, from the greeting to the start of transmission.

use std::sync::Arc;

use rdbd_protocol::nbd::{
    client_flags, encode_export_name_reply, encode_greeting, encode_option_reply, encode_server_entry,
    handshake_flags, info, opt, rep, InfoReply, InfoRequest, MetaContextReply, MetaContextRequest,
    OptionHeader, BASE_ALLOCATION,
};
use rdbd_protocol::{nbd::decode_export_name, DecodeError};
use tracing::debug;

use super::export::{Export, Exports};
use super::socket::Socket;

/// Options longer than this are not read into memory: they are skipped and refused.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The id under which `base:allocation` is reported in block status replies.
pub const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What the client and server agreed on for the transmission phase.
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    /// Set when the client selected `base:allocation`; its context id.
    pub allocation_context: Option<u32>,
}

impl Negotiated {
    /// The settings of a socket handed to the kernel: no handshake, simple replies only.
    pub fn without_handshake(export: Arc<Export>) -> Self {
        Self { export, structured: false, allocation_context: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent unknown flags {0:#x}")]
    ClientFlags(u32),
    #[error("malformed option: {0}")]
    Decode(#[from] DecodeError),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME of {0} bytes is too long")]
    ExportNameTooLong(u32),
}

/// Runs the handshake. `Ok(None)` means the client ended it (ABORT or a clean close).
pub async fn negotiate(sock: &Socket, exports: &Exports) -> Result<Option<Negotiated>, HandshakeError> {
    sock.write_all(&encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES)).await?;
    let mut flags = [0u8; 4];
    sock.read_exact(&mut flags).await?;
    let flags = u32::from_be_bytes(flags);
    if flags & !client_flags::KNOWN != 0 {
        return Err(HandshakeError::ClientFlags(flags));
    }
    let no_zeroes = flags & client_flags::NO_ZEROES != 0;
    let mut state = Haggle { exports, structured: false, selected: None, out: Vec::with_capacity(256) };

    loop {
        let mut header = [0u8; OptionHeader::LEN];
        match sock.read_exact(&mut header).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let OptionHeader { option, length } = OptionHeader::decode(&header)?;
        if length > MAX_OPTION_LEN {
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::ExportNameTooLong(length));
            }
            sock.discard(length.into()).await?;
            let reply = if is_known(option) { rep::ERR_TOO_BIG } else { rep::ERR_UNSUP };
            state.reply_error(option, reply, "option too long");
            sock.write_all(&state.take_output()).await?;
            continue;
        }
        let mut payload = vec![0u8; length as usize];
        sock.read_exact(&mut payload).await?;
        debug!(option, length, "option");

        let outcome = state.handle(option, &payload, no_zeroes)?;
        sock.write_all(&state.take_output()).await?;
        match outcome {
            Next::Continue => {}
            Next::Abort => return Ok(None),
            Next::Transmission(negotiated) => return Ok(Some(negotiated)),
        }
    }
}

fn is_known(option: u32) -> bool {
    matches!(
        option,
        opt::EXPORT_NAME
            | opt::ABORT
            | opt::LIST
            | opt::STARTTLS
            | opt::INFO
            | opt::GO
            | opt::STRUCTURED_REPLY
            | opt::LIST_META_CONTEXT
            | opt::SET_META_CONTEXT
    )
}

enum Next {
    Continue,
    Abort,
    Transmission(Negotiated),
}

/// Option-haggling state. Replies accumulate in `out` and are sent after each option.
struct Haggle<'a> {
    exports: &'a Exports,
    structured: bool,
    /// Export name and whether `base:allocation` was selected, from the last SET_META_CONTEXT.
    selected: Option<(String, bool)>,
    out: Vec<u8>,
}

impl Haggle<'_> {
    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) {
        encode_option_reply(&mut self.out, option, reply_type, payload);
    }

    fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) {
        self.reply(option, reply_type, message.as_bytes());
    }

    fn handle(&mut self, option: u32, payload: &[u8], no_zeroes: bool) -> Result<Next, HandshakeError> {
        match option {
            opt::EXPORT_NAME => {
                // This option cannot carry an error: an unknown export ends the session.
                let name = decode_export_name(payload)?;
                let export =
                    self.exports.find(name).ok_or_else(|| HandshakeError::UnknownExport(name.into()))?;
                let flags = export.transmission_flags(self.structured);
                self.out.extend_from_slice(&encode_export_name_reply(export.size(), flags, no_zeroes));
                return Ok(Next::Transmission(self.finish(export.clone(), name)));
            }
            opt::ABORT => {
                self.reply(option, rep::ACK, &[]);
                return Ok(Next::Abort);
            }
            opt::LIST => {
                if !payload.is_empty() {
                    self.reply_error(option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    for export in self.exports.iter() {
                        let entry = encode_server_entry(&export.name, &export.description);
                        self.reply(option, rep::SERVER, &entry);
                    }
                    self.reply(option, rep::ACK, &[]);
                }
            }
            opt::STARTTLS => {
                let reply = if payload.is_empty() { rep::ERR_POLICY } else { rep::ERR_INVALID };
                self.reply_error(option, reply, "TLS is not supported by this server");
            }
            opt::INFO | opt::GO => return self.info_or_go(option, payload),
            opt::STRUCTURED_REPLY => {
                if payload.is_empty() {
                    self.structured = true;
                    self.reply(option, rep::ACK, &[]);
                } else {
                    self.reply_error(option, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, payload),
            _ => self.reply_error(option, rep::ERR_UNSUP, "option not supported"),
        }
        Ok(Next::Continue)
    }

    fn info_or_go(&mut self, option: u32, payload: &[u8]) -> Result<Next, HandshakeError> {
        let request = match InfoRequest::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(option, rep::ERR_INVALID, &e.to_string());
                return Ok(Next::Continue);
            }
        };
        let Some(export) = self.exports.find(request.name).cloned() else {
            self.reply_error(option, rep::ERR_UNKNOWN, "no such export");
            return Ok(Next::Continue);
        };
        let flags = export.transmission_flags(self.structured);
        let mut replies = vec![InfoReply::Export { size: export.size(), flags }.encode()];
        let mut sent = [false; 4];
        for kind in request.requests() {
            let reply = match kind {
                info::NAME => InfoReply::Name(&export.name),
                info::DESCRIPTION => InfoReply::Description(&export.description),
                info::BLOCK_SIZE => {
                    let (minimum, preferred, maximum) = export.block_sizes();
                    InfoReply::BlockSize { minimum, preferred, maximum }
                }
                _ => continue, // unknown or already-sent (EXPORT) information is ignored
            };
            if !std::mem::replace(&mut sent[kind as usize], true) {
                replies.push(reply.encode());
            }
        }
        for r in &replies {
            self.reply(option, rep::INFO, r);
        }
        self.reply(option, rep::ACK, &[]);
        if option == opt::GO {
            Ok(Next::Transmission(self.finish(export, request.name)))
        } else {
            Ok(Next::Continue)
        }
    }

    fn meta_context(&mut self, option: u32, payload: &[u8]) {
        if !self.structured {
            self.reply_error(option, rep::ERR_INVALID, "negotiate structured replies first");
            return;
        }
        let request = match MetaContextRequest::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.reply_error(option, rep::ERR_INVALID, &e.to_string());
                return;
            }
        };
        if self.exports.find(request.export).is_none() {
            self.reply_error(option, rep::ERR_UNKNOWN, "no such export");
            return;
        }
        let listing = option == opt::LIST_META_CONTEXT;
        // LIST with no queries, or a "base:" namespace query, lists every context; SET needs the
        // exact name. Queries in namespaces we do not know select nothing.
        let allocation = if listing && request.query_count() == 0 {
            true
        } else {
            request.queries().any(|q| q == BASE_ALLOCATION || (listing && q == "base:"))
        };
        if allocation {
            let id = if listing { 0 } else { ALLOCATION_CONTEXT_ID };
            self.reply(option, rep::META_CONTEXT, &MetaContextReply { id, name: BASE_ALLOCATION }.encode());
        }
        self.reply(option, rep::ACK, &[]);
        if !listing {
            self.selected = Some((request.export.to_owned(), allocation));
        }
    }

    fn finish(&mut self, export: Arc<Export>, name: &str) -> Negotiated {
        // Contexts selected for a different export name do not carry over.
        let allocation = matches!(&self.selected, Some((n, true)) if n == name);
        Negotiated {
            export,
            structured: self.structured,
            allocation_context: allocation.then_some(ALLOCATION_CONTEXT_ID),
        }
    }
}
