//! The file as written (every key optional, every value with its byte span) and its validation
//! into the public types. Keeping spans up to validation is what lets a semantic error, such as
//! two nodes with the same address, name the right line.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::locate::{key_at, line_of};
use super::units::{format_duration, format_size, parse_duration, parse_size};
use super::{
    AfterSb0Pri, AfterSb1, AfterSb2, ConfigError, DigestAlg, DiskConfig, HandlersConfig, MetaLocation,
    NbdDevice, NetConfig, NodeConfig, OnIoError, Protocol, ResourceConfig, ResyncConfig, RrConflict,
    AL_EXTENTS_MAX, AL_EXTENTS_MIN, BITMAP_BLOCK_MAX, BITMAP_BLOCK_MIN, C_DELAY_TARGET_MAX,
    C_DELAY_TARGET_MIN, C_FILL_TARGET_MAX, C_PLAN_AHEAD_MAX, DEFAULT_AL_EXTENTS, DEFAULT_BITMAP_BLOCK,
    DEFAULT_CONNECT_INTERVAL, DEFAULT_C_DELAY_TARGET, DEFAULT_C_FILL_TARGET, DEFAULT_C_MAX_RATE,
    DEFAULT_C_MIN_RATE, DEFAULT_C_PLAN_AHEAD, DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT,
    DEFAULT_RESYNC_RATE, DEFAULT_TIMEOUT, RATE_MAX, RATE_MIN, SHARED_SECRET_MAX,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawResource {
    resource: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    net: Option<RawNet>,
    disk: Option<RawDisk>,
    handlers: Option<RawHandlers>,
    ha: Option<super::ha::RawHa>,
    service: Option<Spanned<Vec<Spanned<super::ha::RawService>>>>,
    node: Option<Spanned<Vec<Spanned<RawNode>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNet {
    shared_secret: Option<Spanned<String>>,
    ping_interval: Option<Spanned<String>>,
    ping_timeout: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    connect_interval: Option<Spanned<String>>,
    data_integrity: Option<bool>,
    after_sb_0pri: Option<Spanned<String>>,
    after_sb_1pri: Option<Spanned<String>>,
    after_sb_2pri: Option<Spanned<String>>,
    rr_conflict: Option<Spanned<String>>,
    csums_alg: Option<Spanned<String>>,
    csums_after_crash_only: Option<bool>,
    verify_alg: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDisk {
    /// Signed so that a negative number gets the range message rather than a type error.
    al_extents: Option<Spanned<i64>>,
    bitmap_block: Option<Spanned<SizeValue>>,
    resync_rate: Option<Spanned<RateValue>>,
    c_plan_ahead: Option<Spanned<String>>,
    c_fill_target: Option<Spanned<SizeValue>>,
    c_delay_target: Option<Spanned<String>>,
    c_max_rate: Option<Spanned<RateValue>>,
    c_min_rate: Option<Spanned<RateValue>>,
    on_io_error: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawHandlers {
    split_brain: Option<Spanned<String>>,
    pri_lost_after_sb: Option<Spanned<String>>,
    pri_lost: Option<Spanned<String>>,
    out_of_sync: Option<Spanned<String>>,
    local_io_error: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    meta_disk: Option<Spanned<String>>,
    nbd_listen: Option<Spanned<String>>,
    nbd_device: Option<Spanned<String>>,
    heartbeat_address: Option<Spanned<String>>,
}

/// A size written as a string with a unit ("4KiB") or as a plain number of bytes.
enum SizeValue {
    Text(String),
    Bytes(i64),
}

/// A rate in bytes per second, written like a size ("100MiB", optionally "100MiB/s") or as a
/// plain number. Its own type so that a type error says "rate", not "size".
struct RateValue(SizeValue);

/// Reads a [`SizeValue`]; `.0` is what a type error says was expected.
struct SizeVisitor(&'static str);

impl serde::de::Visitor<'_> for SizeVisitor {
    type Value = SizeValue;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E>(self, v: &str) -> Result<SizeValue, E> {
        Ok(SizeValue::Text(v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<SizeValue, E> {
        Ok(SizeValue::Bytes(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SizeValue, E> {
        i64::try_from(v).map(SizeValue::Bytes).map_err(|_| E::custom("size too large"))
    }
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor("a size like \"4KiB\" or a number of bytes"))
    }
}

impl<'de> Deserialize<'de> for RateValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(SizeVisitor(
                "a rate like \"100MiB\" (per second) or a number of bytes per second",
            ))
            .map(RateValue)
    }
}

/// The file being parsed, to turn spans into `file:line: key:` errors.
pub(super) struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    pub(super) fn invalid(
        &self,
        span: &Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: self.line(span),
            key: key.into(),
            message: message.into(),
        }
    }

    pub(super) fn missing(&self, span: &Range<usize>, key: String, what: &str) -> ConfigError {
        ConfigError::Schema {
            file: self.file.to_path_buf(),
            line: self.line(span),
            key,
            message: format!("missing; {what}"),
        }
    }

    fn syntax(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::Syntax {
            file: self.file.to_path_buf(),
            line: line_of(self.text, offset),
            key: key_at(self.text, offset),
            message: format!("invalid TOML: {}", e.message().trim_end()),
        }
    }

    fn schema(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::Schema {
            file: self.file.to_path_buf(),
            line: line_of(self.text, offset),
            key: key_at(self.text, offset).unwrap_or_else(|| "(top level)".to_string()),
            message: schema_message(e.message()),
        }
    }
}

/// Rewords serde's messages in this file's terms: keys rather than fields, tables rather than
/// the names of private structs.
fn schema_message(message: &str) -> String {
    let message = message.trim_end();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((_, expected)) = rest.split_once("`, ") {
            return format!("unknown key, {expected}");
        }
        return "unknown key".to_string();
    }
    if let Some(at) = message.find("expected struct ") {
        return format!("{}expected a table", &message[..at]);
    }
    message
        .replace("expected a sequence", "expected an array of tables ([[node]])")
        .replace("expected i64", "expected an integer")
}

pub(super) fn parse(file: &Path, text: &str) -> Result<ResourceConfig, ConfigError> {
    let source = Source { file, text };
    // Syntax first, so that whatever serde reports afterwards is about the schema.
    toml::de::DeTable::parse(text).map_err(|e| source.syntax(&e))?;
    let raw: RawResource = toml::from_str(text).map_err(|e| source.schema(&e))?;
    build(&source, raw)
}

/// Why `name` is not a usable resource name, if it is not.
pub(super) fn resource_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".to_string());
    }
    if name.starts_with(['.', '-']) {
        return Some("it must not start with '.' or '-'".to_string());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
        return Some("use letters, digits, '.', '-' and '_'".to_string());
    }
    None
}

fn build(src: &Source, raw: RawResource) -> Result<ResourceConfig, ConfigError> {
    let name = resource_name(src, raw.resource.as_ref())?;
    let protocol = match &raw.protocol {
        None => Protocol::default(),
        Some(p) => match p.get_ref().as_str() {
            "A" => Protocol::A,
            "B" => Protocol::B,
            "C" => Protocol::C,
            other => {
                return Err(src.invalid(
                    &p.span(),
                    "protocol",
                    format!("invalid protocol {other:?}, expected A, B or C"),
                ))
            }
        },
    };
    let ping_interval_given = raw.net.as_ref().is_some_and(|n| n.ping_interval.is_some());
    let (mut net, discard_node_span) = build_net(src, raw.net)?;
    let on_io_error_span = raw.disk.as_ref().and_then(|d| d.on_io_error.as_ref()).map(|v| v.span());
    let disk = build_disk(src, raw.disk)?;
    let handlers = build_handlers(src, raw.handlers)?;
    if let Some(span) = on_io_error_span.filter(|_| disk.on_io_error == OnIoError::CallLocalIoError) {
        if handlers.local_io_error.is_none() {
            return Err(src.invalid(
                &span,
                "disk.on-io-error",
                "call-local-io-error needs a command in handlers.local-io-error",
            ));
        }
    }
    let (nodes, heartbeat_span) = build_nodes(src, raw.node)?;
    if let (AfterSb0Pri::DiscardNode(victim), Some(span)) = (&net.after_sb_0pri, discard_node_span) {
        check_discard_node(src, &span, victim, &nodes)?;
    }
    let ha = super::ha::build_ha(src, raw.ha, raw.service, &nodes)?;
    if let Some(span) = heartbeat_span {
        // Only the supervisor listens, and a datagram that makes a node outdate itself must be signed.
        let problem = if ha.is_none() {
            Some("needs an [ha] table: the HA supervisor runs the second heartbeat path")
        } else if net.shared_secret.is_none() {
            Some("needs net.shared-secret: heartbeats are signed with it")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(src.invalid(&span, "node[0].heartbeat-address", problem));
        }
    }
    if ha.is_some() && !ping_interval_given {
        // A supervisor takes over on a dead link: it must notice within seconds, not tens.
        net.ping_interval = super::ha::HA_PING_INTERVAL;
    }
    Ok(ResourceConfig { name, file: src.file.to_path_buf(), protocol, net, disk, handlers, ha, nodes })
}

/// The file stem names the resource; a `resource` key, when present, must agree with it so a
/// copied file cannot silently configure the wrong resource.
fn resource_name(src: &Source, key: Option<&Spanned<String>>) -> Result<String, ConfigError> {
    let stem = src.file.file_stem().map(|s| s.to_string_lossy().into_owned());
    match (key, stem) {
        (Some(given), stem) => {
            let span = given.span();
            let given = given.get_ref();
            if let Some(problem) = resource_name_problem(given) {
                return Err(src.invalid(
                    &span,
                    "resource",
                    format!("invalid resource name {given:?}: {problem}"),
                ));
            }
            match stem {
                Some(stem) if stem != *given => Err(src.invalid(
                    &span,
                    "resource",
                    format!("{given:?} does not match the file name (expected {stem:?})"),
                )),
                _ => Ok(given.clone()),
            }
        }
        (None, Some(stem)) => {
            super::check_resource_name(&stem)?;
            Ok(stem)
        }
        (None, None) => Err(ConfigError::ResourceName {
            name: String::new(),
            reason: format!("{} has no file name and the file has no `resource` key", src.file.display()),
        }),
    }
}

/// A duration key: (value, span if it was written).
pub(super) fn duration(
    src: &Source,
    value: Option<Spanned<String>>,
    key: &str,
    default: Duration,
    range: (Duration, Duration),
) -> Result<(Duration, Option<Range<usize>>), ConfigError> {
    let Some(value) = value else { return Ok((default, None)) };
    let span = value.span();
    let text = value.into_inner();
    let Some(d) = parse_duration(&text) else {
        return Err(src.invalid(
            &span,
            key,
            format!("invalid duration {text:?}: write a whole number and a unit (ms, s, m, h), like \"500ms\" or \"10s\""),
        ));
    };
    let (min, max) = range;
    if d < min || d > max {
        return Err(src.invalid(
            &span,
            key,
            format!("{text} is out of range: must be {} to {}", format_duration(min), format_duration(max)),
        ));
    }
    Ok((d, Some(span)))
}

/// Timer ranges: DRBD's upper limits; the lower limits are relaxed from DRBD's 1 s for
/// ping-interval and connect-interval so that tests can run with short timers.
const PING_INTERVAL_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(120));
const PING_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(60));
const CONNECT_INTERVAL_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(120));

