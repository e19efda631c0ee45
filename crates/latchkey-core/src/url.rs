//! Connection URLs: `scheme://[user[:pass]@]host[:port][,host[:port]…][/path][?query]`.
//!
//! One parser for every backend (the `url` crate cannot hold the
//! comma-separated host lists of etcd and ZooKeeper). Passwords are kept out
//! of `Debug`, `Display` and every error message.
//!
//! ```
//! use latchkey_core::BackendUrl;
//! let u = BackendUrl::parse("redis://alice:s3cret@127.0.0.1:6379/2?namespace=app").unwrap();
//! assert_eq!(u.scheme(), "redis");
//! assert_eq!(u.password(), Some("s3cret"));
//! assert_eq!(u.namespace(), "app");
//! assert_eq!(u.to_string(), "redis://alice:***@127.0.0.1:6379/2?namespace=app");
//! ```

use crate::error::{Error, Result};
use percent_encoding::percent_decode_str;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use url::form_urlencoded;

/// One `host[:port]` of a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port, if given.
    pub port: Option<u16>,
}

impl HostPort {
    /// `host:port`, with the default port filled in and IPv6 bracketed.
    pub fn with_default(&self, default_port: u16) -> String {
        let port = self.port.unwrap_or(default_port);
        if self.host.contains(':') {
            format!("[{}]:{port}", self.host)
        } else {
            format!("{}:{port}", self.host)
        }
    }
}

/// A parsed connection URL.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendUrl {
    scheme: String,
    username: Option<String>,
    password: Option<String>,
    hosts: Vec<HostPort>,
    path: String,
    params: BTreeMap<String, String>,
}

impl BackendUrl {
    /// Parses a URL. Errors are [`Error::InvalidUrl`] with the URL redacted.
    pub fn parse(input: &str) -> Result<Self> {
        let fail = |reason: &str| Error::InvalidUrl {
            url: redact(input),
            reason: reason.to_string(),
        };
        let (scheme, rest) = input
            .split_once("://")
            .ok_or_else(|| fail("expected scheme://…"))?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(fail("the scheme must be letters, digits, '+', '-' or '.'"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let (userinfo, hostlist) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let decode = |s: &str| -> Result<String> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| fail("percent-encoding is not valid UTF-8"))
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(ui) => match ui.split_once(':') {
                Some((u, p)) => (Some(decode(u)?), Some(decode(p)?)),
                None => (Some(decode(ui)?), None),
            },
        };
        let username = username.filter(|u| !u.is_empty());
        let mut hosts = Vec::new();
        if !hostlist.is_empty() {
            for part in hostlist.split(',') {
                hosts.push(parse_host(part).map_err(|r| fail(&r))?);
            }
        }
        let mut params = BTreeMap::new();
        if let Some(q) = query {
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                if params.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(fail(&format!("parameter {k:?} is given twice")));
                }
            }
        }
        let url = BackendUrl {
            scheme: scheme.to_ascii_lowercase(),
            username,
            password,
            hosts,
            path: decode(path)?,
            params,
        };
        crate::validate::namespace(url.namespace()).map_err(|e| fail(&e.to_string()))?;
        Ok(url)
    }

    /// The scheme, lower-cased (`redis`, `etcd`, `mem`, …).
    pub fn scheme(&self) -> &str {
        &self.scheme
    }
    /// The user name, if any.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }
    /// The password, if any. Never printed by this type.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }
    /// The hosts, in the order given.
    pub fn hosts(&self) -> &[HostPort] {
        &self.hosts
    }
    /// `host:port` strings, with `default_port` where none was given.
    pub fn endpoints(&self, default_port: u16) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h.with_default(default_port))
            .collect()
    }
    /// The path (`""`, `"/2"`, `"/chroot/dir"`), percent-decoded.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// A query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
    /// All query parameters.
    pub fn params(&self) -> &BTreeMap<String, String> {
        &self.params
    }
    /// The `namespace` parameter, `""` when absent.
    pub fn namespace(&self) -> &str {
        self.param("namespace").unwrap_or("")
    }
    /// A duration parameter such as `timeout=500ms` (units `ms`, `s`, `m`;
    /// a bare number is seconds).
    pub fn param_duration(&self, name: &str) -> Result<Option<Duration>> {
        match self.param(name) {
            None => Ok(None),
            Some(v) => parse_duration(v).map(Some).ok_or_else(|| {
                self.invalid(&format!(
                    "parameter {name}={v:?} is not a duration like 500ms, 5s or 1m"
                ))
            }),
        }
    }
    /// This URL with `namespace` set to `ns` (replacing any earlier one),
    /// e.g. to give each test or tool run a throwaway namespace.
    pub fn with_namespace(&self, ns: &str) -> Result<Self> {
        crate::validate::namespace(ns)?;
        let mut u = self.clone();
        u.params.insert("namespace".into(), ns.to_string());
        Ok(u)
    }
    /// Fails with [`Error::InvalidUrl`] naming the first parameter not in
    /// `known` (`namespace` is always known).
    pub fn expect_params(&self, known: &[&str]) -> Result<()> {
        for k in self.params.keys() {
            if k != "namespace" && !known.contains(&k.as_str()) {
                let mut all: Vec<&str> = known.to_vec();
                all.push("namespace");
                return Err(self.invalid(&format!(
                    "unknown parameter {k:?} for {}:// (known: {})",
                    self.scheme,
                    all.join(", ")
                )));
            }
        }
        Ok(())
    }
    /// Fails unless at least one host is given.
    pub fn require_hosts(&self) -> Result<()> {
        if self.hosts.is_empty() {
            return Err(self.invalid("no host given"));
        }
        Ok(())
    }
    /// An [`Error::InvalidUrl`] about this URL.
    pub fn invalid(&self, reason: &str) -> Error {
        Error::InvalidUrl {
            url: self.to_string(),
            reason: reason.to_string(),
        }
    }
}

