//! Parsing of Cloud Hypervisor style option strings: `key=value,key=value`,
//! sizes such as `512M`, and on/off switches.

use super::ConfigError;

/// The `key=value` pairs of one flag, checked against the keys it accepts.
#[derive(Debug)]
pub struct OptionList<'a> {
    flag: String,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> OptionList<'a> {
    /// Splits `input` (the value of `--<flag>`) into pairs; every key must be
    /// one of `known` and appear at most once. A bare word (no `=`) is taken
    /// as the value of `bare_key`, when the flag has one.
    pub fn parse(
        flag: impl Into<String>,
        input: &'a str,
        known: &[&str],
        bare_key: Option<&'static str>,
    ) -> Result<Self, ConfigError> {
        let flag = flag.into();
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for item in input.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = match (item.split_once('='), bare_key) {
                (Some((k, v)), _) => (k.trim(), v.trim()),
                (None, Some(k)) => (k, item.trim()),
                (None, None) => {
                    return Err(ConfigError::invalid(
                        &flag,
                        item,
                        "expected key=value".to_string(),
                    ))
                }
            };
            if !known.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    field: flag.clone(),
                    key: key.to_string(),
                    known: known.join(", "),
                });
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(ConfigError::invalid(
                    &flag,
                    item,
                    format!("`{key}` given twice"),
                ));
            }
            pairs.push((key, value));
        }
        Ok(OptionList { flag, pairs })
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The field name used in errors for `key`, e.g. `memory.size`.
    pub fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.flag)
    }

    /// `key` parsed as a decimal integer.
    pub fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.parse::<T>().map_err(|_| {
                    ConfigError::invalid(&self.field(key), v, "expected a whole number".into())
                })
            })
            .transpose()
    }

    /// `key` parsed as a size (see [`parse_size`]).
    pub fn size(&self, key: &str) -> Result<Option<ByteSize>, ConfigError> {
        self.get(key)
            .map(|v| {
                ByteSize::parse(v).map_err(|why| ConfigError::invalid(&self.field(key), v, why))
            })
            .transpose()
    }

    /// `key` parsed as a switch (see [`parse_switch`]).
    pub fn switch(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|v| parse_switch(v).map_err(|why| ConfigError::invalid(&self.field(key), v, why)))
            .transpose()
    }
}

/// A byte size that remembers how it was written (`"512M"`), so that errors
/// and `--print-config` show the value as the user typed it. Two sizes are
/// equal when they hold the same number of bytes.
#[derive(Clone, Debug, Eq)]
pub struct ByteSize {
    bytes: u64,
    text: Option<String>,
}

impl ByteSize {
    /// A size given as a byte count (shown as that number).
    pub const fn from_bytes(bytes: u64) -> Self {
        ByteSize { bytes, text: None }
    }

    /// Parses `input` with [`parse_size`], keeping the text.
    pub fn parse(input: &str) -> Result<Self, String> {
        Ok(ByteSize {
            bytes: parse_size(input)?,
            text: Some(input.trim().to_string()),
        })
    }

    /// The number of bytes.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl PartialEq for ByteSize {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.text {
            Some(t) => f.write_str(t),
            None => write!(f, "{}", self.bytes),
        }
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.text {
            Some(t) => s.serialize_str(t),
            None => s.serialize_u64(self.bytes),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(ByteSize::from_bytes(b)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a byte size: a number with an optional binary suffix `K`, `M`,
/// `G` or `T` (also `KiB`, `MB`, ... all meaning powers of 1024).
pub fn parse_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    if num.is_empty() {
        return Err("expected a size such as 512M, 4G or a byte count".into());
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown size suffix `{other}` (use K, M, G or T)")),
    };
    let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Parses `on`/`off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
pub fn parse_switch(input: &str) -> Result<bool, String> {
    match input.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").unwrap_err().contains("suffix"));
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn option_lists_reject_unknown_and_repeated_keys() {
        let o = OptionList::parse(
            "memory",
            "size=1G,hugepages=on",
            &["size", "hugepages"],
            None,
        )
        .unwrap();
        assert_eq!(o.size("size").unwrap().map(|s| s.bytes()), Some(1 << 30));
        assert_eq!(o.switch("hugepages").unwrap(), Some(true));
        let e = OptionList::parse("memory", "sise=1G", &["size"], None).unwrap_err();
        assert!(e.to_string().contains("memory") && e.to_string().contains("sise"));
        assert!(OptionList::parse("memory", "size=1G,size=2G", &["size"], None).is_err());
        assert!(OptionList::parse("memory", "1G", &["size"], None).is_err());
        let bare = OptionList::parse("serial", "stdout", &["mode"], Some("mode")).unwrap();
        assert_eq!(bare.get("mode"), Some("stdout"));
    }
}