/// The `[net]` table, and the span of an `after-sb-0pri = "discard-node-NAME"`, whose name can
/// only be checked once the nodes are known.
fn build_net(src: &Source, raw: Option<RawNet>) -> Result<(NetConfig, Option<Range<usize>>), ConfigError> {
    let Some(raw) = raw else { return Ok((NetConfig::default(), None)) };
    let shared_secret = match raw.shared_secret {
        None => None,
        Some(secret) => {
            let span = secret.span();
            let secret = secret.into_inner();
            if secret.is_empty() {
                return Err(src.invalid(
                    &span,
                    "net.shared-secret",
                    "empty; remove the key to turn authentication off",
                ));
            }
            if secret.len() > SHARED_SECRET_MAX {
                return Err(src.invalid(
                    &span,
                    "net.shared-secret",
                    format!("{} bytes long, at most {SHARED_SECRET_MAX} allowed", secret.len()),
                ));
            }
            Some(secret)
        }
    };
    let (ping_interval, _) =
        duration(src, raw.ping_interval, "net.ping-interval", DEFAULT_PING_INTERVAL, PING_INTERVAL_RANGE)?;
    let (ping_timeout, ping_timeout_span) =
        duration(src, raw.ping_timeout, "net.ping-timeout", DEFAULT_PING_TIMEOUT, PING_TIMEOUT_RANGE)?;
    let (timeout, timeout_span) = duration(src, raw.timeout, "net.timeout", DEFAULT_TIMEOUT, TIMEOUT_RANGE)?;
    let (connect_interval, _) = duration(
        src,
        raw.connect_interval,
        "net.connect-interval",
        DEFAULT_CONNECT_INTERVAL,
        CONNECT_INTERVAL_RANGE,
    )?;
    // A ping answer that may take longer than any other answer would make the ping useless.
    if ping_timeout >= timeout {
        let message = format!(
            "ping-timeout ({}) must be shorter than timeout ({})",
            format_duration(ping_timeout),
            format_duration(timeout)
        );
        // Point at whichever of the two was written (ping-timeout if both were).
        let (span, key) = match (ping_timeout_span, timeout_span) {
            (None, Some(span)) => (span, "net.timeout"),
            (span, _) => (span.unwrap_or_default(), "net.ping-timeout"),
        };
        return Err(src.invalid(&span, key, message));
    }
    let discard_node_span = raw.after_sb_0pri.as_ref().map(Spanned::span);
    let after_sb_0pri = after_sb_0pri(src, raw.after_sb_0pri)?;
    let discard_node_span =
        discard_node_span.filter(|_| matches!(after_sb_0pri, AfterSb0Pri::DiscardNode(_)));
    let defaults = NetConfig::default();
    let net = NetConfig {
        shared_secret,
        ping_interval,
        ping_timeout,
        timeout,
        connect_interval,
        data_integrity: raw.data_integrity.unwrap_or(defaults.data_integrity),
        after_sb_0pri,
        after_sb_1pri: choice(
            src,
            raw.after_sb_1pri,
            "net.after-sb-1pri",
            AfterSb1::ALL,
            defaults.after_sb_1pri,
        )?,
        after_sb_2pri: choice(
            src,
            raw.after_sb_2pri,
            "net.after-sb-2pri",
            AfterSb2::ALL,
            defaults.after_sb_2pri,
        )?,
        rr_conflict: choice(src, raw.rr_conflict, "net.rr-conflict", RrConflict::ALL, defaults.rr_conflict)?,
        csums_alg: match raw.csums_alg {
            None => defaults.csums_alg,
            Some(alg) => Some(choice(src, Some(alg), "net.csums-alg", DigestAlg::ALL, DigestAlg::default())?),
        },
        csums_after_crash_only: raw.csums_after_crash_only.unwrap_or(defaults.csums_after_crash_only),
        verify_alg: choice(src, raw.verify_alg, "net.verify-alg", DigestAlg::ALL, defaults.verify_alg)?,
    };
    Ok((net, discard_node_span))
}

