//! The fault proxy: pass, latency, refuse, black hole, stall, reset, switched at run time.

use latchkey_testkit::{probe, FaultProxy, ProxyMode};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

fn redis_addr() -> SocketAddr {
    latchkey_testkit::redis().addr().expect("a spawned Redis")
}

fn ping_on(conn: &mut TcpStream, timeout: Duration) -> std::io::Result<()> {
    conn.set_read_timeout(Some(timeout))?;
    conn.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut buf = [0u8; 7];
    conn.read_exact(&mut buf)?;
    assert_eq!(&buf, b"+PONG\r\n");
    Ok(())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

#[test]
fn black_hole_times_out_through_the_proxy_while_a_direct_connection_works() {
    let proxy = FaultProxy::start(redis_addr()).unwrap();
    let mut via = TcpStream::connect(proxy.addr()).unwrap();
    ping_on(&mut via, LONG).unwrap();

    proxy.black_hole();
    assert_eq!(proxy.mode(), ProxyMode::BlackHole);
    let err = ping_on(&mut via, SHORT).unwrap_err();
    assert!(is_timeout(&err), "{err:?}");
    // New connections through the proxy are black-holed too ...
    let err = probe::redis_ping(proxy.addr(), SHORT).unwrap_err();
    assert!(is_timeout(&err), "{err:?}");
    // ... while the server itself answers.
    probe::redis_ping(redis_addr(), LONG).unwrap();

    proxy.pass();
    probe::redis_ping(proxy.addr(), LONG).unwrap();
}

#[test]
fn stall_delays_without_losing_bytes() {
    let proxy = FaultProxy::start(redis_addr()).unwrap();
    let mut via = TcpStream::connect(proxy.addr()).unwrap();
    ping_on(&mut via, LONG).unwrap();
    proxy.stall();
    let err = ping_on(&mut via, SHORT).unwrap_err();
    assert!(is_timeout(&err), "{err:?}");
    proxy.pass();
    // The PING sent during the stall is delivered and answered after it.
    let mut buf = [0u8; 7];
    via.set_read_timeout(Some(LONG)).unwrap();
    via.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    ping_on(&mut via, LONG).unwrap();
}

#[test]
fn latency_is_added_both_ways() {
    let proxy = FaultProxy::start(redis_addr()).unwrap();
    let mut via = TcpStream::connect(proxy.addr()).unwrap();
    ping_on(&mut via, LONG).unwrap();
    proxy.latency(Duration::from_millis(100), Duration::from_millis(20));
    let started = Instant::now();
    ping_on(&mut via, LONG).unwrap();
    let rtt = started.elapsed();
    assert!(rtt >= Duration::from_millis(200), "round trip {rtt:?}");
    proxy.pass();
    let started = Instant::now();
    ping_on(&mut via, LONG).unwrap();
    assert!(started.elapsed() < Duration::from_millis(200));
}

#[test]
fn refuse_closes_the_listener_and_keeps_established_connections() {
    let proxy = FaultProxy::start(redis_addr()).unwrap();
    let mut via = TcpStream::connect(proxy.addr()).unwrap();
    ping_on(&mut via, LONG).unwrap();
    proxy.refuse();
    // The switch is asynchronous: poll until new connections are refused.
    let deadline = Instant::now() + LONG;
    loop {
        match TcpStream::connect_timeout(&proxy.addr(), SHORT) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            _ if Instant::now() > deadline => panic!("connections still accepted"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    ping_on(&mut via, LONG).unwrap();
    proxy.pass();
    let deadline = Instant::now() + LONG;
    while probe::redis_ping(proxy.addr(), SHORT).is_err() {
        assert!(Instant::now() < deadline, "proxy did not accept again");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn reset_connections_sends_rst() {
    let proxy = FaultProxy::start(redis_addr()).unwrap();
    let mut via = TcpStream::connect(proxy.addr()).unwrap();
    ping_on(&mut via, LONG).unwrap();
    assert_eq!(proxy.open_connections(), 1);
    proxy.reset_connections();
    via.set_read_timeout(Some(LONG)).unwrap();
    let mut buf = [0u8; 16];
    let r = via.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected a reset, got {r:?}"
    );
    // The mode is unchanged: new connections pass.
    probe::redis_ping(proxy.addr(), LONG).unwrap();

    // Mode Reset: every new connection is reset at once.
    proxy.set_mode(ProxyMode::Reset);
    let mut c = TcpStream::connect(proxy.addr()).unwrap();
    c.set_read_timeout(Some(LONG)).unwrap();
    let _ = c.write_all(b"*1\r\n$4\r\nPING\r\n");
    let r = c.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{r:?}"
    );
}

#[test]
fn a_dead_target_resets_the_client() {
    let server = latchkey_testkit::spawn_redis(Default::default()).unwrap();
    let proxy = FaultProxy::start(server.addr().unwrap()).unwrap();
    probe::redis_ping(proxy.addr(), LONG).unwrap();
    server.kill().unwrap();
    assert!(probe::redis_ping(proxy.addr(), LONG).is_err());
    server.restart().unwrap();
    probe::redis_ping(proxy.addr(), LONG).unwrap();
}

#[tokio::test]
async fn works_from_an_async_test() {
    let proxy = FaultProxy::start(redis_addr()).unwrap();
    let addr = proxy.addr();
    tokio::task::spawn_blocking(move || probe::redis_ping(addr, LONG))
        .await
        .unwrap()
        .unwrap();
    drop(proxy); // dropping inside a runtime must not panic
}
