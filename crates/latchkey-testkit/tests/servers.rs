//! Issue #3 acceptance for single servers: they answer, pause/resume, kill/restart
//! keeps data (etcd, ZooKeeper), shared handles are shared, URLs are well formed.

use latchkey_testkit::{probe, EtcdOptions, Kind, RedisOptions, ZookeeperOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

fn assert_timed_out(r: std::io::Result<impl std::fmt::Debug>) {
    match r {
        Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn shared_servers_answer_and_are_shared() {
    let r = latchkey_testkit::redis();
    assert!(
        std::ptr::eq(r, latchkey_testkit::redis()),
        "one Redis per test binary"
    );
    assert_eq!(r.kind(), Kind::Redis);
    assert_eq!(r.url(), format!("redis://127.0.0.1:{}", r.port().unwrap()));
    probe::redis_ping(r.addr().unwrap(), LONG).unwrap();

    let e = latchkey_testkit::etcd();
    assert!(std::ptr::eq(e, latchkey_testkit::etcd()));
    assert_eq!(e.url(), format!("etcd://127.0.0.1:{}", e.port().unwrap()));
    probe::etcd_health(e.addr().unwrap(), LONG).unwrap();

    let z = latchkey_testkit::zookeeper();
    assert!(std::ptr::eq(z, latchkey_testkit::zookeeper()));
    assert_eq!(
        z.url(),
        format!("zookeeper://127.0.0.1:{}", z.port().unwrap())
    );
    assert_eq!(
        probe::zk_mode(z.addr().unwrap(), LONG).unwrap(),
        "standalone"
    );
    // TTL nodes need this flag; the shared ZooKeeper has it.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", z.pid().unwrap())).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("-Dzookeeper.extendedTypesEnabled=true"));
}

/// A RESP PING on an open connection, waiting at most `timeout` for `+PONG`.
fn ping_on(conn: &mut TcpStream, timeout: Duration) -> std::io::Result<()> {
    conn.set_read_timeout(Some(timeout))?;
    conn.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut buf = [0u8; 7];
    conn.read_exact(&mut buf)?;
    assert_eq!(&buf, b"+PONG\r\n");
    Ok(())
}

#[test]
fn redis_pause_times_out_and_resume_recovers_the_same_connection() {
    let s = latchkey_testkit::spawn_redis(RedisOptions::default()).unwrap();
    let mut conn = TcpStream::connect(s.addr().unwrap()).unwrap();
    ping_on(&mut conn, LONG).unwrap();

    s.pause().unwrap();
    conn.set_read_timeout(Some(SHORT)).unwrap();
    conn.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut buf = [0u8; 7];
    assert_timed_out(conn.read_exact(&mut buf));
    assert_timed_out(probe::redis_ping(s.addr().unwrap(), SHORT));

    s.resume().unwrap();
    // The request sent while paused is answered now, on the same connection.
    conn.set_read_timeout(Some(LONG)).unwrap();
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    ping_on(&mut conn, LONG).unwrap();
}

#[test]
fn etcd_and_zookeeper_pause_time_out_and_resume_recovers() {
    let e = latchkey_testkit::spawn_etcd(EtcdOptions::default()).unwrap();
    e.pause().unwrap();
    assert_timed_out(probe::etcd_health(e.addr().unwrap(), SHORT));
    e.resume().unwrap();
    probe::etcd_health(e.addr().unwrap(), LONG).unwrap();

    let z = latchkey_testkit::spawn_zookeeper(ZookeeperOptions::default()).unwrap();
    z.pause().unwrap();
    assert_timed_out(probe::zk_mode(z.addr().unwrap(), SHORT));
    z.resume().unwrap();
    assert_eq!(
        probe::zk_mode(z.addr().unwrap(), LONG).unwrap(),
        "standalone"
    );
}

fn etcd_put(addr: std::net::SocketAddr, key: &str, value: &str) {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        probe::base64(key.as_bytes()),
        probe::base64(value.as_bytes())
    );
    let (status, reply) = probe::http(addr, "POST", "/v3/kv/put", Some(&body), LONG).unwrap();
    assert_eq!(status, 200, "{reply}");
}

fn etcd_get_b64(addr: std::net::SocketAddr, key: &str) -> Option<String> {
    let body = format!(r#"{{"key":"{}"}}"#, probe::base64(key.as_bytes()));
    let (status, reply) = probe::http(addr, "POST", "/v3/kv/range", Some(&body), LONG).unwrap();
    assert_eq!(status, 200, "{reply}");
    let kvs = reply.split_once("\"kvs\":")?.1;
    probe::json_string_field(kvs, "value")
}

#[test]
fn etcd_kill_and_restart_keep_data_and_port() {
    let s = latchkey_testkit::spawn_etcd(EtcdOptions::default()).unwrap();
    let addr = s.addr().unwrap();
    etcd_put(addr, "latchkey/restart", "survives");
    let pid = s.pid().unwrap();

    s.kill().unwrap();
    assert!(s.pid().is_none());
    assert!(!s.is_running());
    assert!(
        probe::etcd_health(addr, SHORT).is_err(),
        "killed etcd still answers"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "killed etcd was not reaped"
    );

    s.restart().unwrap();
    assert_ne!(s.pid(), Some(pid));
    assert_eq!(s.addr(), Some(addr));
    assert_eq!(
        etcd_get_b64(addr, "latchkey/restart").as_deref(),
        Some(probe::base64(b"survives").as_str())
    );
}

#[test]
fn zookeeper_kill_and_restart_keep_data() {
    use zookeeper_client as zk;
    let s = latchkey_testkit::spawn_zookeeper(ZookeeperOptions::default()).unwrap();
    let hostport = s.addr().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = zk::Client::connect(&hostport).await.unwrap();
        let opts = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        client
            .create("/latchkey-restart", b"survives", &opts)
            .await
            .unwrap();
    });
    s.kill().unwrap();
    assert!(probe::zk_mode(s.addr().unwrap(), SHORT).is_err());
    s.restart().unwrap();
    rt.block_on(async {
        let client = zk::Client::connect(&hostport).await.unwrap();
        let (data, _) = client.get_data("/latchkey-restart").await.unwrap();
        assert_eq!(data, b"survives");
    });
}

#[test]
fn redis_options_reach_the_server() {
    let s = latchkey_testkit::spawn_redis(RedisOptions::default().with_debug_command()).unwrap();
    let addr = s.addr().unwrap();
    let started = Instant::now();
    let reply = probe::redis_command(addr, &["DEBUG", "SLEEP", "0.2"], LONG).unwrap();
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Without the flag, DEBUG is refused (Redis 7 default).
    let plain = latchkey_testkit::redis();
    let reply =
        probe::redis_command(plain.addr().unwrap(), &["DEBUG", "SLEEP", "0"], LONG).unwrap();
    assert!(reply.starts_with("-ERR"), "{reply}");
}

#[test]
fn fast_zookeeper_uses_its_tick_time() {
    let s = latchkey_testkit::spawn_zookeeper(ZookeeperOptions::fast()).unwrap();
    let conf = probe::zk_four_letter(s.addr().unwrap(), "conf", LONG).unwrap();
    assert!(conf.contains("tickTime=200"), "{conf}");
    // Session timeouts are clamped to 2..20 ticks.
    assert!(conf.contains("maxSessionTimeout=4000"), "{conf}");
}

#[test]
fn dropping_a_handle_kills_the_server_and_removes_its_dir() {
    let s = latchkey_testkit::spawn_redis(RedisOptions::default()).unwrap();
    let pid = s.pid().unwrap();
    let dir = s.data_dir().unwrap().to_path_buf();
    assert!(dir.is_dir());
    drop(s);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
}

#[test]
fn unique_namespaces_differ_and_are_plain() {
    let a = latchkey_testkit::unique_namespace("kv/test");
    let b = latchkey_testkit::unique_namespace("kv/test");
    assert_ne!(a, b);
    assert!(a.starts_with("kv-test-"), "{a}");
    assert!(
        a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "{a}"
    );
    assert!(a.len() <= 100);
}

#[test]
fn tls_servers_start_and_speak_tls() {
    let tls = latchkey_testkit::test_tls().unwrap().clone();
    let r = latchkey_testkit::spawn_redis(RedisOptions {
        tls: Some(tls.clone()),
        ..Default::default()
    })
    .unwrap();
    assert!(r.url().starts_with("rediss://127.0.0.1:"), "{}", r.url());
    let e = latchkey_testkit::spawn_etcd(EtcdOptions {
        tls: Some(tls.clone()),
        ..Default::default()
    })
    .unwrap();
    assert!(e.url().starts_with("etcds://127.0.0.1:"), "{}", e.url());
    // A TLS handshake with the generated CA succeeds against both.
    for addr in [r.addr().unwrap(), e.addr().unwrap()] {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), "-CAfile"])
            .arg(&tls.ca)
            .args(["-verify_return_error", "-brief"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("Verification: OK"), "{addr}: {text}");
    }
}

#[test]
fn a_pause_guard_resumes_on_drop() {
    let s = latchkey_testkit::spawn_redis(RedisOptions::default()).unwrap();
    let addr = s.addr().unwrap();
    {
        let _paused = s.pause_guard().unwrap();
        assert_timed_out(probe::redis_ping(addr, SHORT));
    }
    probe::redis_ping(addr, LONG).unwrap();
    let g = s.pause_guard().unwrap();
    g.resume().unwrap();
    probe::redis_ping(addr, LONG).unwrap();
}