/// One of a fixed set of spellings (`as_str` of the values in `all`).
pub(super) fn choice<T: Copy + std::fmt::Display>(
    src: &Source,
    value: Option<Spanned<String>>,
    key: &str,
    all: &[T],
    default: T,
) -> Result<T, ConfigError> {
    let Some(value) = value else { return Ok(default) };
    let text = value.get_ref();
    all.iter().copied().find(|v| v.to_string() == *text).ok_or_else(|| {
        let names: Vec<String> = all.iter().map(T::to_string).collect();
        src.invalid(
            &value.span(),
            key,
            format!("invalid value {text:?}, expected one of: {}", names.join(", ")),
        )
    })
}

fn after_sb_0pri(src: &Source, value: Option<Spanned<String>>) -> Result<AfterSb0Pri, ConfigError> {
    const KEY: &str = "net.after-sb-0pri";
    let Some(value) = value else { return Ok(AfterSb0Pri::default()) };
    let text = value.get_ref().as_str();
    Ok(match text {
        "disconnect" => AfterSb0Pri::Disconnect,
        "discard-younger-primary" => AfterSb0Pri::DiscardYoungerPrimary,
        "discard-older-primary" => AfterSb0Pri::DiscardOlderPrimary,
        "discard-zero-changes" => AfterSb0Pri::DiscardZeroChanges,
        "discard-least-changes" => AfterSb0Pri::DiscardLeastChanges,
        _ => match text.strip_prefix(AfterSb0Pri::DISCARD_NODE_PREFIX) {
            Some("") => {
                return Err(src.invalid(&value.span(), KEY, "discard-node- must be followed by a node name"))
            }
            Some(node) => AfterSb0Pri::DiscardNode(node.to_string()),
            None => {
                return Err(src.invalid(
                    &value.span(),
                    KEY,
                    format!("invalid value {text:?}, expected one of: {}", AfterSb0Pri::NAMES.join(", ")),
                ))
            }
        },
    })
}

