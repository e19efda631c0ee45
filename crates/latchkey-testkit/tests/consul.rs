//! The shared Consul target is the simulator unless LATCHKEY_TEST_CONSUL_URL is set.

use latchkey_testkit::probe;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(5);

#[test]
fn shared_consul_is_the_simulator_and_answers_http() {
    let c = latchkey_testkit::consul();
    assert!(std::ptr::eq(c, latchkey_testkit::consul()));
    if c.is_external() {
        return; // a real agent from the environment: nothing of ours to check
    }
    assert!(c.is_simulator());
    let addr = c.addr().unwrap();
    assert_eq!(c.url(), format!("consul://{addr}"));
    let (status, _) =
        probe::http(addr, "GET", "/v1/kv/latchkey-testkit-missing", None, LONG).unwrap();
    assert_eq!(status, 404);
    let (status, body) = probe::http(
        addr,
        "PUT",
        "/v1/kv/latchkey-testkit-key",
        Some("value"),
        LONG,
    )
    .unwrap();
    assert_eq!((status, body.trim()), (200, "true"));
}

#[test]
fn own_simulators_are_independent() {
    let a = latchkey_testkit::spawn_consul_sim().unwrap();
    let b = latchkey_testkit::spawn_consul_sim().unwrap();
    assert_ne!(a.url(), b.url());
    probe::http(
        a.addr().unwrap(),
        "PUT",
        "/v1/kv/only-in-a",
        Some("1"),
        LONG,
    )
    .unwrap();
    let (status, _) =
        probe::http(b.addr().unwrap(), "GET", "/v1/kv/only-in-a", None, LONG).unwrap();
    assert_eq!(status, 404);
}
