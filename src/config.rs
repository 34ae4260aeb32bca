//! Configuration: the model of [`reliability_core::config`] plus YAML loading.
//!
//! [`from_yaml_str`] and [`from_yaml_file`] read the `reliability:` map of a
//! YAML document (other top-level keys belong to the host and are ignored),
//! then [validate](ReliabilityConfig::validate) it. Every failure is an
//! [`Error::Config`] whose `field` is the dotted path of the offending key,
//! as far as the YAML parser can tell, with the line and column in the
//! message.
//!
//! YAML is read with `serde_norway`, a maintained fork of the archived
//! `serde_yaml`.
//!
//! ```
//! use reliability::config::{from_yaml_str, IdempotencyBackend, Profile};
//! use reliability::Error;
//!
//! let cfg = from_yaml_str("
//! reliability:
//!   profile: baseline
//!   keyPrefix: gateway
//!   spoolLimits: { retention: 3d }
//! ").unwrap();
//! assert_eq!(cfg.profile, Profile::Baseline);
//! assert_eq!(cfg.idempotency_backend(), IdempotencyBackend::Memory);
//!
//! let err = from_yaml_str("reliability: { fallback: { deadline: 250 } }").unwrap_err();
//! assert!(matches!(err, Error::Config { field, .. } if field == "reliability.fallback.deadline"));
//! ```

use std::path::Path;

use serde::{Deserialize, Deserializer};

pub use reliability_core::config::*;
use reliability_core::{Error, Result};

/// The document: `reliability:` and whatever else the host keeps there.
#[derive(Deserialize)]
struct Document {
    #[serde(deserialize_with = "null_is_default")]
    reliability: ReliabilityConfig,
}

/// `reliability:` with no value means all defaults (baseline).
fn null_is_default<'de, D: Deserializer<'de>>(d: D) -> Result<ReliabilityConfig, D::Error> {
    Ok(Option::<ReliabilityConfig>::deserialize(d)?.unwrap_or_default())
}

/// Reads the `reliability:` map of the YAML document `yaml` and validates it.
///
/// # Errors
/// [`Error::Config`] naming the dotted path of the first bad field (or
/// `reliability` when the document itself is not valid YAML or lacks the
/// `reliability` key).
pub fn from_yaml_str(yaml: &str) -> Result<ReliabilityConfig> {
    let doc: Document = serde_norway::from_str(yaml).map_err(yaml_error)?;
    doc.reliability.validate()?;
    Ok(doc.reliability)
}

/// Reads and validates the YAML file at `path`; see [`from_yaml_str`].
///
/// # Errors
/// [`Error::Config`] as for [`from_yaml_str`]; an unreadable file is an
/// [`Error::Config`] with field `reliability` naming the path.
pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<ReliabilityConfig> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(
            "reliability",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    from_yaml_str(&text).map_err(|e| match e {
        Error::Config { field, message } => Error::Config {
            field,
            message: format!("{}: {message}", path.display()),
        },
        other => other,
    })
}

/// Maps a YAML error to [`Error::Config`], recovering the field path.
///
/// serde_norway shows a path only in its `Display` (`a.b.c: message at line
/// L column C`); the path is the text before the first `": "` when that text
/// holds no whitespace (messages such as `invalid type: ...` always do).
fn yaml_error(e: serde_norway::Error) -> Error {
    let text = e.to_string();
    let (path, message) = match text.split_once(": ") {
        Some((p, m))
            if e.location().is_some() && !p.is_empty() && !p.contains(char::is_whitespace) =>
        {
            (p.to_string(), m.to_string())
        }
        _ => (String::new(), text.clone()),
    };
    let mut field = if path.is_empty() || path == "." {
        "reliability".to_string()
    } else {
        path
    };
    // Name the missing or unknown key itself.
    for marker in ["missing field `", "unknown field `"] {
        if let Some(rest) = message.strip_prefix(marker) {
            if let Some((name, _)) = rest.split_once('`') {
                if !field.ends_with(&format!(".{name}")) && field != name {
                    field = format!("{field}.{name}");
                }
            }
        }
    }
    Error::config(field, message)
}