/// `discard-node-NAME` must name one of the two nodes: a typo would otherwise silently leave
/// split brains unresolved.
fn check_discard_node(
    src: &Source,
    span: &Range<usize>,
    victim: &str,
    nodes: &[NodeConfig; 2],
) -> Result<(), ConfigError> {
    if nodes.iter().any(|n| n.name == victim) {
        return Ok(());
    }
    Err(src.invalid(
        span,
        "net.after-sb-0pri",
        format!(
            "discard-node-{victim}: {victim:?} is not a node of this resource (nodes: {}, {})",
            nodes[0].name, nodes[1].name
        ),
    ))
}

fn build_disk(src: &Source, raw: Option<RawDisk>) -> Result<DiskConfig, ConfigError> {
    let Some(raw) = raw else { return Ok(DiskConfig::default()) };
    let al_extents = match raw.al_extents {
        None => DEFAULT_AL_EXTENTS,
        Some(n) => {
            let span = n.span();
            let n = *n.get_ref();
            match u32::try_from(n) {
                Ok(n) if (AL_EXTENTS_MIN..=AL_EXTENTS_MAX).contains(&n) => n,
                _ => {
                    return Err(src.invalid(
                        &span,
                        "disk.al-extents",
                        format!("{n} is out of range: must be {AL_EXTENTS_MIN} to {AL_EXTENTS_MAX}"),
                    ))
                }
            }
        }
    };
    let bitmap_block = match raw.bitmap_block {
        None => DEFAULT_BITMAP_BLOCK,
        Some(size) => {
            let span = size.span();
            let bytes = match size.into_inner() {
                SizeValue::Text(text) => parse_size(&text).ok_or_else(|| {
                    src.invalid(
                        &span,
                        "disk.bitmap-block",
                        format!("invalid size {text:?}, expected e.g. \"4KiB\""),
                    )
                })?,
                SizeValue::Bytes(n) => u64::try_from(n).unwrap_or(0),
            };
            if !bytes.is_power_of_two() || !(BITMAP_BLOCK_MIN..=BITMAP_BLOCK_MAX).contains(&bytes) {
                return Err(src.invalid(
                    &span,
                    "disk.bitmap-block",
                    format!(
                        "{bytes} bytes: must be a power of two from {} to {}",
                        format_size(BITMAP_BLOCK_MIN),
                        format_size(BITMAP_BLOCK_MAX)
                    ),
                ));
            }
            bytes
        }
    };
    let (c_plan_ahead, _) = duration(
        src,
        raw.c_plan_ahead,
        "disk.c-plan-ahead",
        DEFAULT_C_PLAN_AHEAD,
        (Duration::ZERO, C_PLAN_AHEAD_MAX),
    )?;
    let (c_delay_target, _) = duration(
        src,
        raw.c_delay_target,
        "disk.c-delay-target",
        DEFAULT_C_DELAY_TARGET,
        (C_DELAY_TARGET_MIN, C_DELAY_TARGET_MAX),
    )?;
    const RATE: Limits = Limits { min: RATE_MIN, max: RATE_MAX, zero: None, per_second: true };
    const RATE_OR_ZERO: Limits = Limits { zero: Some("0"), ..RATE };
    let resync = ResyncConfig {
        resync_rate: bytes(src, raw.resync_rate.map(rate), "disk.resync-rate", DEFAULT_RESYNC_RATE, RATE)?,
        c_plan_ahead,
        c_fill_target: bytes(
            src,
            raw.c_fill_target,
            "disk.c-fill-target",
            DEFAULT_C_FILL_TARGET,
            Limits { min: 0, max: C_FILL_TARGET_MAX, zero: None, per_second: false },
        )?,
        c_delay_target,
        c_max_rate: bytes(
            src,
            raw.c_max_rate.map(rate),
            "disk.c-max-rate",
            DEFAULT_C_MAX_RATE,
            RATE_OR_ZERO,
        )?,
        c_min_rate: bytes(
            src,
            raw.c_min_rate.map(rate),
            "disk.c-min-rate",
            DEFAULT_C_MIN_RATE,
            RATE_OR_ZERO,
        )?,
    };
    let on_io_error = choice(src, raw.on_io_error, "disk.on-io-error", OnIoError::ALL, OnIoError::default())?;
    Ok(DiskConfig { al_extents, bitmap_block, resync, on_io_error })
}

