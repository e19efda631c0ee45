//! Finding the server binaries installed on this machine.

use crate::Error;
use std::path::{Path, PathBuf};

/// The Debian command that installs every server the testkit can spawn.
pub const APT_INSTALL_ALL: &str =
    "apt-get update && apt-get install -y redis-server etcd-server zookeeper protobuf-compiler";

/// Where the Debian `zookeeper` package puts the server jar.
pub const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";
/// slf4j binding that makes ZooKeeper's logs visible (dropped silently without it).
pub const SLF4J_SIMPLE_JAR: &str = "/usr/share/java/slf4j-simple.jar";

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find(env: &str, name: &str, package: &str) -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(missing(&format!("{} (from ${env})", p.display()), package))
        };
    }
    on_path(name).ok_or_else(|| missing(name, package))
}

fn missing(what: &str, package: &str) -> Error {
    Error::Missing {
        what: what.to_string(),
        install: format!("apt-get update && apt-get install -y {package}"),
    }
}

/// `redis-server` (override with `LATCHKEY_REDIS_SERVER`).
pub fn redis_server() -> Result<PathBuf, Error> {
    find("LATCHKEY_REDIS_SERVER", "redis-server", "redis-server")
}

/// `etcd` 3.4+ (override with `LATCHKEY_ETCD`).
pub fn etcd() -> Result<PathBuf, Error> {
    find("LATCHKEY_ETCD", "etcd", "etcd-server")
}

/// `java` (override with `LATCHKEY_JAVA`, else `$JAVA_HOME/bin/java`, else `PATH`).
pub fn java() -> Result<PathBuf, Error> {
    if std::env::var_os("LATCHKEY_JAVA").is_none() {
        if let Some(home) = std::env::var_os("JAVA_HOME") {
            let p = PathBuf::from(home).join("bin/java");
            if is_executable(&p) {
                return Ok(p);
            }
        }
    }
    find("LATCHKEY_JAVA", "java", "default-jre-headless")
}

/// The Java classpath that runs ZooKeeper: the Debian jar (its manifest brings in
/// the other jars) plus slf4j-simple when present. Override the jar with
/// `LATCHKEY_ZOOKEEPER_JAR`.
pub fn zookeeper_classpath() -> Result<String, Error> {
    let jar = std::env::var("LATCHKEY_ZOOKEEPER_JAR").unwrap_or_else(|_| ZOOKEEPER_JAR.into());
    if !Path::new(&jar).is_file() {
        return Err(missing(&jar, "zookeeper"));
    }
    if Path::new(SLF4J_SIMPLE_JAR).is_file() {
        Ok(format!("{jar}:{SLF4J_SIMPLE_JAR}"))
    } else {
        Ok(jar)
    }
}

/// True when `CI=true` (or `CI=1`): a server that cannot start is then a failure.
pub fn is_ci() -> bool {
    matches!(
        std::env::var("CI").map(|v| v.to_ascii_lowercase()),
        Ok(ref v) if v == "true" || v == "1"
    )
}