fn parse_host(part: &str) -> std::result::Result<HostPort, String> {
    if part.is_empty() {
        return Err("an empty host in the host list".into());
    }
    if let Some(rest) = part.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in host {part:?}"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected {after:?} after host {h:?}")),
        };
        return Ok(HostPort {
            host: h.to_string(),
            port,
        });
    }
    match part.rsplit_once(':') {
        Some((h, p)) => {
            if h.is_empty() {
                return Err(format!("no host before the port in {part:?}"));
            }
            Ok(HostPort {
                host: h.to_string(),
                port: Some(parse_port(p)?),
            })
        }
        None => Ok(HostPort {
            host: part.to_string(),
            port: None,
        }),
    }
}

fn parse_port(p: &str) -> std::result::Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{p:?} is not a port number (1-65535)")),
        Ok(n) => Ok(n),
    }
}

/// Parses `500ms`, `5s`, `2m`, or a bare number of seconds.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, "s"),
    };
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// Replaces the password of a URL-like string by `***`, without parsing it
/// fully (so it also works on strings that failed to parse).
pub fn redact(input: &str) -> String {
    let Some((scheme, rest)) = input.split_once("://") else {
        return input.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let mut out = format!("{scheme}://");
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((u, _)) => out.push_str(&format!("{u}:***")),
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[end..];
    out.push_str(&redact_query(tail));
    out
}

/// Query parameters that carry secrets (Consul's `token`, `password`).
const SECRET_PARAMS: &[&str] = &["token", "password", "secret"];

fn redact_query(tail: &str) -> String {
    let Some((path, q)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let parts: Vec<String> = q
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.contains(&k) => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", parts.join("&"))
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(u) = &self.username {
            write!(f, "{u}")?;
            if self.password.is_some() {
                write!(f, ":***")?;
            }
            write!(f, "@")?;
        } else if self.password.is_some() {
            write!(f, ":***@")?;
        }
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|h| match h.port {
                Some(p) if h.host.contains(':') => format!("[{}]:{p}", h.host),
                Some(p) => format!("{}:{p}", h.host),
                None => h.host.clone(),
            })
            .collect();
        write!(f, "{}{}", hosts.join(","), self.path)?;
        if !self.params.is_empty() {
            let q: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| {
                    if SECRET_PARAMS.contains(&k.as_str()) {
                        format!("{k}=***")
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect();
            write!(f, "?{}", q.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_lists_and_paths() {
        let u = BackendUrl::parse("zookeeper://a:2181,b:2182,[::1]:2183/chroot/x").unwrap();
        assert_eq!(u.hosts().len(), 3);
        assert_eq!(u.endpoints(2181), ["a:2181", "b:2182", "[::1]:2183"]);
        assert_eq!(u.path(), "/chroot/x");
        let m = BackendUrl::parse("mem://").unwrap();
        assert!(m.hosts().is_empty());
        assert_eq!(m.namespace(), "");
    }

    #[test]
    fn never_prints_passwords() {
        let u = BackendUrl::parse("consul://h:8500?token=abc&dc=x").unwrap();
        assert_eq!(u.param("token"), Some("abc"));
        assert!(!format!("{u} {u:?}").contains("abc"));
        let e = BackendUrl::parse("redis://u:hunter2@h:notaport").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("notaport"));
        assert_eq!(
            redact("redis://:pw@h:1/0?token=t"),
            "redis://:***@h:1/0?token=***"
        );
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "nohost",
            "://x",
            "redis://h:0",
            "redis://h:99999",
            "redis://,h",
            "x://h?a=1&a=2",
        ] {
            assert!(
                matches!(BackendUrl::parse(bad), Err(Error::InvalidUrl { .. })),
                "{bad}"
            );
        }
        let u = BackendUrl::parse("redis://h?bogus=1").unwrap();
        let e = u.expect_params(&["timeout"]).unwrap_err();
        assert!(e.to_string().contains("bogus"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