fn rate(value: Spanned<RateValue>) -> Spanned<SizeValue> {
    let span = value.span();
    Spanned::new(span, value.into_inner().0)
}

/// The values a size or rate key accepts.
struct Limits {
    min: u64,
    max: u64,
    /// 0 is accepted too, outside `min..=max` (it means "no limit"); the text shown for it.
    zero: Option<&'static str>,
    /// A rate: "/s" may follow the unit, and messages say "rate".
    per_second: bool,
}

/// A size or rate key, in bytes (per second).
fn bytes(
    src: &Source,
    value: Option<Spanned<SizeValue>>,
    key: &str,
    default: u64,
    limits: Limits,
) -> Result<u64, ConfigError> {
    let Some(value) = value else { return Ok(default) };
    let span = value.span();
    let (shown, parsed) = match value.into_inner() {
        SizeValue::Text(text) => {
            let number = if limits.per_second { text.strip_suffix("/s").unwrap_or(&text) } else { &text };
            let Some(n) = parse_size(number) else {
                let message = if limits.per_second {
                    format!("invalid rate {text:?}, expected bytes per second like \"100MiB\" or \"250KiB\"")
                } else {
                    format!("invalid size {text:?}, expected e.g. \"32MiB\"")
                };
                return Err(src.invalid(&span, key, message));
            };
            (text, Some(n))
        }
        SizeValue::Bytes(n) => (n.to_string(), u64::try_from(n).ok()),
    };
    match parsed {
        Some(0) if limits.zero.is_some() => Ok(0),
        Some(n) if (limits.min..=limits.max).contains(&n) => Ok(n),
        _ => {
            let range = format!("{} to {}", format_size_or_zero(limits.min), format_size(limits.max));
            let allowed = match limits.zero {
                Some(zero) => format!("{zero} or {range}"),
                None => range,
            };
            let unit = if limits.per_second { " per second" } else { "" };
            Err(src.invalid(&span, key, format!("{shown} is out of range: must be {allowed}{unit}")))
        }
    }
}

