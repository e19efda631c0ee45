//! The Consul target of the tests: a real agent when `LATCHKEY_TEST_CONSUL_URL` is
//! set, else the Consul HTTP-API **simulator** (`latchkey-consul-sim`). No real Consul
//! can be installed on the development machines, so the simulator stands in for it
//! and is labelled as such everywhere.

use crate::Result;
use std::sync::Mutex;

/// Where Consul tests connect: [`ConsulTarget::url`] is `consul://127.0.0.1:PORT`.
#[derive(Debug)]
pub struct ConsulTarget {
    url: String,
    #[cfg(feature = "consul-sim")]
    // In a Mutex so the target is `Sync` whatever the simulator handle is.
    sim: Option<Mutex<latchkey_consul_sim::ConsulSim>>,
    #[cfg(not(feature = "consul-sim"))]
    sim: Option<Mutex<()>>,
}

impl ConsulTarget {
    pub(crate) fn external(url: String) -> ConsulTarget {
        ConsulTarget { url, sim: None }
    }

    /// The URL a latchkey adapter connects with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The simulator's address (`None` for a real agent from the environment).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        #[cfg(feature = "consul-sim")]
        {
            self.sim
                .as_ref()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).addr())
        }
        #[cfg(not(feature = "consul-sim"))]
        {
            None
        }
    }

    /// True when this is the simulator, not a real Consul agent.
    pub fn is_simulator(&self) -> bool {
        self.sim.is_some()
    }

    /// True when the URL came from `LATCHKEY_TEST_CONSUL_URL`.
    pub fn is_external(&self) -> bool {
        self.sim.is_none()
    }
}

/// Starts a private Consul simulator (its own thread and runtime, stopped when the
/// handle drops).
#[cfg(feature = "consul-sim")]
pub fn spawn_consul_sim() -> Result<ConsulTarget> {
    let sim = latchkey_consul_sim::ConsulSim::start()
        .map_err(|e| crate::Error::io("start the Consul simulator", e))?;
    Ok(ConsulTarget {
        url: sim.url().to_string(),
        sim: Some(Mutex::new(sim)),
    })
}

/// Starts a private Consul simulator. This build has no simulator (feature
/// `consul-sim` off): always an error.
#[cfg(not(feature = "consul-sim"))]
pub fn spawn_consul_sim() -> Result<ConsulTarget> {
    Err(crate::Error::Invalid(
        "latchkey-testkit was built without the `consul-sim` feature; set LATCHKEY_TEST_CONSUL_URL"
            .into(),
    ))
}
