//! Helpers: a simulator plus a reqwest client, and response accessors.

use latchkey_consul_sim::ConsulSim;
use serde_json::Value;
use std::time::Duration;

pub struct Sim {
    pub sim: ConsulSim,
    pub c: reqwest::Client,
    pub base: String,
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn index(&self) -> u64 {
        self.header("X-Consul-Index")
            .expect("X-Consul-Index header")
            .parse()
            .unwrap()
    }
    pub fn header(&self, n: &str) -> Option<String> {
        self.headers.get(n).map(|v| v.to_str().unwrap().to_string())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The single entry of a KV GET.
    pub fn entry(&self) -> Value {
        assert_eq!(self.status, 200, "{}", self.text());
        let v = self.json();
        assert_eq!(v.as_array().unwrap().len(), 1);
        v[0].clone()
    }
}

pub fn sim() -> Sim {
    let sim = ConsulSim::start().expect("start simulator");
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = sim.http_url();
    Sim { sim, c, base }
}

impl Sim {
    pub async fn req(&self, m: reqwest::Method, pq: &str, body: Option<Vec<u8>>) -> Resp {
        let mut r = self.c.request(m, format!("{}{}", self.base, pq));
        if let Some(b) = body {
            r = r.body(b);
        }
        let resp = r
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap().to_vec();
        Resp {
            status,
            headers,
            body,
        }
    }
    pub async fn get(&self, pq: &str) -> Resp {
        self.req(reqwest::Method::GET, pq, None).await
    }
    pub async fn put(&self, pq: &str, body: impl Into<Vec<u8>>) -> Resp {
        self.req(reqwest::Method::PUT, pq, Some(body.into())).await
    }
    pub async fn delete(&self, pq: &str) -> Resp {
        self.req(reqwest::Method::DELETE, pq, None).await
    }
    /// PUT that must answer 200 `true`/`false`.
    pub async fn put_bool(&self, pq: &str, body: impl Into<Vec<u8>>) -> bool {
        let r = self.put(pq, body).await;
        assert_eq!(r.status, 200, "{pq}: {}", r.text());
        r.json().as_bool().expect("bool body")
    }
    pub async fn session(&self, body: Value) -> String {
        let r = self.put("/v1/session/create", body.to_string()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["ID"].as_str().unwrap().to_string()
    }
    pub async fn txn(&self, ops: Value) -> Resp {
        self.put("/v1/txn", ops.to_string()).await
    }
}

pub fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