fn format_size_or_zero(bytes: u64) -> String {
    if bytes == 0 {
        "0".to_string()
    } else {
        format_size(bytes)
    }
}

/// A text key that must say something: not blank, and without a NUL byte (exec cannot pass
/// one; refusing it here beats a failure at the worst moment). `blank` says what to do instead.
pub(super) fn text(
    src: &Source,
    value: Spanned<String>,
    key: &str,
    blank: &str,
) -> Result<String, ConfigError> {
    let t = value.get_ref();
    if t.trim().is_empty() {
        return Err(src.invalid(&value.span(), key, format!("empty; {blank}")));
    }
    if t.contains('\0') {
        return Err(src.invalid(&value.span(), key, "contains a NUL character"));
    }
    Ok(value.into_inner())
}

fn build_handlers(src: &Source, raw: Option<RawHandlers>) -> Result<HandlersConfig, ConfigError> {
    let Some(raw) = raw else { return Ok(HandlersConfig::default()) };
    let command = |value: Option<Spanned<String>>, key: &str| -> Result<Option<String>, ConfigError> {
        value.map(|v| text(src, v, key, "remove the key to run nothing")).transpose()
    };
    Ok(HandlersConfig {
        split_brain: command(raw.split_brain, "handlers.split-brain")?,
        pri_lost_after_sb: command(raw.pri_lost_after_sb, "handlers.pri-lost-after-sb")?,
        pri_lost: command(raw.pri_lost, "handlers.pri-lost")?,
        out_of_sync: command(raw.out_of_sync, "handlers.out-of-sync")?,
        local_io_error: command(raw.local_io_error, "handlers.local-io-error")?,
    })
}

