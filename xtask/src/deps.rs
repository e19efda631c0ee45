//! The system packages the tests need: check, and install when we may.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's ZooKeeper jar (the testkit runs ZooKeeper from it with `java`).
pub const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// One required thing and the Debian package that provides it.
struct Need {
    what: &'static str,
    package: &'static str,
    found: fn() -> bool,
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn have_java() -> bool {
    std::env::var_os("JAVA_HOME").is_some_and(|h| Path::new(&h).join("bin/java").is_file())
        || find_on_path("java").is_some()
}

const REDIS: Need = Need {
    what: "redis-server",
    package: "redis-server",
    found: || find_on_path("redis-server").is_some(),
};
const ETCD: Need = Need {
    what: "etcd",
    package: "etcd-server",
    found: || find_on_path("etcd").is_some(),
};
const PROTOC: Need = Need {
    what: "protoc (to build etcd-client)",
    package: "protobuf-compiler",
    found: || find_on_path("protoc").is_some(),
};
const ZOOKEEPER: Need = Need {
    what: ZOOKEEPER_JAR,
    package: "zookeeper",
    found: || Path::new(ZOOKEEPER_JAR).is_file(),
};
const JAVA: Need = Need {
    what: "java",
    package: "default-jre-headless",
    found: have_java,
};

fn needs(backend: Option<&str>) -> Vec<Need> {
    match backend {
        None => vec![REDIS, ETCD, ZOOKEEPER, PROTOC, JAVA],
        Some("redis") | Some("redis-cluster") => vec![REDIS],
        Some("etcd") => vec![ETCD, PROTOC],
        Some("zookeeper") => vec![ZOOKEEPER, JAVA],
        // The Consul adapter is tested against the in-process simulator; mem needs nothing.
        Some(_) => vec![],
    }
}

fn missing(backend: Option<&str>) -> Vec<Need> {
    needs(backend)
        .into_iter()
        .filter(|n| !(n.found)())
        .collect()
}

fn is_root() -> bool {
    // SAFETY: plain syscall without arguments.
    unsafe { libc::geteuid() == 0 }
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").is_file() && find_on_path("apt-get").is_some()
}

/// The exact command that installs `packages`.
pub fn apt_command(packages: &[&str]) -> String {
    format!(
        "apt-get update && apt-get install -y {}",
        packages.join(" ")
    )
}

/// The packages to install for the missing ones: the Debian `zookeeper` package
/// pulls in a JRE, so `default-jre-headless` only when Java alone is missing.
fn packages_for(missing: &[&'static str]) -> Vec<&'static str> {
    let mut packages: Vec<&str> = Vec::new();
    for p in missing {
        if !packages.contains(p) {
            packages.push(p);
        }
    }
    if packages.contains(&"zookeeper") {
        packages.retain(|p| *p != "default-jre-headless");
    }
    packages
}

/// Makes sure every binary the tests of `backend` (or of all backends) need is there:
/// installs the missing packages when running as root on Debian, else fails with
/// the exact command to run.
pub fn ensure(backend: Option<&str>) -> Result<(), String> {
    let miss = missing(backend);
    if miss.is_empty() {
        eprintln!("xtask: server binaries present (redis-server, etcd, java + ZooKeeper jar, protoc as needed)");
        return Ok(());
    }
    let packages = packages_for(&miss.iter().map(|n| n.package).collect::<Vec<_>>());
    let what: Vec<&str> = miss.iter().map(|n| n.what).collect();
    let cmd = apt_command(&packages);
    if !(is_root() && is_debian()) {
        return Err(format!(
            "missing: {}\ninstall them (as root) with:\n    {cmd}",
            what.join(", ")
        ));
    }
    eprintln!("xtask: missing {}; running: {cmd}", what.join(", "));
    let ok = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(Command::new("apt-get").arg("update")) {
        return Err(format!(
            "`apt-get update` failed; run it yourself:\n    {cmd}"
        ));
    }
    if !ok(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&packages))
    {
        return Err(format!(
            "`apt-get install` failed; run it yourself:\n    {cmd}"
        ));
    }
    let still = missing(backend);
    if !still.is_empty() {
        let what: Vec<&str> = still.iter().map(|n| n.what).collect();
        return Err(format!("still missing after install: {}", what.join(", ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_command_lists_the_missing_packages() {
        let all = packages_for(&[
            "redis-server",
            "etcd-server",
            "zookeeper",
            "protobuf-compiler",
            "default-jre-headless",
        ]);
        assert_eq!(
            apt_command(&all),
            "apt-get update && apt-get install -y redis-server etcd-server zookeeper protobuf-compiler"
        );
        assert_eq!(
            packages_for(&["default-jre-headless"]),
            vec!["default-jre-headless"]
        );
        assert_eq!(
            packages_for(&["protobuf-compiler", "protobuf-compiler"]),
            vec!["protobuf-compiler"]
        );
    }

    #[test]
    fn each_backend_needs_its_servers() {
        let names = |b| needs(b).iter().map(|n| n.package).collect::<Vec<_>>();
        assert_eq!(names(Some("redis")), vec!["redis-server"]);
        assert_eq!(names(Some("redis-cluster")), vec!["redis-server"]);
        assert_eq!(
            names(Some("etcd")),
            vec!["etcd-server", "protobuf-compiler"]
        );
        assert_eq!(
            names(Some("zookeeper")),
            vec!["zookeeper", "default-jre-headless"]
        );
        assert!(names(Some("mem")).is_empty() && names(Some("consul")).is_empty());
        assert_eq!(names(None).len(), 5);
    }
}
