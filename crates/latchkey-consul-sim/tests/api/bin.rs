//! The standalone `latchkey-consul-sim` binary (used by `cargo xtask
//! services up`): prints its URL, serves, says it is a simulator.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

/// Kills the child we started if the test fails midway.
struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn standalone_binary_prints_its_url_and_serves() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Kill(
        Command::new(env!("CARGO_BIN_EXE_latchkey-consul-sim"))
            .args(["--port", &port.to_string(), "--ttl-multiplier", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the simulator binary"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), format!("consul://127.0.0.1:{port}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let r = c
            .put(format!("{base}/v1/kv/x"))
            .body("v")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "true");
        let r = c.get(format!("{base}/v1/kv/x?raw")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "v");
    });
    let _ = child.0.kill();
    let _ = child.0.wait();
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("SIMULATOR"), "{err}");
}

#[test]
fn standalone_binary_rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey-consul-sim"))
        .args(["--port", "not-a-port"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}