fn build_nodes(
    src: &Source,
    raw: Option<Spanned<Vec<Spanned<RawNode>>>>,
) -> Result<([NodeConfig; 2], Option<Range<usize>>), ConfigError> {
    const HOW: &str = "a resource has exactly two [[node]] tables";
    let Some(raw) = raw else {
        return Err(src.missing(&(0..0), "node".to_string(), HOW));
    };
    let list_span = raw.span();
    let [first, second]: [Spanned<RawNode>; 2] =
        raw.into_inner().try_into().map_err(|list: Vec<Spanned<RawNode>>| {
            // Point at the first node too many, or at the list when there are too few.
            let span = list.get(2).map_or(list_span, |n| n.span());
            src.invalid(&span, "node", format!("{HOW}, found {}", list.len()))
        })?;
    let (a, a_spans) = build_node(src, 0, first)?;
    let (b, b_spans) = build_node(src, 1, second)?;
    if a.name == b.name {
        return Err(src.invalid(&b_spans.name, "node[1].name", format!("both nodes are named {:?}", a.name)));
    }
    if a.address == b.address {
        return Err(src.invalid(
            &b_spans.address,
            "node[1].address",
            format!("both nodes have the address {:?}", a.address),
        ));
    }
    // The second path joins both nodes, or it is not there.
    match (&a_spans.heartbeat, &b_spans.heartbeat) {
        (Some(_), None) => {
            return Err(src.missing(&b_spans.node, "node[1].heartbeat-address".into(), "node[0] has one"))
        }
        (None, Some(_)) => {
            return Err(src.missing(&a_spans.node, "node[0].heartbeat-address".into(), "node[1] has one"))
        }
        _ => {}
    }
    if a.heartbeat_address.is_some() && a.heartbeat_address == b.heartbeat_address {
        let span = b_spans.heartbeat.clone().unwrap_or(b_spans.node);
        return Err(src.invalid(
            &span,
            "node[1].heartbeat-address",
            "both nodes have the same heartbeat address",
        ));
    }
    Ok(([a, b], a_spans.heartbeat))
}

/// Where a node's table and some of its keys are, for the checks across nodes.
struct NodeSpans {
    node: Range<usize>,
    name: Range<usize>,
    address: Range<usize>,
    heartbeat: Option<Range<usize>>,
}

