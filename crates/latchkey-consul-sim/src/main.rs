//! `latchkey-consul-sim [--port N] [--ttl-multiplier M] [--acl-token T] [--strict-keys]`:
//! runs the Consul HTTP-API **simulator** (not Consul) on 127.0.0.1 until
//! killed, printing its URL (`consul://127.0.0.1:N`) on stdout. Used by
//! `cargo xtask services up` so examples and the CLI can talk to it.

use latchkey_consul_sim::ConsulSim;
use std::net::SocketAddr;

fn usage() -> ! {
    eprintln!("usage: latchkey-consul-sim [--port N] [--ttl-multiplier M] [--acl-token T] [--strict-keys]");
    std::process::exit(2);
}

fn main() {
    let mut port: u16 = 8500;
    let mut multiplier: Option<f64> = None;
    let mut token: Option<String> = None;
    let mut strict = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => {
                port = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--ttl-multiplier" => {
                multiplier = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            "--acl-token" => token = Some(args.next().unwrap_or_else(|| usage())),
            "--strict-keys" => strict = true,
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let sim = match ConsulSim::start_on(SocketAddr::from(([127, 0, 0, 1], port))) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("latchkey-consul-sim: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    if let Some(m) = multiplier {
        sim.set_ttl_multiplier(m);
    }
    sim.set_strict_key_validation(strict);
    if token.is_some() {
        sim.set_acl_token(token);
    }
    eprintln!(
        "latchkey-consul-sim: a SIMULATOR of Consul's HTTP API (not a real Consul agent) on {}",
        sim.http_url()
    );
    println!("{}", sim.url());
    loop {
        std::thread::park();
    }
}
