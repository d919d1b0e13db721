//! A bounds-checked big-endian reader over a byte slice.

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("{what} is {len} bytes, more than the limit of {limit}")]
    TooLong { what: &'static str, len: u64, limit: u64 },
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("{0} bytes left over at the end of the message")]
    TrailingBytes(usize),
    #[error("invalid {what}: {value:#x}")]
    Invalid { what: &'static str, value: u64 },
}

/// The longest prefix of `s` that fits in `max` bytes without splitting a character.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends `s` (cut to `max` bytes at a character boundary) with a u16 length.
pub(crate) fn put_str16(out: &mut Vec<u8>, s: &str, max: usize) {
    let s = truncate_utf8(s, max.min(u16::MAX as usize));
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Reads big-endian integers and byte strings from a slice, never past its end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { needed: n - self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string preceded by a u32 length, which must not exceed `limit`.
    pub(crate) fn string32(&mut self, what: &'static str, limit: usize) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        if len > limit {
            return Err(DecodeError::TooLong { what, len: len as u64, limit: limit as u64 });
        }
        std::str::from_utf8(self.bytes(len)?).map_err(|_| DecodeError::NotUtf8(what))
    }

    /// A string preceded by a u16 length, which must not exceed `limit`.
    pub(crate) fn string16(&mut self, what: &'static str, limit: usize) -> Result<&'a str, DecodeError> {
        let len = self.u16()? as usize;
        if len > limit {
            return Err(DecodeError::TooLong { what, len: len as u64, limit: limit as u64 });
        }
        std::str::from_utf8(self.bytes(len)?).map_err(|_| DecodeError::NotUtf8(what))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}