/// One node, and where its keys are for the cross-node checks.
fn build_node(
    src: &Source,
    index: usize,
    raw: Spanned<RawNode>,
) -> Result<(NodeConfig, NodeSpans), ConfigError> {
    let node_span = raw.span();
    let raw = raw.into_inner();
    let key = |field: &str| format!("node[{index}].{field}");
    let required = |value: Option<Spanned<String>>, field: &str, what: &str| {
        value.ok_or_else(|| src.missing(&node_span, key(field), what))
    };
    let name = required(raw.name, "name", "each node needs the name it is known by (normally its hostname)")?;
    let address = required(raw.address, "address", "each node needs its replication address, host:port")?;
    let disk = required(raw.disk, "disk", "each node needs its backing disk or file, an absolute path")?;
    let (name_span, address_span) = (name.span(), address.span());

    if let Some(problem) = node_name_problem(name.get_ref()) {
        return Err(src.invalid(
            &name_span,
            key("name"),
            format!("invalid node name {:?}: {problem}", name.get_ref()),
        ));
    }
    if let Some(problem) = host_port_problem(address.get_ref()) {
        return Err(src.invalid(
            &address_span,
            key("address"),
            format!("{:?}: {problem}", address.get_ref()),
        ));
    }
    let disk_path = absolute_path(src, &disk, &key("disk"))?;
    let meta_disk = match raw.meta_disk {
        None => MetaLocation::Internal,
        Some(meta) if meta.get_ref() == "internal" => MetaLocation::Internal,
        Some(meta) => {
            let path = absolute_path(src, &meta, &key("meta-disk"))?;
            if path == disk_path {
                return Err(src.invalid(
                    &meta.span(),
                    key("meta-disk"),
                    "is the backing disk itself; write \"internal\" to keep metadata on it",
                ));
            }
            MetaLocation::External(path)
        }
    };
    let nbd_listen = match raw.nbd_listen {
        None => None,
        Some(listen) => {
            if let Some(problem) = host_port_problem(listen.get_ref()) {
                return Err(src.invalid(
                    &listen.span(),
                    key("nbd-listen"),
                    format!("{:?}: {problem}", listen.get_ref()),
                ));
            }
            Some(listen.into_inner())
        }
    };
    let nbd_device = match raw.nbd_device {
        None => None,
        Some(dev) if dev.get_ref() == "auto" => Some(NbdDevice::Auto),
        Some(dev) => Some(NbdDevice::Path(absolute_path(src, &dev, &key("nbd-device"))?)),
    };
    let heartbeat_address = match raw.heartbeat_address {
        None => None,
        Some(hb) => {
            let problem = host_port_problem(hb.get_ref()).map(str::to_string).or_else(|| {
                (hb.get_ref() == address.get_ref())
                    .then(|| "is the replication address; the second path needs another one".to_string())
            });
            if let Some(problem) = problem {
                return Err(src.invalid(
                    &hb.span(),
                    key("heartbeat-address"),
                    format!("{:?}: {problem}", hb.get_ref()),
                ));
            }
            Some(hb)
        }
    };
    let heartbeat_span = heartbeat_address.as_ref().map(|h| h.span());
    let config = NodeConfig {
        name: name.into_inner(),
        address: address.into_inner(),
        disk: disk_path,
        meta_disk,
        nbd_listen,
        nbd_device,
        heartbeat_address: heartbeat_address.map(Spanned::into_inner),
    };
    Ok((
        config,
        NodeSpans { node: node_span, name: name_span, address: address_span, heartbeat: heartbeat_span },
    ))
}

/// Paths must be absolute: a daemon's working directory is not something to depend on.
fn absolute_path(src: &Source, value: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
    let text = value.get_ref();
    if !text.starts_with('/') {
        return Err(src.invalid(&value.span(), key, format!("{text:?} is not an absolute path")));
    }
    Ok(PathBuf::from(text))
}

/// Node names are hostnames or hostname-like labels.
fn node_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > 64 {
        return Some("longer than 64 bytes");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
        return Some("use letters, digits, '.', '-' and '_'");
    }
    None
}

/// Checks `host:port` without resolving the host (that happens when connecting, and may
/// legitimately fail at load time): a non-empty host, IPv6 in brackets, a port from 1 to 65535.
fn host_port_problem(text: &str) -> Option<&'static str> {
    const FORMAT: &str = "expected host:port, like \"192.168.10.1:7789\" or \"[fd00::1]:7789\"";
    if text.parse::<std::net::SocketAddr>().is_ok() {
        return if text.ends_with(":0") { Some("port 0 is not allowed") } else { None };
    }
    let Some((host, port)) = text.rsplit_once(':') else { return Some(FORMAT) };
    if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
        return Some(FORMAT);
    }
    if host.starts_with('[') {
        return Some("invalid IPv6 address");
    }
    match port.parse::<u16>() {
        Ok(0) => Some("port 0 is not allowed"),
        Ok(_) => None,
        Err(_) => Some(FORMAT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports() {
        for ok in ["192.168.10.1:7789", "[fd00::1]:7789", "alpha:7789", "alpha.example.com:1"] {
            assert_eq!(host_port_problem(ok), None, "{ok}");
        }
        for bad in [
            "alpha",
            ":7789",
            "alpha:",
            "alpha:0",
            "alpha:65536",
            "fd00::1:7789",
            "[zz]:1",
            "a b:1",
            "1.2.3.4:0",
        ] {
            assert!(host_port_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn messages() {
        assert_eq!(
            schema_message("unknown field `foo`, expected `timeout` or `data-integrity`"),
            "unknown key, expected `timeout` or `data-integrity`"
        );
        assert_eq!(
            schema_message("invalid type: integer `5`, expected struct RawNet"),
            "invalid type: integer `5`, expected a table"
        );
    }
}
